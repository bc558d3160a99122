"""`nanogpt-mlx` command line: a thin layer over the Python API, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable

from . import __version__, device, signals
from .arguments import (Parser, add_dtype, non_negative_int, positive_int, preset_defaults, probability,
                        temperature)
from .console import INTERRUPTED, STDOUT, NamedStdout, fill_closed_streams, last_line, warn
from .errors import Stopped, UserError, field_kind, first_line


def _stops_on_term(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """`command`, stopped by SIGTERM and SIGHUP as by Ctrl-C (signals.like_ctrl_c): one line, and what it was
    writing removed, where their default actions ended the process silently (status 143 or 129). While train's
    steps run, the Trainer's own handlers take them instead, and save (train.py)."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        with signals.like_ctrl_c():
            command(args)

    return run


# ---------------------------------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="MLX version, the chosen device profile, BLAS in use, memory, measured GEMM speed")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> None:
    import platform

    import mlx.core as mx

    from . import kernels

    total, available = device.system_memory()
    print(f"{'mlx':<12} {mx.__version__}")
    print(f"{'platform':<12} {platform.platform()} ({device.cores()} cores)")
    for label, value in device.info() + list(kernels.BOUND.described):
        print(f"{label:<12} {value}")
    print(f"{'memory':<12} {total:.1f} GiB system" + (f", {available:.1f} GiB available" if available is not None else "")
          + f", {device.memory_bytes() / 2**30:.1f} GiB for MLX")
    for dtype in dict.fromkeys(["float32", device.PROFILE.dtype]):
        print(f"{dtype + ' gemm':<12} {device.peak_flops(dtype) / 1e9:.0f} GFLOP/s (square matmul)")


# -------------------------------------------------------------------------------------- sample
def add_sample(sub) -> None:
    from .config import TrainConfig
    from .sample import SampleConfig as S  # its defaults are the command's

    p = sub.add_parser("sample", help="generate text from a prompt")
    p.add_argument("--model", default="gpt2",
                   help="hub id (gpt2, gpt2-medium, ...), local Hugging Face directory or checkpoint dir (default: gpt2)")
    p.add_argument("--prompt", default=TrainConfig.prompt,  # build-nanogpt's, as a run's samples take it
                   help="text to continue ('<|endoftext|>' in it is that token, as in transformers and mlx-lm); '' "
                        "starts from the <|endoftext|> token, which the samples do not show "
                        f"(default: {TrainConfig.prompt!r})")
    p.add_argument("--num-samples", type=positive_int, default=5,
                   help="samples, generated as one batch; 1 streams its text as it comes (default: 5)")
    p.add_argument("--max-new-tokens", type=positive_int, default=S.max_new_tokens,
                   help=f"tokens to generate (default: {S.max_new_tokens})")
    p.add_argument("--temperature", type=temperature, default=S.temperature,
                   help=f"divides the logits: below 1 sharper, above 1 flatter (default: {S.temperature})")
    p.add_argument("--top-k", type=non_negative_int, default=S.top_k,
                   help=f"draw among the k most likely tokens, 0: among all (default: {S.top_k})")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (--temperature, --top-k, --top-p and --seed then do "
                        "nothing)")
    p.add_argument("--seed", type=int, default=None,
                   help="fixes the samples, sample i whatever --num-samples (default: a new draw each run)")
    p.add_argument("--no-stop", action="store_true", help="keep generating past <|endoftext|>")
    p.add_argument("--crop", action="store_true", help="drop the start of a prompt that does not fit the context")
    add_dtype(p)
    p.set_defaults(func=_stops_on_term(cmd_sample))


def cmd_sample(args) -> None:
    from .sample import SampleConfig, sample_texts, stream_text
    from .weights import load_model

    if args.temperature == 0 and not args.greedy:
        raise UserError("--temperature 0 is the argmax: pass --greedy (or a temperature > 0)")
    cfg = SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p, greedy=args.greedy, seed=args.seed, stop_at_eot=not args.no_stop,
                       crop=args.crop)
    model = load_model(args.model, args.dtype)
    if args.num_samples == 1:
        pieces = stream_text(model, args.prompt, cfg)
        print("> " + next(pieces), end="", flush=True)  # the prompt, once it is known to fit
        try:
            for piece in pieces:
                print(piece, end="", flush=True)
        finally:  # the sample's line ends also when generating fails: an error line is not glued to it
            print(flush=True)
        return
    for text in sample_texts(model, args.prompt, cfg, args.num_samples):
        print(">", text)


# -------------------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a GPT-2 (build-nanogpt's recipe) as a Hugging Face GPT-2 directory",
                       description="Writes weights named as the hub's gpt2, config.json, generation_config.json "
                                   "and GPT-2's tokenizer files: transformers and mlx-lm load the directory. A "
                                   "speedrun-recipe model (RoPE, QK-norm, an untied head) is no GPT-2 and is refused.")
    p.add_argument("src", help="hub id, local Hugging Face directory or checkpoint dir")
    p.add_argument("out", help="output directory, new or empty")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty directory (never into SRC itself or a nanogpt-mlx run or checkpoint), "
                        "removing other weight and tokenizer files there that loaders would read with the export's")
    add_dtype(p, "the weights written, which config.json names: the hub's gpt2 is float32; transformers and mlx-lm "
                 "load a bfloat16 export, half the size, in bfloat16", "float32")
    p.set_defaults(func=_stops_on_term(cmd_export))


def cmd_export(args) -> None:
    from .export import EXPORT_FILES, check_export_target, export_hf
    from .weights import load_model

    check_export_target(args.out, args.force, source=args.src)  # before the (maybe long) load
    model = load_model(args.src, args.dtype, computes=False)  # (bfloat16 stored, not computed: no note of its speed)
    removed = export_hf(model, args.out, force=args.force, dtype=args.dtype)
    print(f"wrote {args.out}: {', '.join(EXPORT_FILES)} (Hugging Face GPT-2 layout, {args.dtype})"
          + (f"; removed {', '.join(removed)}, which loaders would read with it" if removed else ""))


# ---------------------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: HellaSwag accuracy, or loss over token shards")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    model_help = "hub id, local Hugging Face directory or checkpoint dir (default: gpt2)"
    h = tasks.add_parser("hellaswag", help="HellaSwag validation accuracy, scored as build-nanogpt's hellaswag.py")
    h.add_argument("--model", default="gpt2", help=model_help)
    h.add_argument("--data", metavar="FILE", help="local hellaswag_val.jsonl (default: download once, then cached)")
    h.add_argument("--limit", type=positive_int, help="score only the first N examples")
    h.add_argument("--batch-size", type=positive_int,
                   help=f"examples per forward pass, 4 rows each (default: {device.PROFILE.eval_batch} with "
                        f"this machine's profile, {device.PROFILE.name})")
    h.add_argument("--output", metavar="FILE.jsonl",
                   help="write per example: index, label, predicted (summed loss), predicted_norm (mean loss), and "
                        "each ending's losses (summed), mean_losses and num_tokens")
    add_dtype(h)
    l = tasks.add_parser("loss", help="mean loss and perplexity over a split's token shards")
    l.add_argument("--model", default="gpt2", help=model_help)
    l.add_argument("--data", required=True, metavar="DIR", help="directory of {name}_{split}_{index}.npy token shards")
    l.add_argument("--split", default="val", help="shards of this split, e.g. val or train (default: val)")
    l.add_argument("--batches", type=positive_int, default=20, help="number of batches, capped at one pass (default: 20)")
    l.add_argument("--batch-size", type=positive_int, default=8, help="rows per batch (default: 8)")
    l.add_argument("--seq-len", type=positive_int, help="tokens per row (default: the model's context)")
    add_dtype(l)
    p.set_defaults(func=_stops_on_term(cmd_eval))


def cmd_eval(args) -> None:
    from . import evaluate
    from .data import list_shards
    from .files import named_dir, output_file, user_path
    from .weights import load_model

    if args.task == "loss":
        list_shards(args.data, args.split)  # before the (maybe downloaded) model: a mistyped --data is said at once
        model = load_model(args.model, args.dtype)
        loader = evaluate.eval_loader(model, args.data, args.split, args.batch_size, args.seq_len)
        n = loader.within_one_pass(args.batches)
        loss = evaluate.loader_loss(model, loader, n, progress=True)
        print(f"{args.split} loss {loss:.4f}  perplexity {evaluate.perplexity(loss):.2f}  "
              f"({n} batches of {loader.B}x{loader.T} tokens from {args.data}, {args.dtype})")
        return
    if args.data is not None:  # only None is "not given": '' (an unset variable) downloaded HellaSwag
        named_dir(args.data, "HellaSwag file (--data)", name="a file")
    if args.output is not None:  # now, not after the whole evaluation
        out = output_file(args.output, "records file (--output)")
        if args.data is not None and out.exists() and out.resolve() == user_path(args.data).resolve():
            raise UserError(f"{args.output}: is the --data file; the records would replace the examples")
    examples = evaluate.load_hellaswag(evaluate.download_hellaswag() if args.data is None else args.data, args.limit)
    model = load_model(args.model, args.dtype)
    start = time.perf_counter()
    result = evaluate.score_hellaswag(model, examples, batch_examples=args.batch_size)
    seconds = time.perf_counter() - start
    unwritten = None  # the records are written before the summary, which a stdout that fails (a full disk, `| true`)
    if args.output:  # loses alone; and the summary is printed where they cannot be
        try:
            evaluate.write_records(args.output, result.records)
        except UserError as e:
            unwritten = e
    print(f"hellaswag  {result.num_total} examples  acc {result.acc:.4f}  acc_norm {result.acc_norm:.4f}  "
          f"({args.dtype}, {result.num_total / seconds:.1f} examples/s)")
    ref = evaluate.GPT2_HELLASWAG
    print(f"reference  GPT-2 124M: acc {ref['acc']:.4f}  acc_norm {ref['acc_norm']:.4f} (build-nanogpt, all "
          f"{evaluate.HELLASWAG_VAL_SIZE}); GPT-3 124M: acc_norm {evaluate.GPT3_HELLASWAG:.3f}")
    if unwritten is not None:
        raise unwritten
    if args.output:
        print(f"wrote {args.output}")


# ---------------------------------------------------------------------------------------- plot
def add_plot(sub) -> None:
    from .plot import GPT2_VAL_LOSS

    p = sub.add_parser("plot", help="plot loss and HellaSwag vs step of one or more runs (their log.txt)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory with log.txt (or a log file)")
    p.add_argument("--out", default="run.png",
                   help="image to write, of any type matplotlib writes: .png, .svg, .pdf, .jpg, ... (default: run.png)")
    p.add_argument("--log-scale", action="store_true", help="logarithmic loss axis")
    p.add_argument("--baseline", choices=["auto", "on", "off"], default="auto",
                   help=f"GPT-2 124M val-loss line ({GPT2_VAL_LOSS}, FineWeb-Edu); auto: when the loss axis reaches it")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> None:
    from .plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, log_scale=args.log_scale, baseline=args.baseline)}")


# ------------------------------------------------------------------------------------- prepare
SPLIT_SHARD_0 = ("shard 0 is val, the rest train; a source of at most one shard's tokens (but 10 or more) is split "
                 "instead: its first tenth val (on to the next document's start if one starts before a fifth), the "
                 "rest train")


def _add_shard_options(p, name: str, split: str, shuffle: bool = True) -> None:
    """The options every SOURCE takes; `name`: its shard file prefix, `split`: how its shards divide into val and
    train, `shuffle`: whether it has documents to shuffle."""
    from .prepare import PrepareConfig as P  # its defaults are the command's

    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--name", help=f"shard file prefix (default: {name})")
    p.add_argument("--shard-size", type=positive_int, default=P.shard_size,
                   help=f"tokens per shard; {split} (default: {P.shard_size:,})")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")
    if not shuffle:  # argparse refuses --shuffle-docs in one line
        p.set_defaults(shuffle_docs=False, seed=None)
        return
    p.add_argument("--shuffle-docs", action="store_true",
                   help="shuffle file order, part order within files and documents within parts")
    p.add_argument("--seed", type=int, help=f"seed of --shuffle-docs (default: {P.seed})")


class _Sources(argparse._SubParsersAction):
    """prepare's SOURCE, refused with an --inspect DIR before or after it: argparse would first ask the SOURCE for its
    --out (or call an --inspect after it unrecognized) and never say that --inspect takes no SOURCE."""

    def __call__(self, parser, namespace, values, option_string=None):
        rest = values[1:values.index("--")] if "--" in values else values[1:]  # (a PATH after -- is a file's)
        if namespace.inspect is not None or any(a == "--inspect" or a.startswith("--inspect=") for a in rest):
            raise UserError(f"prepare: --inspect DIR cannot be combined with a SOURCE ({values[0]})")
        super().__call__(parser, namespace, values, option_string)


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize FineWeb-Edu, Tiny Shakespeare or your files into token shards",
                       usage="%(prog)s [-h] SOURCE ... --out DIR | %(prog)s --inspect DIR",
                       description="SOURCE --out DIR writes GPT-2 token shards (build-nanogpt's format); "
                                   "re-running the same command resumes. --inspect DIR describes shards.")
    p.add_argument("--inspect", metavar="DIR", help="print shard counts and token totals of DIR and decode a few tokens")
    sources = p.add_subparsers(dest="source", metavar="SOURCE", prog=p.prog, action=_Sources)  # not p's usage line
    fw = sources.add_parser("fineweb-edu", help="HuggingFaceFW/fineweb-edu, one parquet file at a time")
    _add_shard_options(fw, "edufineweb", SPLIT_SHARD_0)
    fw.add_argument("--sample", default="sample-10BT", help="sample-10BT (default), sample-100BT, ... or CC-MAIN-YYYY-NN")
    fw.add_argument("--local-dir", help="local copy laid out like the hub repo (DIR/sample/10BT/*.parquet)")
    fw.add_argument("--revision", help="hub revision (default: the latest; a resume needs the same files)")
    sh = sources.add_parser("shakespeare", help="Tiny Shakespeare, split 90/10 train/val")
    _add_shard_options(sh, "shakespeare", "the text's last tenth is val (shards 0, 1, ...), its first nine tenths "
                                          "train (the shards after), as nanoGPT splits it", shuffle=False)
    sh.add_argument("--path", help="local copy of input.txt (default: download it once into ~/.cache/nanogpt-mlx)")
    sh.add_argument("--url", help="download from this URL instead of char-rnn's input.txt")
    fl = sources.add_parser("files", help="your .txt, .jsonl and .parquet files")
    _add_shard_options(fl, "data", SPLIT_SHARD_0)
    fl.add_argument("paths", nargs="+", metavar="PATH",
                    help="files, directories (searched recursively) or glob patterns (** recursive); a directory's "
                         "search and a pattern skip hidden files and folders, files of other types and dangling "
                         "links, and neither the search nor ** enters a symlinked folder; a file named twice is read "
                         "once. A .txt is one document, a .jsonl line or .parquet row one (its --text-field; nulls "
                         "skipped), suffixes in any case; empty and whitespace-only documents are dropped")
    fl.add_argument("--text-field", default="text",
                    help="top-level key of .jsonl lines, column of .parquet files, that holds the text (default: text)")
    fl.add_argument("--split-on-blank-lines", action="store_true",
                    help=".txt: one document per paragraph, not per file (a line of only whitespace is blank)")
    p.set_defaults(func=_stops_on_term(cmd_prepare))


def cmd_prepare(args) -> None:
    from . import prepare as prep
    from . import shards, sources

    if args.inspect is not None:  # (with a SOURCE refused by _Sources: it would be ignored, its OUT never written)
        print(shards.describe(args.inspect))
        return
    if not args.source:
        raise UserError("prepare: give a SOURCE (fineweb-edu, shakespeare, files) or --inspect DIR")
    if args.seed is not None and not args.shuffle_docs:  # it would be ignored (the manifest says null)
        raise UserError("prepare: --seed orders --shuffle-docs; pass both or neither")
    # the settings are checked before a source may download
    cfg = prep.PrepareConfig(shard_size=args.shard_size, workers=args.workers, shuffle_docs=args.shuffle_docs,
                             seed=prep.PrepareConfig.seed if args.seed is None else args.seed, name=args.name)
    if args.source == "fineweb-edu":
        source = sources.fineweb_edu(args.sample, local_dir=args.local_dir, revision=args.revision)
    elif args.source == "shakespeare":
        source = sources.shakespeare(path=args.path, url=args.url)
    else:
        source = sources.local_files(args.paths, text_field=args.text_field,
                                     split_on_blank_lines=args.split_on_blank_lines)
    print(prep.prepare(source, args.out, cfg))


# --------------------------------------------------------------------------------------- train
def add_train(sub) -> None:
    from dataclasses import fields

    from .config import PRESETS, TrainConfig

    p = sub.add_parser("train", help="pretrain or fine-tune: build-nanogpt's recipe or the speedrun's",
                       description="Train from a preset; every TrainConfig field below overrides it (with --resume: "
                                   "overrides the resumed run's config, except its model and batches; with "
                                   "--init-from, except the source model's shape). --recipe "
                                   "speedrun switches a build-nanogpt preset to the speedrun's model and optimizer, "
                                   "with its defaults for max_lr, weight_decay, betas, eps, grad_clip and "
                                   "warmup_steps; --recipe build-nanogpt turns a speedrun preset back into the one "
                                   "it was made from (speedrun-124m: gpt2-124m). Ctrl-C, "
                                   "SIGTERM or SIGHUP saves a checkpoint after the step in progress (at once during an "
                                   "evaluation, in a single process) and stops.")
    p.add_argument("--preset", choices=list(PRESETS), help="(default: shakespeare; not with --resume)")
    p.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoints are in DIR from its latest, "
                   "exactly: its model and its batches (batch_size, seq_len, shuffle, with shuffle its seed, the "
                   "shards and what they hold) stay; the fields given change, as the log's first note says (a larger "
                   "--max-steps stretches the LR schedule from there)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run's checkpoints, model or logs (removed)")
    p.add_argument("--ranks", type=positive_int, default=1,
                   help="data-parallel processes on this machine (ring backend on 127.0.0.1), at most its cores, "
                        "each with cores/ranks BLAS threads; for several machines use mlx.launch (see README)")
    group = p.add_argument_group("config fields (defaults per preset)")
    min_lr = group.add_mutually_exclusive_group()  # build-nanogpt's absolute min_lr, or a ratio of max_lr
    for f in fields(TrainConfig):
        text = f"{f.metadata['help']} ({preset_defaults(f.name, PRESETS)})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        where = min_lr if f.name in ("min_lr", "min_lr_ratio") else group
        kind, _ = field_kind(f)  # None allowed: unset (min_lr)
        if kind == "bool":
            where.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            where.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], metavar=kind.upper(),
                               default=argparse.SUPPRESS, help=text)
    p.set_defaults(func=_stops_on_term(cmd_train))


def _launches_ranks(args) -> bool:
    """Whether this command starts `--ranks N` ranks (which run it themselves) rather than running it."""
    from .distributed import launched

    return getattr(args, "ranks", 0) > 1 and not launched()


def cmd_train(args) -> None:
    from dataclasses import fields

    from .checkpoint import checkpoints
    from .config import SHAPE_FIELDS, TrainConfig, check_total_batch, resume_config
    from .distributed import init
    from .files import shell_word, user_path
    from .locks import lock_dir, unlock_dir
    from .launch import check_ranks, launch_local
    from .train import Trainer

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume == "":
        raise UserError("--resume needs the run's directory")
    if args.resume:
        given = [option for option, value in (("--out", "out" in overrides), ("--preset", args.preset),
                                              ("--overwrite", args.overwrite)) if value]
        if given:  # they would be ignored: the run's own config and checkpoints continue
            raise UserError(f"--resume DIR continues the run in DIR; {', '.join(given)} cannot be combined with it")
    # a fresh run's config, built before its ranks start: a batch that they would all refuse is refused once, here
    # (a resumed run's is theirs to check, once its checkpoint is held)
    fresh = None if args.resume else TrainConfig.preset(args.preset or "shakespeare", **overrides)
    if fresh and fresh.init_from:  # its shape is trained, whether --init-from or the preset names it
        shape = [f"--{k.replace('_', '-')}" for k in SHAPE_FIELDS if k in overrides]
        whose = "" if "init_from" in overrides else f" (the {args.preset} preset's)"
        if shape:
            raise UserError(f"--init-from trains {fresh.init_from}{whose} in its own shape; {', '.join(shape)} "
                            "cannot change it (they size a random init)")
    if _launches_ranks(args):
        check_ranks(args.ranks)  # (before the batch, which they divide)
        if fresh:
            check_total_batch(fresh, args.ranks)
        raise SystemExit(launch_local(args.ranks, args.argv))  # each rank runs this same command
    dist = init()
    # before its checkpoint is read, which a live run may replace (and no lock file left where there is none); ~
    # expanded, as resume_config does (a shell leaves --resume=~/DIR as it is)
    run = user_path(args.resume) if args.resume else None
    took = dist.is_main and run is not None and bool(checkpoints(run)) and lock_dir(run, "run")
    try:
        cfg = resume_config(args.resume, **overrides) if args.resume else fresh
        trainer = Trainer(cfg, resume=bool(args.resume), overwrite=args.overwrite, dist=dist)
    except BaseException:  # a refused start leaves OUT to the next (cli.main called in a process that lives on)
        if took:
            unlock_dir(run)
        raise
    schedule = {"max_lr", "warmup_steps", "min_lr", "min_lr_ratio"} & overrides.keys()  # (said once it starts)
    if fresh and fresh.init_from and fresh.recipe == "build-nanogpt" and not args.preset and not schedule:
        warn(f"--init-from trains with the shakespeare preset's settings, made to pretrain a small model (max_lr "
             f"{fresh.max_lr:g}, warmup and cosine decay, rows of {fresh.seq_len} tokens); --preset "
             "finetune-shakespeare fine-tunes as nanoGPT does (a constant 3e-5, rows of 1024)", kind="note")
    try:
        result = trainer.train()
    except RuntimeError as e:  # a collective that failed outside Dist.sync, e.g. a peer died mid-step
        if trainer.dist.world == 1:
            raise
        raise UserError(f"rank {trainer.dist.rank}: {first_line(e)}; stopping") from None
    if not trainer.dist.is_main:
        return
    # the last step's loss and evaluations (build-nanogpt's), of the weights before its update: not the model's
    losses = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
    print(f"done: step {trainer.step}" + (f"; step {trainer.step - 1}'s, before its update: {losses}" if losses else "")
          + f"; model in {cfg.out} (nanogpt-mlx sample --model {shell_word(cfg.out)})")


COMMANDS = [add_info, add_sample, add_export, add_eval, add_plot, add_prepare, add_train]


def build_parser() -> argparse.ArgumentParser:
    import mlx.core as mx

    parser = Parser(prog="nanogpt-mlx", description="GPT-2 in MLX: sample, train, evaluate (build-nanogpt, ported).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (mlx {mx.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def command() -> int:
    """The `nanogpt-mlx` command, `python -m nanogpt_mlx` and a rank of `train --ranks`: main() on sys.argv, then
    nothing more to stop (signals.ignore_stops)."""
    status = main()
    signals.ignore_stops()
    return status


def main(argv: list[str] | None = None) -> int:
    signals.ctrl_c_back()  # Ctrl-C from here on is KeyboardInterrupt: saved runs, one line
    fill_closed_streams()
    if hasattr(sys.stdout, "reconfigure"):  # generated text on a terminal that cannot show it: '?', not a traceback
        sys.stdout.reconfigure(errors="replace")
    stdout, sys.stdout = sys.stdout, NamedStdout(sys.stdout)
    try:
        return _run(argv)
    finally:
        sys.stdout = stdout


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)  # imports the commands' modules: Ctrl-C may come here too
        args.argv = sys.argv[1:] if argv is None else argv
        if args.command != "info" and not _launches_ranks(args):  # (the ranks say them)
            device.say_notes()
        args.func(args)
    except UserError as e:
        last_line(f"nanogpt-mlx: error: {e}")
        return 1
    except KeyboardInterrupt as e:
        last_line(INTERRUPTED)
        return e.status if isinstance(e, Stopped) else 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except RuntimeError as e:
        said = device.explain(e)  # MLX's errors that the device knows a cause of (a full disk for its kernels)
        if said is None:
            raise
        last_line(f"nanogpt-mlx: error: {said}")
        return 1
    except OSError as e:  # a disk or file error that no command turned into a UserError: still one line
        if e.filename is STDOUT:  # the work before it is done: what failed is its report
            from .files import devnull_onto

            with contextlib.suppress(OSError):  # (a stdout of no file: a caller's StringIO)
                devnull_onto(sys.stdout.fileno())  # Python's own flush at exit fails no more
            last_line(f"nanogpt-mlx: error: stdout: cannot write ({e.strerror or first_line(e)})")
            return 1
        where = f"{e.filename}: " if e.filename else ""
        last_line(f"nanogpt-mlx: error: {where}{e.strerror or first_line(e)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
