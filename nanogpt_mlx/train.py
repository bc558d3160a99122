"""Pretraining and fine-tuning, in MLX: build-nanogpt's train_gpt2.py loop, configured by a TrainConfig
(config.py), with the model, optimizer and schedule taken from a recipe (recipes.py: build-nanogpt's, the
default, or the speedrun's).

One optimizer step = `grad_accum` micro-batches of (B, T) tokens per rank (steps.py: the compiled micro-steps,
their gradients summed; the last one averages them over ranks, clips their global norm and applies the recipe's
optimizer, whose LRs the recipe sets before every step). Each micro-step's graph is built while the device runs
the one before (steps.Queue), so the device hardly waits for the host and memory holds one micro-batch at a time;
that goes across steps too (Trainer._queue_ahead), unless an evaluation or a checkpoint must see the weights
between them, the run has several ranks (whose collectives must come in one order) or step threads (which compute
a micro-step before returning), or the step is the one that cap_memory measures op by op. The compute dtype
defaults to the device profile's (bfloat16 on GPUs, float32 on CPUs).

Checkpoints (checkpoint.py) hold the weights, the optimizer state, the data-loader position and
the config. All randomness derives from the seed and the counters saved there (init from the
seed, shuffle from seed/epoch/shard, samples from seed + step), so resuming continues exactly
as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from . import checkpoint, device, distributed, evaluations, memory, recipes, signals, steps
from .config import (MODEL_FIELDS, TrainConfig, check_total_batch, foreign_defaults, ignored_shape,
                     model_config, refuse_model_changes, resume_line, resumed, unread)
from .console import bar_off, say, size, warn
from .data import DataLoader
from .errors import Overflow, Stopped, UserError, check_bool, first_line
from .files import devnull_onto, shell_word, user_path
from .locks import refuse_locked
from .model import DTYPES, GPT, GPTConfig
from .optim import Packing
from .rundir import RunDir
from .stops import StopEvaluating, Stops
from .weights import load_model


# ----------------------------------------------------------------------------------- trainer
class _SavedStop(UserError):
    """A stop that is no signal's (a bad shard, stdout on a full disk), after the save: the Trainer is whole."""


class Trainer:
    """A training run: `Trainer(cfg).train()`, or `Trainer(cfg, resume=True)` to continue cfg.out.
    Without cfg: TrainConfig(), build-nanogpt's GPT-2 124M run. With overwrite=True, OUT's run (checkpoints, model,
    logs) is removed when the Trainer is made, not when it trains."""

    def __init__(self, cfg: TrainConfig | None = None, resume: bool = False, overwrite: bool = False,
                 dist: distributed.Dist | None = None):
        if cfg is not None and not isinstance(cfg, TrainConfig):
            raise UserError(f"cfg must be a TrainConfig (config.TrainConfig or TrainConfig.preset), got "
                            f"{type(cfg).__name__}")
        check_bool("resume", resume)
        check_bool("overwrite", overwrite)  # "no" is true: it would remove the run
        if resume and overwrite:  # which one was meant? (the CLI refuses --resume with --overwrite too)
            raise UserError("resume=True continues OUT's run and overwrite=True replaces it: pass one of them")
        cfg = cfg or TrainConfig()  # build-nanogpt's GPT-2 124M run
        self.cfg, self.dist = cfg, dist or distributed.init()
        self.out = user_path(cfg.out).absolute()  # ~ expanded; a later os.chdir (a notebook) must not move the run
        self.run_dir = RunDir(self.out)
        self._broken = ""  # why train() ended amid a step, after which it refuses to go on
        self._failed_evaluating = False  # whether train() ended in an evaluation's error, between steps
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.run_dir.release()
            raise

    def __repr__(self) -> str:
        broken = f", broken: {self._broken}" if self._broken else ""
        return (f"Trainer(out={str(self.out)!r}, step {self.step} of {self.cfg.max_steps}, recipe {self.cfg.recipe}, "
                f"{self.cfg.dtype}{broken})")

    def _setup(self, resume: bool, overwrite: bool) -> None:
        # the device's dtype made the run's, saved with it: resumed on another device (a GPU's run on a CPU), the run
        # keeps it unless told otherwise (--dtype), and a change is said as one
        cfg = self.cfg = replace(self.cfg, dtype=self.cfg.dtype or device.PROFILE.dtype)
        self.recipe = recipes.get(cfg.recipe)
        self.dtype_name = cfg.dtype
        self.dtype = DTYPES[self.dtype_name]
        if self.dist.is_main:  # a live run's OUT is said to be one before what it holds (a run to --overwrite, no
            refuse_locked(self.out)  # checkpoint to resume yet)
        if resume and self.dist.is_main and checkpoint.checkpoints(self.out):  # (no lock file left where none is)
            self.run_dir.hold()  # before its checkpoint is read, which a live run may replace
        ckpt = checkpoint.latest_checkpoint(self.out) if resume else None
        state = checkpoint.read_state(ckpt) if ckpt is not None else None
        if state is not None:
            self._check_world(ckpt, state["world"])
        self.run_dir.check(ckpt, overwrite, self.dist.is_main)
        device.say_notes(self.dtype_name)  # (a command said the device's at its start; Python code hears them here)

        self.model, self.memory = self._build_model(ckpt)
        # the config a checkpoint saves (and a resume holds to) names the model trained, not the preset's sizes
        self.cfg = cfg = replace(cfg, **{k: getattr(self.model.config, k) for k in MODEL_FIELDS if k != "init_from"})
        self.model.checkpoint_blocks = cfg.activation_checkpointing
        check_total_batch(cfg, self.dist.world, resuming=ckpt is not None)
        evaluations.check(cfg, self.model, self.memory.weights + self.memory.optimizer, self.dtype)
        if ckpt is not None:  # (a path given now, not the checkpoint's, is said missing as any is)
            saved = state["config"]
            if cfg.data == saved.get("data"):
                self._check_relative("data", "data directory", "DIR")
            if cfg.hellaswag_every and cfg.hellaswag_data and cfg.hellaswag_data == saved.get("hellaswag_data"):
                self._check_relative("hellaswag_data", "HellaSwag file", "FILE")
        # this rank's batches, grad_accum micro-batches of them a step (total_batch_size over all ranks)
        self.grad_accum = cfg.total_batch_size // (cfg.batch_size * cfg.seq_len * self.dist.world)
        self.train_loader = DataLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, self.dist.rank, self.dist.world,
                                       self.model.config.vocab_size, cfg.shuffle, cfg.seed)
        self.stops = Stops(self.dist)  # what asks train() to stop, and why
        self.evaluations = evaluations.Evaluations(cfg, self.model, self.dist, self.stops.ends_evaluation)

        self.optimizer = self.recipe.make_optimizer(cfg, self.dtype)
        # the optimizer updates float32 master weights, packed as its recipe groups them (build-nanogpt's: flat
        # buckets of decayed and of other tensors); the model computes from views of them, cast to its dtype
        params = self.model.trainable_parameters()
        self.packing = Packing(params, self.recipe.pack)
        self.master = {"params": self.packing.pack(tree_map(lambda p: p.astype(mx.float32), params))}
        self._use_master(self.dtype)
        self.optimizer.init(self.master["params"])
        self.step = 0
        if state is not None:
            self._load_state(ckpt, state)
            if self.step > cfg.max_steps:
                raise UserError(f"{ckpt} is at step {self.step}, beyond max_steps {cfg.max_steps}: nothing to train "
                                f"(pass a larger --max-steps)")
        # said and logged once, before the first step: where the run continues from, and what changed
        self._resume = resumed(ckpt, state, cfg) if state is not None else None
        self.threads = self._step_threads(self.model.config)
        self._build_steps()
        if self.dist.is_main:  # everything above has accepted the config (a refused run makes no OUT)
            state = tree_flatten([self.master, self.optimizer.state])  # what a checkpoint stores (float32)
            checkpoint.check_room(self.out, sum(a.nbytes for _, a in state), fresh=ckpt is None)
            self.run_dir.claim(ckpt)
        self.log = checkpoint.RunLog(self.out, self.step, self.dist.is_main)
        self.queue = steps.Queue(self.dist)  # the micro-steps queued on the device
        self._memory_cap = 0  # bytes MLX may use while training (cap_memory), once a step was measured
        self.result: dict[str, float] = {}  # latest train_loss, val_loss and hellaswag
        self._compute_state()
        self.run_dir.own(ckpt)

    def _compute_state(self) -> None:
        """The weights and optimizer state, computed in this thread: MLX's streams are per thread, and a notebook's
        thread that built or trained a Trainer must leave none of their work to its own stream."""
        mx.eval(self.master, self.optimizer.state, self.model.parameters())

    # -- setup
    def _build_model(self, ckpt: Path | None) -> tuple[GPT, memory.Estimate]:
        """The model to train and its step's memory estimate, checked to fit (memory.check)."""
        cfg = self.cfg

        rows, uneven = divmod(cfg.total_batch_size, cfg.seq_len * self.dist.world)  # a rank's, each step

        def fits(config: GPTConfig) -> memory.Estimate:
            if cfg.seq_len > config.block_size:  # first: the estimate of a huge seq_len took minutes (its T/128 blocks)
                raise UserError(f"seq_len {cfg.seq_len} exceeds the model's context (block_size) of "
                                f"{config.block_size}: give a seq_len (--seq-len) of at most {config.block_size}")
            self._step_threads(config)  # --threads that do not divide the batch are refused first
            return memory.check(config, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype=self.dtype_name,
                                checkpointing=cfg.activation_checkpointing, max_memory_gb=cfg.max_memory,
                                share=self.dist.local, threads=cfg.threads or device.step_threads(config.n_embd),
                                fixed_threads=bool(cfg.threads), rows=0 if uneven else rows,
                                batch_fixed=ckpt is not None, optimizer=self.recipe.memory(config))

        if ckpt is None and not cfg.init_from:
            config = model_config(cfg)
            estimate = fits(config)  # before building: a model far too large would take minutes to build
            return GPT(config, seed=cfg.seed), estimate
        model = checkpoint.read_model(ckpt) if ckpt is not None else load_model(cfg.init_from)
        self.recipe.check_model(model.config, str(ckpt or cfg.init_from))
        if ckpt is None and (ignored := ignored_shape(cfg, model.config)):  # (the CLI refuses them with --init-from)
            warn(f"init_from trains {cfg.init_from} in its own shape; {', '.join(ignored)} ignored (shape fields size "
                 "a random init)")
        if ckpt is not None and not cfg.init_from:  # (resume_config gives the checkpoint's; 0 is "the default")
            refuse_model_changes(ckpt, model.config, {k: getattr(cfg, k) for k in MODEL_FIELDS[1:] if getattr(cfg, k)},
                                 f"resume with its config, config.resume_config({str(self.out)!r})")
        model = model.grow_vocab(cfg.vocab_size) if cfg.vocab_size and ckpt is None else model
        return model, fits(model.config)

    def _check_relative(self, field: str, what: str, metavar: str) -> None:
        """Refuse a resumed run's relative path (config field `field`) that names nothing from here: the checkpoint's
        config names it relative to where the run started, another directory (a notebook's os.chdir)."""
        path = user_path(getattr(self.cfg, field))
        if not path.is_absolute() and not path.exists():
            option = "--" + field.replace("_", "-")
            raise UserError(f"{path}: no such {what} in {Path.cwd()}: the checkpoint's config names it relative to "
                            f"where the run started; resume from there, or pass {option} {metavar} (Python: "
                            f"resume_config(out, {field}={metavar}))")

    def _step_threads(self, config: GPTConfig) -> int:
        """The threads that split a micro-batch's rows (threads.py): cfg.threads, or the device's choice for the
        model, down to one that divides batch_size."""
        cfg = self.cfg
        if cfg.threads:
            if cfg.batch_size % cfg.threads:
                raise UserError(f"threads {cfg.threads} must divide batch_size {cfg.batch_size} (each takes as many "
                                f"rows); 0: the device's choice")
            return cfg.threads
        return memory.step_threads(cfg.batch_size, device.step_threads(config.n_embd), fixed=False)

    def _use_master(self, dtype: mx.Dtype) -> None:
        steps.use_master(self.model, self.packing, self.master, dtype)

    def _build_steps(self) -> None:
        """The compiled micro-steps (steps.py)."""
        self._accumulate, self._update = steps.compile_steps(
            self.model, self.optimizer, self.packing, self.master, self.dist, self.dtype, self.cfg.grad_clip,
            self.grad_accum, self.threads, self.cfg.compile)

    # -- checkpoints
    def _check_world(self, ckpt: Path, world: int) -> None:
        """Refuse to resume with another rank count (the batches each rank read would differ): before the config's
        checks, whose advice (a total_batch_size for this rank count) would not help."""
        if world != self.dist.world:
            raise UserError(f"{ckpt} was written by a run with {world} ranks; resume it with the same number, "
                            f"--ranks {world} (this run has {self.dist.world})")

    def _load_state(self, ckpt: Path, state: dict) -> None:
        saved = checkpoint.read_optimizer(ckpt, like=self.packing.unpack_state(self.optimizer.state))
        self.optimizer.state = self.packing.pack_state(saved, like=self.optimizer.state)
        try:
            self.train_loader.load_state_dict(state["train_loader"])
        except ValueError as e:
            raise checkpoint.damaged(ckpt, f"{checkpoint.STATE_FILE}: train_loader: {e}") from None
        self.step = state["step"]

    def save(self) -> Path:
        """Write OUT/ckpt-{step} with the float32 master weights (rank 0 only) and return its path."""
        written = checkpoint.checkpoint_dir(self.out, self.step)
        if not self.dist.is_main:
            return written
        self._check_whole()

        def said(by: str) -> None:  # (a save ended by a signal: written whole or not at all, checkpoint.write)
            if written.is_dir():
                self._say(f"stopped by {by}: saved {written} (step {self.step}); continue with {self._resume_hint()}")

        with self.stops.finishing_saves(said), self.run_dir.writing():
            self.log.sync()
            self._use_master(mx.float32)  # save the float32 masters, not a bf16 copy
            try:
                # the optimizer state per tensor, as the model's weights are stored, whatever the packing
                checkpoint.write(self.out, self.step, self.model, self.packing.unpack_state(self.optimizer.state), {
                    "step": self.step, "world": self.dist.world, "config": asdict(self.cfg),
                    "train_loader": self.train_loader.state_dict()})
            finally:
                self._use_master(self.dtype)
                if written.is_dir():  # also where OUT's model could not be pointed at it after (a full disk)
                    self.run_dir.saved(written)
                # the model's weights computed in this thread, as train() leaves them: left lazy on its stream, they
                # failed in any other thread ("There is no Stream"), and the Trainer took that for a broken step
                self._compute_state()
        return written

    def _unsaved(self) -> str:
        """A run that diverged (a NaN loss, NaN logits) ends without saving over its last good checkpoint: said."""
        return f"stopped without saving ({checkpoint.kept(self.out, 'once its cause is found')})"

    def _save_before_failing(self, save: bool = True) -> None:
        """An evaluation failed (a download, a kernel that cannot compile): save the steps since the last checkpoint
        (unless not to `save`) before its error ends the run. Nothing is queued during an evaluation, so the weights
        are whole. Where the ranks agreed on the failure (Evaluations.failure_agreed), the others wait for rank 0's
        save: a failed rank that ended at once would have it stopped mid-save (a launcher stops the rest of a group
        that cannot finish)."""
        agreed, self.evaluations.failure_agreed = self.evaluations.failure_agreed, False
        try:
            if save and self.dist.is_main and self.step != self.run_dir.saved_step:
                with self.stops.finishing_saves():  # and saying so
                    path = self.save()
                    self._say(f"evaluation failed: saved {path} (step {self.step}); continue with "
                              f"{self._resume_hint()} once its cause is fixed")
        except UserError as e:  # the evaluation's error is the one to show
            warn(f"could not save the steps since the last checkpoint: {e}")
        finally:
            if agreed:
                with contextlib.suppress(UserError):  # a rank lost meanwhile: the evaluation's error still shows
                    self.dist.barrier(at_least=signals.SAVE_WAIT)

    # -- evaluation (evaluations.py)
    def val_loss(self) -> float:
        """The model's val loss now (Evaluations.val_loss)."""
        return self.evaluations.val_loss()

    def samples(self) -> list[str]:
        """Samples of the model now, seeded by this step (Evaluations.samples)."""
        return self.evaluations.samples(self.step)

    def hellaswag(self) -> float:
        """The model's HellaSwag acc_norm now (Evaluations.hellaswag)."""
        return self.evaluations.hellaswag()

    def _evaluate(self) -> None:
        """The evaluations due before step self.step. A stop request ends them (raising StopEvaluating; several
        ranks, where they agree on it): they change no weights, so the checkpoint of this step is as good, and a
        resumed run evaluates again."""
        due, step = self.evaluations.due, self.step
        if due("val", step):
            loss = self.result["val_loss"] = self.stops.interruptible(self.val_loss)
            self._say(f"step {step:5d} | val loss {loss:.4f}")
            self.log.metric(step, "val", loss)
        if due("hellaswag", step):
            acc = self.result["hellaswag"] = self.stops.interruptible(self.hellaswag)
            self._say(f"step {step:5d} | hellaswag {acc:.4f}")
            self.log.metric(step, "hella", acc)
        if due("samples", step):
            texts = self.stops.interruptible(self.samples)
            for i, t in enumerate(texts):
                self._say(f"sample {i}: {t!r}")
            self.log.event(step, "sample", texts=texts)

    # -- training
    def _say(self, line: str) -> None:
        """A line on stdout (rank 0). If stdout is gone, its reader ended (`| head`, a `| tee` ended by Ctrl-C) or
        its terminal closed, the run stops as on Ctrl-C, saving; later lines go to stderr, while it lasts."""
        if not self.dist.is_main:
            return
        try:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()  # now: into a pipe, a buffer's worth of steps would run before a write failed
        except OSError as e:  # EPIPE, or EIO from a closed terminal; or stdout's file on a full disk
            devnull_onto(sys.stdout.fileno())  # Python's own flush at exit fails no more
            sys.stdout = sys.stderr
            # not the reader's choice: a full or read-only disk, or a stdout closed at start (`>&-`, console.py)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EBADF):
                fix = "give it a stdout" if e.errno == errno.EBADF else "make room for the output"
                self.stops.request((f"stdout: cannot write ({e.strerror})", fix))
            else:  # its reader ended: as Ctrl-C
                self.stops.request()
            say(line)

    def _start_step(self, step: int) -> steps.Step | None:
        """Queue optimizer step `step`'s micro-steps on the device (steps.Queue) and return it unfinished; None if a
        stop was requested before all of it was queued (nothing applied, the batches it read will be read again).

        Several ranks must stop at the same step (or the others wait in a collective), so they agree
        on it once per step, after reading the step's batches: a shard one of them cannot read stops them all
        before any reaches the step's all-reduce (hosts' copies of the shards may differ). A single process can
        stop between micro-steps.
        """
        t0, loader_state = time.perf_counter(), self.train_loader.state_dict()
        batches = self._read_batches()
        if self.stops.agreed():
            self.train_loader.load_state_dict(loader_state)  # the batches read are read again
            return None
        self.recipe.set_step(self.optimizer, step, self.cfg)
        grads, losses = None, []
        for micro, (x, y) in enumerate(batches):
            if self.stops.now:
                self.train_loader.load_state_dict(loader_state)
                return None
            if micro < self.grad_accum - 1:
                loss, grads = self._accumulate(x, y, grads)
                losses.append(loss)
                self.queue.put(loss, grads)
            else:
                loss, norm = self._update(x, y, grads)
                losses.append(loss)
                queued = steps.Step(step, self.recipe.lr(step, self.cfg), t0, sum(losses), norm)
                self.queue.put(loss, norm, self.model.state, self.optimizer.state, ends=queued)
        return queued

    def _read_batches(self) -> list[tuple[mx.array, mx.array]]:
        """The step's grad_accum micro-batches; none where a shard cannot be read (bad tokens, gone, replaced,
        reached mid-run): then a stop is requested, as Ctrl-C does, saving what was trained."""
        batches = []
        for _ in range(self.grad_accum):
            try:
                batches.append(tuple(mx.array(a) for a in self.train_loader.next_batch()))
            except UserError as e:
                self.stops.request((str(e), "repair that shard (its length stays)"))
                return []
        return batches

    def _queue_ahead(self, step: int, end: int) -> bool:
        """Whether step `step` may be built before the one before it is finished: not when something must see the
        weights between them (an evaluation or a checkpoint), after the end, once a stop was requested, or behind
        the step measured op by op (cap_memory); not with several ranks, whose collectives must come in the
        same order on all of them (and which wait for every micro-step under a watchdog anyway); nor with step
        threads, which compute a micro-step before returning (threads.py): queued ahead, a step would wait for
        the one before it in them, its time counted as its own."""
        cfg = self.cfg
        if self.dist.world > 1 or self._measuring() or self.threads > 1:
            return False
        saves = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        return step < end and not (self.evaluations.any_due(step) or saves or self.stops.requested)

    def _measuring(self) -> bool:
        """Whether the next step runs op by op to measure what a step needs (cap_memory)."""
        return self.cfg.cap_memory and not self._memory_cap

    def _cap_memory(self) -> None:
        """Cap MLX's memory just above what the step just run op by op needed (memory.cap)."""
        need, self._memory_cap = memory.cap(self.cfg.max_memory)
        self._say(f"memory: a step needs {size(need)} (measured op by op); MLX's memory is capped at "
                  f"{size(self._memory_cap)} while training")
        if self._memory_cap < need:
            warn(f"the step needs {size(need)}, more than --max-memory {self.cfg.max_memory:g} GB: MLX will "
                 "wait for queued work at nearly every op")
        self.log.event(self.step, "memory", need=need, cap=self._memory_cap)

    def train(self, until: int | None = None) -> dict:
        """Run from self.step to max_steps (or to step `until`, then save); returns the latest train/val
        losses. Ctrl-C, SIGTERM and SIGHUP save after the step in progress (at once during an evaluation, in a single
        process) and raise errors.Stopped (a KeyboardInterrupt); a NaN/inf loss raises UserError, saving nothing."""
        # "3" was a TypeError, 2.5 trained to 3; NumPy's integers are taken (a bool is no step)
        if until is not None and (not isinstance(until, numbers.Integral) or isinstance(until, bool) or until < 0):
            raise UserError(f"until must be a step number (an integer >= 0), got {until!r}")
        until = None if until is None else int(until)
        if until is not None and until < self.step:
            raise UserError(f"until {until} is behind this Trainer's step {self.step}")
        if until is not None and until > self.cfg.max_steps:  # (trained to max_steps, it looked done to `until`)
            raise UserError(f"until {until} is past max_steps {self.cfg.max_steps}, where the LR schedule ends: "
                            "resume with a larger one (Trainer(replace(cfg, max_steps=N), resume=True))")
        # a finished run resumed trains nothing, and saves to publish its model (after a save that could not); the
        # fields changed would be saved too, for a later resume to take, though they changed nothing
        if self.step >= self.cfg.max_steps and self._resume and self._resume["changed"]:
            raise UserError(f"nothing to train: {self.out} is at step {self.step}, its max_steps, and the changes "
                            f"({', '.join(self._resume['changed'])}) would only be saved; pass a larger --max-steps "
                            "(Python: max_steps)")
        self._check_whole()
        self.run_dir.check_newest()
        with self.run_dir.training():  # (a notebook's thread may be in train() still)
            self._claim_for_training()
            self.stops.clear()  # an earlier train()'s stop request was answered by its end
            self._failed_evaluating = self.evaluations.failure_agreed = False
            try:
                self.log.restart(self.step)  # before any step: its failure leaves this Trainer whole
                try:
                    result = self._train(until)
                except (Stopped, _SavedStop):  # saved: whole, train() continues
                    raise
                except BaseException as e:  # a second Ctrl-C, a NaN, a failed save or read: maybe a step half applied
                    if not self._failed_evaluating:
                        self._broken = first_line(e) or type(e).__name__
                    raise
            finally:
                if self.dist.is_main:
                    self.run_dir.unlock()  # another process may write OUT now
                if not self._broken:
                    self._compute_state()
        return result

    def _resume_hint(self) -> str:
        """How to continue this run: --resume OUT, on as many ranks (a resume on another number is refused)."""
        ranks = f" on the same {self.dist.world} ranks" if self.dist.world > 1 else ""
        return f"--resume {shell_word(self.out)}{ranks}"

    def _check_whole(self) -> None:
        """Refuse to train or save after train() stopped amid a step: its weights, step and data position may
        disagree (a NaN's weights, a batch read and not trained)."""
        if self._broken:
            raise UserError(f"this Trainer stopped amid a step ({self._broken}): its weights, step and data position "
                            f"may disagree; continue from {self.out}'s last checkpoint with Trainer(cfg, resume=True)")

    def _claim_for_training(self) -> None:
        """Lock OUT (rank 0) until train() ends, checked to be this Trainer's still before its log is cut back to
        this step. Where rank 0 cannot, every rank stops: the others would wait for it in their first collective."""
        refusal = None
        if self.dist.is_main:
            try:
                self.run_dir.hold()  # again, if an earlier train() ended
                self.run_dir.check_latest()
            except UserError as e:
                self.run_dir.unlock()
                refusal = e
        if self.dist.world > 1 and self.dist.sum(float(refusal is not None)) > 0:
            raise refusal or UserError(f"rank 0 cannot train in {self.out} now (its error says why)")
        if refusal is not None:
            raise refusal

    @contextlib.contextmanager
    def _training(self) -> Iterator[tqdm]:
        """While steps run and the last is saved: a progress bar, MLX's memory capped (--max-memory, or the measured
        cap), and Ctrl-C saving. SIGTERM (kill, a scheduler) and SIGHUP save too: with several ranks, one that a
        rank gets is a stop that the ranks agree on, as a Ctrl-C is (a scheduler signals every rank at once; the
        launcher ends the rest of a failed group with signals.GROUP_END instead)."""
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=bar_off(self.dist.is_main), dynamic_ncols=True)
        limit_before = mx.get_memory_limit()
        if self._memory_cap or self.cfg.max_memory:
            mx.set_memory_limit(self._memory_cap or int(self.cfg.max_memory * 1e9))
        try:
            with self.stops.handled():
                yield bar
        finally:
            bar.close()
            mx.set_memory_limit(limit_before)

    def _train(self, until: int | None) -> dict:
        cfg = self.cfg
        end = cfg.max_steps if until is None else until
        n_params = self.model.num_params()
        tokens_per_step = cfg.batch_size * cfg.seq_len * self.grad_accum * self.dist.world
        flops_per_token = 6 * self.model.num_params(non_embedding=True) + \
            12 * self.model.config.n_layer * self.model.config.n_embd * cfg.seq_len
        peak = device.mfu_peak(self.dtype_name)  # this rank's device; MFU is against all ranks' together
        c = self.model.config
        self._say(f"model {n_params / 1e6:.2f}M params (L{c.n_layer} H{c.n_head} C{c.n_embd} T{c.block_size} "
                  f"V{c.vocab_size}) | recipe {self.recipe.name} | {self.dist.world} rank(s) | "
                  f"{tokens_per_step} tokens/step = {self.dist.world} x {self.grad_accum} x {cfg.batch_size} x "
                  f"{cfg.seq_len} | steps {self.step}..{cfg.max_steps} | {device.PROFILE.name} {self.dtype_name} | "
                  f"peak {peak / 1e9:.0f} GFLOP/s a rank | memory ~{size(self.memory.total)} estimated")
        notes = [resume_line(self.step, self._resume) if self._resume else "",
                 device.PROFILE.attention_note(self.dtype_name, c.n_embd // c.n_head, cfg.seq_len), unread(cfg),
                 foreign_defaults(cfg)]
        if self._resume:
            self.log.event(self.step, "resume", **self._resume)
            self._resume = None  # (not again at a later train())
        if cfg.warmup_steps >= cfg.max_steps:  # e.g. a short run that kept build-nanogpt's 715 warmup steps
            notes.append(f"warmup_steps {cfg.warmup_steps} is not below max_steps {cfg.max_steps}: the LR rises for "
                         "the whole run and never decays (--warmup-steps)")
        if "momentum_warmup" in self.recipe.own and cfg.momentum_warmup >= cfg.max_steps:  # the speedrun's 300
            notes.append(f"momentum_warmup {cfg.momentum_warmup} is not below max_steps {cfg.max_steps}: Muon's "
                         "momentum rises for the whole run and never reaches 0.95 (--momentum-warmup)")
        for note in filter(None, notes):
            self._say(f"note: {note}")
        with self._training() as bar:
            queued = None
            while self.step < end:  # a stop request ends it before a step (Stops.agreed: ranks agree on it)
                if queued is None:
                    # not into minutes of evaluation (ranks agree on it; without an evaluation _start_step's
                    # agreement is the step's one)
                    if self.evaluations.any_due(self.step) and self.stops.agreed():
                        break
                    try:
                        self._evaluate()
                    except StopEvaluating:
                        self.stops.agreed()  # (several ranks, all stopped at one poll: on the signal too)
                        break
                    except Overflow as e:  # as a NaN loss: the model diverged, and is not saved over the last good one
                        self._save_before_failing(save=False)
                        self._failed_evaluating = True
                        raise UserError(f"step {self.step}: {e}; {self._unsaved()}") from None
                    except Exception:
                        self._save_before_failing()
                        self._failed_evaluating = True  # between steps: whole, this Trainer may train again
                        raise
                    if self._measuring():
                        memory.start_measuring()
                    queued = self._start_step(self.step)
                    if queued is None:  # interrupted before the step was queued
                        break
                # the next step's graph is built while the device runs this one, and queued behind it, unless
                # something must see the weights in between
                ahead = self._start_step(self.step + 1) if self._queue_ahead(self.step + 1, end) else None
                loss, norm, dt = self.queue.finish(queued)
                if self._measuring():
                    self._cap_memory()
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise UserError(f"step {self.step}: loss {loss} / grad norm {norm} is not finite; "
                                    f"{self._unsaved()}")
                tps = tokens_per_step / dt
                mfu = flops_per_token * tps / (peak * self.dist.world)
                lr = queued.lr
                self._say(f"step {self.step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                          f"dt {dt * 1000:.2f}ms | tok/s {tps:.0f} | MFU {100 * mfu:.1f}%")
                self.log.metric(self.step, "train", loss, lr=lr, norm=norm, dt=dt, tok_per_s=tps, mfu=mfu)
                self.result["train_loss"] = loss
                self.step += 1
                bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                    # the others wait for rank 0's save at a barrier that allows for it, not in the next step's first
                    # collective, whose limit (NANOGPT_MLX_DIST_TIMEOUT) is a step's
                    self.dist.barrier(at_least=signals.SAVE_WAIT)
                queued = ahead
            if self.stops.by is not None and self.step < end:  # (not a signal that came in the last step)
                self._say(self.stops.saving_line())
            path = self.save()  # under the handlers too: a Ctrl-C during this save lets it finish
            # the other ranks wait for rank 0's save: a rank's stop (status 130) would end the others (launch.py),
            # rank 0 amid its save
            self.dist.barrier(at_least=signals.SAVE_WAIT)
        if self.stops.error is not None:
            why, fix = self.stops.error
            raise _SavedStop(f"{why}; saved {path} (step {self.step}): {fix}, then {self._resume_hint()}")
        if self.step < end:  # stopped by a signal, or by stdout's reader ending (as Ctrl-C)
            self._say(f"interrupted: saved {path} (step {self.step}); continue with {self._resume_hint()}")
            raise self.stops.stopped(f"saved {path} (step {self.step}); train() again continues")
        return dict(self.result)  # the caller's: a later train() changes self.result
