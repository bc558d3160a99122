"""Data-parallel scaling on one machine: 1 rank x N threads vs N ranks x 1 thread (ring backend, 127.0.0.1).

Both settings train the same tokens per optimizer step (the single rank accumulates N micro-batches),
so tokens/s compare directly. Also times one all-reduce of the full gradient (`Dist.average_gradients`: MLX's
`nn.average_gradients` over the group).

    python benchmarks/bench_distributed.py              # both configs, 2 ranks
    python benchmarks/bench_distributed.py --configs a --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import numpy as np

from nanogpt_mlx.arguments import positive_int

WARMUP = 2  # untimed steps first: the step's compilation, then the allocator's first use
CONFIGS = {  # the training benchmark's configs
    "a": dict(n_layer=4, n_head=4, n_embd=256, batch_size=8, seq_len=256),
    "b": dict(n_layer=12, n_head=12, n_embd=768, batch_size=4, seq_len=256),
}

WORKER = """
import json, sys, time
import nanogpt_mlx
import mlx.core as mx
from nanogpt_mlx.config import TrainConfig
from nanogpt_mlx.train import Trainer
cfg = TrainConfig(**json.loads(sys.argv[1]))
t = Trainer(cfg)
t.train()
params = t.model.trainable_parameters()
times = []
for _ in range(4):
    start = time.perf_counter()
    t.dist.sync(t.dist.average_gradients(params))
    times.append(time.perf_counter() - start)
if t.dist.rank == 0:
    print(json.dumps({"allreduce_s": sorted(times)[1]}))
"""


def hostfile(directory: Path, n: int) -> Path:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    path = directory / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]))
    for s in socks:
        s.close()
    return path


def run(directory: Path, model: dict, ranks: int, threads: int, steps: int, world_tokens: int) -> dict:
    """Train WARMUP + `steps` steps with `ranks` processes of `threads` BLAS threads; the median tok/s of `steps`."""
    out = directory / f"L{model['n_layer']}d{model['n_embd']}-r{ranks}t{threads}"  # a fresh run directory each
    cfg = dict(data=str(directory / "data"), out=str(out), vocab_size=50304, block_size=model["seq_len"],
               total_batch_size=world_tokens, max_steps=WARMUP + steps, warmup_steps=2, val_every=0, sample_every=0,
               hellaswag_every=0, checkpoint_every=0, **model)
    script = directory / "worker.py"
    script.write_text(WORKER)
    hosts = hostfile(directory, ranks) if ranks > 1 else None
    procs = []
    for r in range(ranks):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
        if hosts:
            env.update(MLX_RANK=str(r), MLX_HOSTFILE=str(hosts))
        with open(directory / f"{out.name}-rank{r}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], env=env,
                                          stdout=subprocess.PIPE, stderr=err, text=True))
    outputs = [p.communicate()[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode:
            tail = (directory / f"{out.name}-rank{r}.err").read_text()[-2000:]
            raise SystemExit(f"rank {r} of {out.name} failed ({p.returncode}):\n{tail}")
    steps_log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in steps_log if r["kind"] == "train"][WARMUP:]
    result = {"tok_per_s": median(tps)}
    if ranks > 1:
        result.update(json.loads(outputs[0].strip().splitlines()[-1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="ab", help="which configs: a (4L/256d, B8xT256), b (124M, B4xT256)")
    ap.add_argument("--ranks", type=positive_int, default=os.cpu_count() or 2,
                    help="single-threaded ranks (default: the cores)")
    ap.add_argument("--steps", type=positive_int, default=6, help="timed steps, after 2 untimed (default: 6)")
    args = ap.parse_args()
    if other := set(args.configs) - set(CONFIGS):  # before minutes of runs
        ap.error(f"--configs {args.configs}: {', '.join(sorted(other))} is no config ({', '.join(CONFIGS)})")
    n = args.ranks
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "data").mkdir()
        rng = np.random.default_rng(0)
        for split, i in (("val", 0), ("train", 1)):
            np.save(directory / "data" / f"bench_{split}_{i:06d}.npy",
                    rng.integers(0, 50257, 2_000_000, dtype=np.uint16))
        for name in args.configs:
            model = CONFIGS[name]
            tokens = model["batch_size"] * model["seq_len"] * n  # per optimizer step, both settings
            one = run(directory, model, 1, 1, args.steps, tokens // n)
            single = run(directory, model, 1, n, args.steps, tokens)
            multi = run(directory, model, n, 1, args.steps, tokens)
            print(f"({name}) 1x1 {one['tok_per_s']:.0f}, 1x{n} {single['tok_per_s']:.0f}, {n}x1 {multi['tok_per_s']:.0f} "
                  "tok/s", flush=True)
            rows.append((name, one, single, multi))
    print(f"\n{'config':<26} {'1 rank x 1 thread':>18} {f'1 rank x {n} threads':>20} {f'{n} ranks x 1 thread':>20} "
          f"{'ranks/threads':>14} {'scaling eff.':>13} {'all-reduce':>11}")
    for name, one, single, multi in rows:
        m = CONFIGS[name]
        label = f"({name}) {m['n_layer']}L/{m['n_embd']}d B{m['batch_size']}xT{m['seq_len']}"
        print(f"{label:<26} {one['tok_per_s']:>14.0f} t/s {single['tok_per_s']:>16.0f} t/s "
              f"{multi['tok_per_s']:>16.0f} t/s {multi['tok_per_s'] / single['tok_per_s']:>13.2f}x "
              f"{multi['tok_per_s'] / (n * one['tok_per_s']) * 100:>12.0f}% {multi['allreduce_s'] * 1000:>8.1f} ms")
    print("\nranks/threads: N single-threaded ranks vs one N-threaded rank; scaling eff.: N ranks vs N x one "
          "single-threaded rank; all-reduce: one average_gradients of the whole model")


if __name__ == "__main__":
    main()
