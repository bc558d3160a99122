"""What a training run evaluates every so many steps, as build-nanogpt's loop does: the val loss, HellaSwag's
acc_norm and samples (evaluate.py and sample.py compute them), each at its interval and at the last step, split
over the ranks, which agree on whether one of them failed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

import mlx.core as mx

from . import memory
from .config import TrainConfig
from .console import PEER_FAILED, warn
from .data import DataLoader, NoBatch
from .distributed import Dist
from .errors import UserError
from .evaluate import check_examples, download_hellaswag, load_hellaswag, loader_loss, score_hellaswag
from .model import GPT, GPT2_VOCAB_SIZE
from .sample import SampleConfig, prepare_prompt, sample_texts
from .stops import StopEvaluating
from .tokenizer import encode

_T = TypeVar("_T")
EVALUATION_WAIT = 24 * 3600.0  # seconds a rank whose evaluation failed waits for the others' (HellaSwag's: hours)
POLLS = 32  # times the ranks agree amid an evaluation on whether to go on (_Polls): a stop waits for 1/POLLS of it
KINDS = ("val", "hellaswag", "samples")  # in the order they run


def check(cfg: TrainConfig, model: GPT, held: int, dtype: mx.Dtype) -> None:
    """Refuse evaluations that cannot run on `model`, before anything is read: samples that would not fit beside
    `held` bytes of weights and optimizer state, HellaSwag on a model without GPT-2's tokens."""
    if cfg.sample_every and cfg.num_samples:
        try:
            ids = prepare_prompt(model, encode(cfg.prompt, special=True), sample_config(cfg, 0))
            # beside the weights and the optimizer's state: refused at the first samples, steps after the start
            memory.check_sampling(model.config, cfg.num_samples, len(ids), cfg.sample_tokens, held, dtype.size)
        except UserError as e:
            raise UserError(f"samples: {e} (sample_every 0 turns them off)") from None
    if cfg.hellaswag_every and model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"HellaSwag needs GPT-2's {GPT2_VOCAB_SIZE} tokens; this model has vocab_size "
                        f"{model.config.vocab_size} (set hellaswag_every to 0)")


def sample_config(cfg: TrainConfig, step: int) -> SampleConfig:
    """build-nanogpt's top-k 50, seeded by the step; a prompt longer than the context leaves keeps its end."""
    return SampleConfig(max_new_tokens=cfg.sample_tokens, top_k=50, seed=(cfg.seed + step) % 2**64, crop=True)


class Evaluations:
    """A run's evaluations of `model` (checked first: check), their data read before it trains: a wrong path or a
    failed download stops a resumed run (or one whose first evaluation comes late) before it trains, not after."""

    def __init__(self, cfg: TrainConfig, model: GPT, dist: Dist, stop: Callable[[], bool] = lambda: False):
        """`stop()`: whether a stop was requested of this rank that ends an evaluation in progress (several ranks
        agree on it amid their evaluation: _rank_part)."""
        self.cfg, self.model, self.dist, self.stop = cfg, model, dist, stop
        self.failure_agreed = False  # whether the ranks agreed that an evaluation failed (_rank_part)
        self._hellaswag = load_hellaswag(
            cfg.hellaswag_data or download_hellaswag(progress=dist.is_main, local_option="--hellaswag-data",
                                                     python="TrainConfig(hellaswag_data=FILE)"),
            limit=cfg.hellaswag_limit or None) if cfg.hellaswag_every else None
        # their tokens and rows fit the model, checked before it trains, and tokenized once for every evaluation
        self._hellaswag_tokens = check_examples(model, self._hellaswag) if self._hellaswag else None
        world = dist.world
        try:
            self.val_loader = DataLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, dist.rank, world,
                                         model.config.vocab_size) if cfg.val_every else None
        except NoBatch as e:  # a small dataset's val split, which training's batch may not fit
            raise NoBatch(f"{e}; val_every 0 (--val-every 0) turns validation off") from None
        self.val_steps = self.val_loader.within_one_pass(cfg.val_steps) if self.val_loader else 0
        if self.val_loader and self.val_steps < cfg.val_steps:  # past one pass: repeated batches
            warn(f"val_steps {cfg.val_steps} is more than the val split holds: validating on all its "
                 f"{self.val_steps * world} batches" + (f" ({self.val_steps} a rank)" if world > 1 else ""))
        loss = partial(model.loss, grad=False)
        self._loss = mx.compile(loss, inputs=model.state) if cfg.compile else loss

    def due(self, kind: str, step: int) -> bool:
        """Whether evaluation `kind` (of KINDS) runs before step `step`: every so many steps (0: never) and before
        the last; samples not at step 0 (the random init's), unless it is the last."""
        cfg = self.cfg
        every = {"val": cfg.val_every, "hellaswag": cfg.hellaswag_every, "samples": cfg.sample_every}[kind]
        if kind == "samples" and not (cfg.num_samples and (step > 0 or step == cfg.max_steps - 1)):
            return False
        return bool(every) and (step % every == 0 or step == cfg.max_steps - 1)

    def any_due(self, step: int) -> bool:
        """Whether any evaluation runs before step `step` (the Trainer's queue-ahead and stop agreement ask: all ranks
        answer alike, from the config)."""
        return any(self.due(kind, step) for kind in KINDS)

    def val_loss(self) -> float:
        """Mean loss over val_steps batches (at most the split's) from the start of the val split (build-nanogpt)."""
        if self.val_loader is None:
            raise UserError("no val batches: a Trainer reads the val split only when val_every is set")
        return self.dist.mean(self._rank_part(
            lambda after: loader_loss(self.model, self.val_loader, self.val_steps, loss=self._loss, after_batch=after)))

    def samples(self, step: int) -> list[str]:
        cfg = self.cfg
        return self._rank_part(lambda after: sample_texts(self.model, cfg.prompt, sample_config(cfg, step),
                                                          cfg.num_samples), polls=1)  # (seconds: no stop amid them)

    def hellaswag(self) -> float:
        """acc_norm over the HellaSwag examples, split across ranks with the counts summed (build-nanogpt)."""
        if self._hellaswag is None:
            raise UserError("no HellaSwag examples: a Trainer loads them at start when hellaswag_every is set")
        r = self._rank_part(lambda after: score_hellaswag(self.model, self._hellaswag, rank=self.dist.rank,
                                                          world=self.dist.world, progress=False,
                                                          rendered=self._hellaswag_tokens, after_batch=after))
        return self.dist.sum(r.num_correct_norm) / self.dist.sum(r.num_total)

    def _rank_part(self, part: Callable[..., _T], polls: int = POLLS) -> _T:
        """part(after_batch), this rank's share of an evaluation, amid which the ranks agree `polls` times
        (_Polls) on whether to go on: a stop request ends it on every rank (StopEvaluating), a failed part on any
        makes every rank raise (its own error, or that another rank's part failed), and the Trainer has them wait
        for rank 0's save (failure_agreed). Without that agreement the others met the failed rank's end in their
        next collective, or waited for the end of an evaluation (HellaSwag's: minutes) to stop."""
        if self.dist.world == 1:  # (a single process's stop request ends the evaluation from its signal handler)
            return part(None)
        agreement = _Polls(self.dist, polls, self.stop)
        error = None
        try:
            value = part(agreement.after_batch)
        except StopEvaluating:  # (agreed: every rank raises it at the same poll)
            raise
        except Exception as e:
            if agreement.lost:  # a poll's own collective failed: no agreement to make
                raise
            error = e
        if agreement.finish(failed=error is not None) == "failed":
            self.failure_agreed = True
            raise error or agreement.peer_failed()
        return value


class _Polls:
    """The points of a rank's share of an evaluation where the ranks agree on going on: where it passes each
    1/polls of its share, however its batches fall, so that every rank makes the same collectives (the shares
    differ), and those left once it ended (ranks with fewer batches or a failed part wait there for the others),
    the last of them after every rank's share ended."""

    def __init__(self, dist: Dist, polls: int, stop: Callable[[], bool]):
        self.dist, self.polls, self.stop = dist, polls, stop
        self.made = 0
        self.lost = False  # whether a poll's collective failed (a rank lost)
        self.outcome: str | None = None  # what the ranks agreed on: "stop", "failed", or None to go on

    def after_batch(self, done: int, total: int) -> None:
        """After a batch of this rank's share: `done` items of `total`. Raises StopEvaluating on an agreed stop, or
        UserError if another rank's part failed."""
        while self.outcome is None and self.made < self.polls - 1 and done * self.polls >= (self.made + 1) * total:
            self._poll(failed=False)
        if self.outcome == "stop":
            raise StopEvaluating
        if self.outcome == "failed":
            raise self.peer_failed()

    def finish(self, failed: bool) -> str | None:
        """The polls left once this rank's part ended (`failed`: by an error): what the ranks agreed on."""
        while self.outcome is None and self.made < self.polls:
            self._poll(failed)
        if self.outcome == "stop":
            raise StopEvaluating
        return self.outcome

    def peer_failed(self) -> UserError:
        return UserError(f"rank {self.dist.rank}: stopping: the evaluation {PEER_FAILED}")

    def _poll(self, failed: bool) -> None:
        self.made += 1
        world = self.dist.world  # a failure counts more than every rank's stop request together
        try:  # a failed rank waits for the others' parts (HellaSwag's: hours on a CPU)
            total = self.dist.sum((world + 1.0) if failed else float(self.stop()),
                                  at_least=EVALUATION_WAIT if failed else 0.0)
        except UserError:  # (Dist.sync's: a rank lost)
            self.lost = True
            raise
        if total:  # (every rank alike: no more polls)
            self.outcome = "failed" if total > world else "stop"
