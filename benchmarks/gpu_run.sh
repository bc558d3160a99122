#!/usr/bin/env bash
# The prepared GPU measurement of benchmarks/GPU.md's "The next GPU run", for the device tool (see its README's limits).
# Before it, here: bash ../shared/tools/mlx-cuda-carry.sh (the mlx-cuda wheel in .device/p1 and .device/p2).
# Device call 1 carries .device/p1:                 mkdir -p /tmp/w && cp .device/p1/part.* /tmp/w/
# Device call 2, at once, carries .device/p2:       bash benchmarks/gpu_run.sh            (timeout_s 600)
# A call 3 on the still-warm machine may run what call 2 had no time for, by name (no install, no carry):
#                             bash benchmarks/gpu_run.sh profile activations attention attention_t1000
# Each measurement has its own time limit (killed past it) and log; a failed one does not stop the others. Only
# 8 files come back from $OUT, so after each measurement $OUT gets results.tgz (every log and JSON), summary.log
# and the kernel traces (trace_*.json.gz): what ran before the call's time ran out is there.
set -uo pipefail
OUT=${OUT:-out/gpu}
WORK=/tmp/gpu_results  # kept between calls on a warm machine
mkdir -p "$OUT" "$WORK"
if [ ! -d /tmp/site/mlx ]; then
    mkdir -p /tmp/w && cp .device/p2/* /tmp/w/
    if [ ! -f /tmp/w/part.00 ]; then  # a fresh machine: call 1's part is not here, and the joined wheel would be cut
        echo "gpu_run.sh: /tmp/w/part.00 is missing: device call 1 (cp .device/p1/part.* /tmp/w/) must run on this" \
             "machine just before" >&2
        exit 1
    fi
    ver=$(basename /tmp/w/mlx-0*.whl | cut -d- -f2)
    whl=/tmp/w/mlx_cuda_13-$ver-py3-none-manylinux_2_35_x86_64.whl
    cat /tmp/w/part.0* > "$whl"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$whl" /tmp/w/mlx-0*.whl || exit 1
    ln -sfn "$(python3 -c 'import site; print(site.getsitepackages()[0])')/nvidia" /tmp/site/nvidia
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

pack() {  # what has run so far, into the (at most 8) files that come back
    tar czf "$OUT/results.tgz" --exclude='trace_*' -C "$WORK" .
    cp "$WORK/summary.log" "$OUT/"
    find "$WORK" -name 'trace_*.json.gz' | while read -r t; do
        cp "$t" "$OUT/$(basename "$(dirname "$t")")_$(basename "$t")"
    done
}
run() {  # run SECONDS NAME COMMAND...: its output in $WORK/NAME.log, its exit status last; skipped if not asked for
    local seconds=$1 name=$2
    shift 2
    if [ ${#WANT[@]} -gt 0 ] && [[ ! " ${WANT[*]} " == *" $name "* ]]; then return; fi
    echo "== $name: $*" | tee -a "$WORK/summary.log"
    # KILL: the Trainer would save a checkpoint on TERM, holding the GPU while the next measurement starts
    timeout -s KILL "$seconds" "$@" > "$WORK/$name.log" 2>&1
    echo "exit $?" | tee -a "$WORK/$name.log" "$WORK/summary.log"
    pack
}
WANT=("$@")
B16=(--device gpu --configs 124m-b16 --rounds 1 --steps 10 --warmup 3)
# most important first, the first six within one call's 600 s: if the call runs out of time, what ran is in $OUT
run 20 info python3 -m nanogpt_mlx info
run 150 train python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx torch.compile
# every kernel of a step, MLX's and PyTorch's, from CUPTI: where the gap to torch.compile is, and whether the GPU idles
run 130 kernels python3 benchmarks/gpu_kernels.py --config 124m-b16 --out "$WORK/kernels"
# MLX commits a CUDA graph every 100 ops (1000 MB of inputs) on an H100/H200 and updates or re-instantiates its
# executable graph at each commit (a graph with a kernel of clusters 2-D or more is re-instantiated): if the
# kernels' time above falls short of the step's, fewer and larger graphs may spare the host that work
run 50 train_graph1000ops env MLX_MAX_OPS_PER_BUFFER=1000 MLX_MAX_MB_PER_BUFFER=8000 python3 benchmarks/bench_train.py \
    "${B16[@]}" --engines mlx
# how much of the peak is queued work: MLX allocates an op's outputs when the host queues it, and its CUDA backend
# keeps the op's inputs until the CUDA graph holding it has run (graphs of up to 100 ops or 1000 MB of inputs on
# an H100/H200, up to 10 queued before the host waits). --cap-memory runs the first step op by op (its peak is the
# step's own need) and then caps MLX's memory 25% above it: MLX waits for queued work rather than allocate past it
run 60 train_cap python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx --cap-memory
run 100 train_fp32 python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx-fp32 torch-fp32
run 90 profile python3 benchmarks/profile_step.py --parts head optimizer host --out "$WORK/profile"
# what a block keeps for the backward at GPT-2 124M's width and B16 x T1024, in n_embd units a token: the value
# to refit device.py's CUDA saved_per_layer with (the slope of the peak between 2 and 8 layers)
run 45 activations python3 benchmarks/activation_memory.py --n-embd 768 --n-head 12 --batch 16 --seq 1024
run 40 attention python3 benchmarks/bench_attention.py --out "$WORK/attention"
# T = 1000: cuDNN's backward over T padded to 1024 against the recomputing backward it replaced
run 30 attention_t1000 python3 benchmarks/bench_attention.py --seq 1000 --dtypes bfloat16 --out "$WORK/t1000"
# the cap with smaller graphs, whose buffers the host waits for sooner
run 60 train_cap_graph200mb env MLX_MAX_MB_PER_BUFFER=200 python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx \
    --cap-memory
# the float32 (TF32) step's kernels against PyTorch eager's
run 90 kernels_fp32 python3 benchmarks/gpu_kernels.py --engines mlx-fp32 torch-fp32 --out "$WORK/kernels_fp32"
# sample and eval take --dtype (bfloat16 by the cuda profile's default): decoding and HellaSwag in bf16, both engines
run 90 sample_bf16 python3 benchmarks/bench_sample.py --device gpu --rounds 1 --dtype bfloat16
run 90 hellaswag_bf16 python3 benchmarks/bench_hellaswag.py --device gpu --dtype bfloat16
pattern="124m-b16\|head+loss\|clip\|host\|setup\|^| \|gelu\|relu2"  # the tables and profile_step's lines
find "$WORK" -maxdepth 1 -name '*.log' ! -name summary.log -exec grep -h "$pattern" {} + \
    > "$WORK/tables.txt"
tee -a "$WORK/summary.log" < "$WORK/tables.txt"
pack
