"""The command line's parsing: a parser that says a bad argument in one line, and the argument types and options
that the commands (cli.py) and the benchmarks share."""

from __future__ import annotations

import argparse
import sys

from . import device


class Parser(argparse.ArgumentParser):
    """argparse, but bad arguments give one line on stderr instead of usage + error, and no option is
    abbreviated (`--min-lr` must not quietly mean `--min-lr-ratio`). Subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, but an option of a COMMAND (SOURCE, TASK) given before one is said so: argparse took the
        option's value for the COMMAND ("invalid choice: 'out/run'"), or asked for a COMMAND where none was given
        (`prepare --inspect DIR --out O`)."""
        args = sys.argv[1:] if args is None else list(args)
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        value = False  # whether `arg` is the value of the option before it (`--inspect shakespeare`)
        for arg in args if sub else ():
            if value:
                value = False
                continue
            if arg in sub.choices or arg == "--":
                break
            option = arg.split("=", 1)[0]
            if option in self._option_string_actions:
                value = "=" not in arg and self._option_string_actions[option].nargs is None
            elif option.startswith("-"):
                if not _known_below(sub, option):
                    self.error(f"unrecognized arguments: {arg}")
                self.error(f"{option} is an option of a {sub.metavar}: it goes after one ({self.prog} {sub.metavar} "
                           f"... {option} ...)")
        return super().parse_known_args(args, namespace)

    def _print_message(self, message: str, file=None) -> None:
        if message:  # argparse's own drops a write error: `--help > /dev/full` exited 0 with nothing written
            (file or sys.stderr).write(message)


def _known_below(sub: argparse._SubParsersAction, option: str) -> bool:
    """Whether a command of `sub` (or a command of one of them) takes `option`."""
    return any(option in p._option_string_actions or any(_known_below(a, option) for a in p._actions
                                                         if isinstance(a, argparse._SubParsersAction))
               for p in sub.choices.values())


def _int_from(s: str, low: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def positive_int(s: str) -> int:
    return _int_from(s, 1)


def non_negative_int(s: str) -> int:
    return _int_from(s, 0)


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def positive_float(s: str) -> float:
    v = _float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def temperature(s: str) -> float:
    """> 0, or 0 (the argmax) with --greedy (cmd_sample)."""
    v = _float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or 0 with --greedy), got {v}")
    return v


def probability(s: str) -> float:
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def add_dtype(p, what: str = "the model's weights and computation: bfloat16 holds half the memory and is a GPU's "
                             "fast path, float32 is the CPU's and what transformers loads GPT-2 in",
              default: str | None = None) -> None:
    """--dtype of a command that loads a model; by default the device profile's (device.py)."""
    from .model import DTYPES

    chosen = f"{device.PROFILE.dtype}, the {device.PROFILE.name} profile's" if default is None else default
    p.add_argument("--dtype", choices=list(DTYPES), default=default or device.PROFILE.dtype,
                   help=f"{what} (default: {chosen})")


def preset_defaults(name: str, presets: dict) -> str:
    """A field's default in each preset, presets with the same value together: `default: 16` where all agree,
    else e.g. `gpt2-124m, speedrun-124m: 12; shakespeare, shakespeare-speedrun: 4`."""
    by_value: dict[str, list[str]] = {}
    for preset, cfg in presets.items():
        value = getattr(cfg, name)
        by_value.setdefault("unset" if value is None else repr(value), []).append(preset)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())
