"""cuda.py's kernel without a GPU. `mx.fast.cuda_kernel` is replaced by a stand-in that wraps the kernel's source
the way MLX's JIT does (custom_kernel.cpp's build_kernel: a __global__ function of the inputs and outputs, the
template arguments as constants) and then either runs it on the CPU (g++, cuda_on_cpu.h: a thread per CUDA
thread) or compiles it for an H100/H200 (nvcc, sm_90). So the kernel's arithmetic, cuda.py's launch arguments and
the training loss through the kernel are checked in CI, and a GPU session does not find a compile error or a
block too large for the registers."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx import cuda
from nanogpt_mlx.loss import make_losses

HERE = Path(__file__).parent
C_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.int32: "int32_t"}
NUMPY_VIEW = {mx.bfloat16: (mx.uint16, np.uint16), mx.float16: (mx.float16, np.float16),
              mx.float32: (mx.float32, np.float32), mx.int32: (mx.int32, np.int32)}
GPU_PRELUDE = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n#include <cstdint>\n"
REGISTERS_PER_SM = 65536  # sm_90: a block of THREADS threads may use at most 65536 / THREADS registers each


def wrapped_source(name: str, header: str, source: str, inputs: list[tuple[str, str]],
                   outputs: list[tuple[str, str]], template: list[tuple[str, object]]) -> tuple[str, str]:
    """(kernel name, the translation unit MLX's JIT compiles, less MLX's own header) for `inputs` and
    `outputs` as (name, C type) and template arguments as (name, int, bool or mx.Dtype)."""
    constants = []
    for key, value in template:
        if isinstance(value, bool):
            constants.append(f"  constexpr bool {key} = {str(value).lower()};")
        elif isinstance(value, int):
            constants.append(f"  constexpr int {key} = {value};")
        else:
            constants.append(f"  using {key} = {C_TYPES[value]};")
    kernel = f"custom_kernel_{name}"
    params = [f"    const {t}* {n}" for n, t in inputs] + [f"    {t}* {n}" for n, t in outputs]
    text = (f"{header}namespace mlx::core::cu {{\n\n__global__ void {kernel}(\n" + ",\n".join(params) + ") {\n"
            + "\n".join(constants) + "\n\n" + source + "\n}\n\n} // namespace mlx::core::cu\n")
    return kernel, text


def host_main(kernel: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]) -> str:
    """main(argv): blocks, threads, then a (path, length) pair per input and per output; runs the kernel and
    writes the outputs."""
    lines, args, k = ["int main(int, char** argv) {", "  const unsigned blocks = std::atoi(argv[1]), "
                      "threads = std::atoi(argv[2]);"], [], 3
    for i, (_, t) in enumerate(inputs):
        lines.append(f"  auto in{i} = read_array<{t}>(argv[{k}], std::atol(argv[{k + 1}]));")
        args.append(f"static_cast<const {t}*>(in{i}.data())")
        k += 2
    for i, (_, t) in enumerate(outputs):
        lines.append(f"  std::vector<{t}> out{i}(std::atol(argv[{k + 1}]));")
        args.append(f"out{i}.data()")
        k += 2
    lines.append(f"  launch(blocks, threads, mlx::core::cu::{kernel}, {', '.join(args)});")
    k = 3 + 2 * len(inputs)
    lines += [f"  write_array(argv[{k + 2 * i}], out{i});" for i in range(len(outputs))]
    return "\n".join(lines + ["}\n"])


def build(compiler: list[str], text: str, suffix: str, workdir: Path) -> tuple[Path, str]:
    """(the compiled file, the compiler's messages) of a source, named by a hash of it and the command."""
    key = hashlib.sha1((" ".join(compiler) + text).encode()).hexdigest()[:16]
    src, built = workdir / f"{key}.cpp", workdir / f"{key}{suffix}"
    src.write_text(text)
    proc = subprocess.run([*compiler, "-o", str(built), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{compiler[0]} failed:\n{proc.stderr[-4000:]}"
    return built, proc.stdout + proc.stderr


class StandIn:
    """mx.fast.cuda_kernel's stand-in: 'cpu' runs each launch on the CPU; 'sm_90' compiles the kernel for the
    GPU, records ptxas's report in `.reports` and returns zeros."""

    def __init__(self, mode: str, workdir: Path):
        self.mode, self.workdir, self.launches, self.reports = mode, workdir, [], []

    def __call__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False):
        assert ensure_row_contiguous and not atomic_outputs  # the kernel indexes rows as contiguous memory

        def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None,
                   verbose=False, stream=None):
            assert init_value is None and len(inputs) == len(input_names) and len(output_shapes) == len(output_names)
            self.launches.append({"template": dict(template), "grid": grid, "threadgroup": threadgroup})
            ins = [(n, C_TYPES[a.dtype]) for n, a in zip(input_names, inputs)]
            outs = [(n, C_TYPES[d]) for n, d in zip(output_names, output_dtypes)]
            kernel, text = wrapped_source(name, header, source, ins, outs, template)
            if self.mode == "sm_90":
                nvcc = ["nvcc", "-x", "cu", "-arch=sm_90", "-cubin", "-Xptxas", "-v"]
                _, said = build(nvcc, GPU_PRELUDE + text, ".cubin", self.workdir)
                self.reports.append(said)
                return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
            return self.run_on_cpu(kernel, text, ins, outs, inputs, grid, threadgroup, output_shapes, output_dtypes)

        return launch

    def run_on_cpu(self, kernel, text, ins, outs, inputs, grid, threadgroup, output_shapes, output_dtypes):
        (gx, gy, gz), (tx, ty, tz) = grid, threadgroup
        assert gy == gz == ty == tz == 1 and tx % 32 == 0 and tx <= 1024
        program = f'#include "cuda_on_cpu.h"\n{text}\n{host_main(kernel, ins, outs)}'
        exe, _ = build(["g++", "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", f"-I{HERE}"], program, "",
                       self.workdir)
        argv = [str(exe), str(-(-gx // tx)), str(tx)]  # MLX launches ceil(grid / threadgroup) blocks
        for i, a in enumerate(inputs):
            view, np_type = NUMPY_VIEW[a.dtype]
            path = self.workdir / f"in{i}"
            np.ascontiguousarray(np.array(a.view(view), dtype=np_type)).tofile(path)
            argv += [str(path), str(a.size)]
        for i, shape in enumerate(output_shapes):
            argv += [str(self.workdir / f"out{i}"), str(int(np.prod(shape)))]
        subprocess.run(argv, check=True, timeout=300)
        results = []
        for i, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
            view, np_type = NUMPY_VIEW[dtype]
            results.append(mx.array(np.fromfile(self.workdir / f"out{i}", dtype=np_type).reshape(shape)).view(dtype))
        return results


@pytest.fixture
def kernel_on(monkeypatch, tmp_path):
    """kernel_on(mode) puts a StandIn of that mode in place of mx.fast.cuda_kernel and returns it."""

    def install(mode: str) -> StandIn:
        if shutil.which({"cpu": "g++", "sm_90": "nvcc"}[mode]) is None:
            pytest.skip(f"no {'g++' if mode == 'cpu' else 'nvcc'} on this machine")
        stand_in = StandIn(mode, tmp_path)
        monkeypatch.setattr(mx.fast, "cuda_kernel", stand_in)
        cuda._kernel.cache_clear()
        return stand_in

    yield install
    cuda._kernel.cache_clear()


def reference(logits: np.ndarray, y: np.ndarray, softcap: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's contract in float64 numpy: per-row loss and (softmax - onehot) / n through the cap."""
    z = logits.astype(np.float64)
    if softcap:
        z = softcap * np.tanh(z / softcap)
    m = z.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
    d = (np.exp(z - lse[:, None]) - (np.arange(z.shape[1]) == y[:, None])) / n
    if softcap:
        d *= 1 - (z / softcap) ** 2
    return lse - z[np.arange(len(y)), y], d


@pytest.mark.parametrize("dtype, vocab, softcap, pack", [
    (mx.bfloat16, 50304, 0.0, 8), (mx.bfloat16, 50304, 30.0, 8), (mx.float32, 1000, 15.0, 4),
    (mx.float16, 1001, 0.0, 1)], ids=["bf16", "bf16-capped", "fp32-capped", "fp16-odd-vocab"])
def test_kernel_run_on_the_cpu_gives_the_loss_and_gradient(kernel_on, dtype, vocab, softcap, pack):
    """Rows of random logits, a row with one huge logit (the running max jumps), a constant row, -inf logits (one
    a thread's first: exp(-inf - -inf) made its row NaN); targets at both ends of the vocabulary."""
    stand_in = kernel_on("cpu")
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (4, vocab)).astype(np.float32)
    z[1, vocab // 3] = 60.0
    z[2] = 1.5
    z[0, :2] = z[3, 5] = -np.inf
    logits = mx.array(z).astype(dtype)
    y = np.array([vocab - 1, 0, 7, vocab // 3])
    loss, d = cuda.cross_entropy_rows(logits, mx.array(y), softcap, n=7)
    launch = stand_in.launches[-1]
    assert launch["template"]["PACK"] == pack and launch["template"]["CAP"] == bool(softcap)
    assert launch["grid"] == (4 * cuda.THREADS, 1, 1) and launch["threadgroup"] == (cuda.THREADS, 1, 1)
    assert loss.dtype == mx.float32 and d.dtype == dtype and d.shape == logits.shape
    want_loss, want_d = reference(np.array(logits.astype(mx.float32)), y, softcap, 7)
    np.testing.assert_allclose(np.array(loss), want_loss, rtol=1e-5, atol=1e-5)
    # the kernel's float32 result rounded once to the output dtype (fp16's smallest steps below 2^-14)
    rtol = {mx.bfloat16: 2**-8, mx.float16: 2**-11, mx.float32: 1e-5}[dtype]
    np.testing.assert_allclose(np.array(d.astype(mx.float32)), want_d, rtol=rtol, atol=2**-24 + 1e-9)


def test_training_loss_through_the_kernel_run_on_the_cpu(kernel_on):
    """make_losses with cuda.py's kernel as its row-wise step (several chunks, a last one short): loss and
    gradients of h and w equal MLX's cross-entropy of h @ w.T in float32."""
    kernel_on("cpu")
    train_loss, _ = make_losses(12, rowwise=cuda.cross_entropy_rows)
    rng = np.random.default_rng(1)
    h, w = (mx.array(rng.normal(0, 1, s).astype(np.float32)) for s in ((30, 64), (1000, 64)))
    y = mx.array(rng.integers(0, 1000, 30))

    def plain(h, w):
        return mx.mean(mx.logsumexp(h @ w.T, axis=-1) - mx.take_along_axis(h @ w.T, y[:, None], axis=-1)[:, 0])

    got, (dh, dw) = mx.value_and_grad(lambda h, w: train_loss(h, w, y, 0.0), argnums=(0, 1))(h, w)
    want, (want_dh, want_dw) = mx.value_and_grad(plain, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(dh), np.array(want_dh), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(dw), np.array(want_dw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, vocab, softcap", [(mx.bfloat16, 50304, 0.0), (mx.bfloat16, 50304, 30.0),
                                                   (mx.float32, 50304, 0.0), (mx.float16, 50257, 15.0)])
def test_kernel_compiles_for_an_h100_within_the_block_register_budget(kernel_on, dtype, vocab, softcap):
    """nvcc (NVRTC's compiler) builds the source MLX would hand NVRTC for sm_90, and ptxas fits a block of
    THREADS threads in one SM's registers: otherwise the launch fails with 'too many resources requested'."""
    stand_in = kernel_on("sm_90")
    cuda.cross_entropy_rows(mx.zeros((2, vocab), dtype=dtype), mx.array([0, 1]), softcap, n=2)
    used = [int(r) for r in re.findall(r"Used (\d+) registers", stand_in.reports[-1])]
    assert used and max(used) * cuda.THREADS <= REGISTERS_PER_SM, stand_in.reports[-1]
