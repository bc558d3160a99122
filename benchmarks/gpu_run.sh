#!/usr/bin/env bash
# The prepared GPU measurement of README's "What is next on a GPU", as one device call of at most ~10 minutes.
# Before it, here: bash ../shared/tools/mlx-cuda-carry.sh (the mlx-cuda wheel in .device/p1 and .device/p2).
# Device call 1 carries .device/p1:       mkdir -p /tmp/w && cp .device/p1/part.* /tmp/w/
# Device call 2, right after, carries .device/p2:   bash benchmarks/gpu_run.sh
# Each measurement has its own time limit and log under $OUT; a failed one does not stop the others.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" /tmp/w
cp .device/p2/* /tmp/w/
ver=$(basename /tmp/w/mlx-0*.whl | cut -d- -f2)
whl=/tmp/w/mlx_cuda_13-$ver-py3-none-manylinux_2_35_x86_64.whl
cat /tmp/w/part.0* > "$whl"
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$whl" /tmp/w/mlx-0*.whl || exit 1
ln -sfn "$(python3 -c 'import site; print(site.getsitepackages()[0])')/nvidia" /tmp/site/nvidia
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

run() {  # run SECONDS NAME COMMAND...: the command's output in $OUT/NAME.log, its exit status last
    local seconds=$1 name=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.log"
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "exit $?" | tee -a "$OUT/$name.log" "$OUT/summary.log"
}
B16=(--device gpu --configs 124m-b16 --rounds 1 --steps 10 --warmup 3)
# most important first: if the call runs out of time, what ran is under $OUT
run 30 info python3 -m nanogpt_mlx info
run 150 train python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx torch.compile
# how much of the peak is queued work: MLX's CUDA backend keeps an op's inputs until the CUDA graph holding the op
# has run, and queues up to 10 graphs of up to 100 ops or 1000 MB of inputs (H100/H200) before it waits. Under a
# memory limit it commits and waits for queued graphs whenever active memory is past the limit: with a limit of
# 1 MB it runs op by op, and its peak is what the step itself needs
run 80 train_sync python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx --memory-limit 0.001
run 70 train_limit11 python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx --memory-limit 11
run 120 train_fp32 python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx-fp32 torch-fp32
run 60 optimizer python3 benchmarks/profile_step.py --parts optimizer host --out "$OUT"
run 50 attention python3 benchmarks/bench_attention.py --out "$OUT"
run 70 train_graph200mb env MLX_MAX_MB_PER_BUFFER=200 python3 benchmarks/bench_train.py "${B16[@]}" --engines mlx
grep -h "124m-b16\|clip\|host\|^| \|gelu\|relu2" "$OUT"/*.log | tee -a "$OUT/summary.log"
