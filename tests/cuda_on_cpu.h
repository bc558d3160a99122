// Just enough of CUDA for cuda.py's kernel source to run on the CPU (test_cuda_kernel.py): one std::thread per
// CUDA thread, one block at a time. __shared__ becomes a function-static variable (one block runs at a time, so
// "shared by the block" is "shared by every thread"), __syncthreads a barrier of the block's threads and
// __shfl_xor_sync an exchange through memory between two barriers of the warp's 32 threads. The 16-bit types
// round to nearest even, as the GPU's conversions do.
#pragma once

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __shared__ static

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;

struct __nv_bfloat16 {
  uint16_t bits = 0;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    bits = std::isnan(f) ? 0x7fc0 : static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
  operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};
using __half = _Float16;

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }

namespace emulated {
inline std::unique_ptr<std::barrier<>> block;
inline std::vector<std::unique_ptr<std::barrier<>>> warps;
inline std::vector<float> exchange;  // one slot per thread of the block
}  // namespace emulated

inline void __syncthreads() { emulated::block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned t = threadIdx.x, warp = t / 32;
  emulated::exchange[t] = value;
  emulated::warps[warp]->arrive_and_wait();
  const float other = emulated::exchange[(t & ~31u) | ((t & 31u) ^ lane_mask)];
  emulated::warps[warp]->arrive_and_wait();  // nobody overwrites a slot before its reader has read it
  return other;
}

// Runs kernel(args...) over `blocks` blocks of `threads` threads (a multiple of 32).
template <typename Kernel, typename... Args>
void launch(unsigned blocks, unsigned threads, Kernel kernel, Args... args) {
  emulated::exchange.assign(threads, 0.f);
  for (unsigned b = 0; b < blocks; ++b) {
    emulated::block = std::make_unique<std::barrier<>>(threads);
    emulated::warps.clear();
    for (unsigned w = 0; w < threads / 32; ++w) emulated::warps.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([=] { threadIdx.x = t; blockIdx.x = b; kernel(args...); });
    for (auto& thread : pool) thread.join();
  }
}

// The contents of a binary file of n values of type T (a test's numpy array).
template <typename T>
std::vector<T> read_array(const char* path, size_t n) {
  std::vector<T> out(n);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(out.data(), sizeof(T), n, f) != n) { std::perror(path); std::exit(1); }
  std::fclose(f);
  return out;
}

template <typename T>
void write_array(const char* path, const std::vector<T>& values) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(values.data(), sizeof(T), values.size(), f) != values.size()) {
    std::perror(path);
    std::exit(1);
  }
  std::fclose(f);
}
