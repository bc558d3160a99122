"""The one exception type that the CLI turns into a one-line message, and how other errors become one line."""

import numbers
import signal
import sys
from dataclasses import Field, fields


class UserError(Exception):
    """Bad input or environment: shown to the user as one line, without a traceback."""


class Stopped(KeyboardInterrupt):
    """A run that a signal stopped after saving: the CLI exits with the status a shell reports for that signal.
    Its text names the signal and what was `saved`, for a notebook (a bare signal number said neither)."""

    def __init__(self, signum: int, saved: str = ""):
        super().__init__(signum, saved)
        self.status = 128 + signum
        self.saved = saved

    def __str__(self) -> str:
        try:
            name = "Ctrl-C" if self.args[0] == signal.SIGINT else signal.Signals(self.args[0]).name
        except ValueError:
            name = f"signal {self.args[0]}"
        return f"stopped by {name}" + (f": {self.saved}" if self.saved else "")


class Overflow(UserError):
    """A model's logits came out NaN or inf: a diverged or damaged model (GPT.overflowed)."""


class FieldTypeError(UserError):
    """A config field holds a value of another type than its annotation's (check_types)."""


def field_kind(f: Field) -> tuple[str, bool]:
    """A dataclass field's annotated type by name (`int`, `float`, `str`, `bool`...) and whether None is allowed."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return annotation.removesuffix(" | None"), annotation.endswith(" | None")


def check_types(config) -> None:
    """Refuse (FieldTypeError) a dataclass field whose value is not of its annotated type, `int`, `float` (an int
    too), `str` or `bool`, or None where the annotation allows it: a "2" or 2.5 would fail far from its cause.
    NumPy's scalars (a sweep over `np.arange`, `np.float32`, `np.bool_`) become Python's: configs go into JSON."""
    bools = (bool, _np_bool())
    kinds = {"int": (numbers.Integral, int, "an integer"), "float": (numbers.Real, _number, "a number"),
             "str": (str, str, "a string"), "bool": (bools, bool, "true or false")}
    for f in fields(config):
        value, (kind, optional) = getattr(config, f.name), field_kind(f)
        if (value is None and optional) or kind not in kinds:
            continue
        accepted, python, said = kinds[kind]
        if not isinstance(value, accepted) or isinstance(value, bools) != (kind == "bool"):
            raise FieldTypeError(f"{f.name} must be {said}, got {value!r}")
        if type(converted := python(value)) is not type(value):
            object.__setattr__(config, f.name, converted)  # (frozen dataclasses too)


def _number(value: numbers.Real) -> int | float:
    """A float field's value as Python's: an int stays an int (JSON writes 3, not 3.0)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _np_bool() -> type:
    """NumPy's bool type, or bool where NumPy is not imported (a comparison's np.True_ is no numbers.Integral)."""
    numpy = sys.modules.get("numpy")
    return numpy.bool_ if numpy is not None else bool


def check_fields(config_class: type, names) -> None:
    """Refuse (UserError) names that are no field of the dataclass `config_class` (a preset's overrides): replace's
    TypeError would not say which fields there are."""
    unknown = sorted(set(names) - {f.name for f in fields(config_class)})
    if unknown:
        raise UserError(f"{config_class.__name__} has no field {', '.join(unknown)}")


def check_int(name: str, value, low: int | None = 1) -> None:
    """Refuse (UserError) an argument that is no integer (nor a bool: True is no count) or is below `low` (None: any
    integer): a 2.5 or "2" would fail far from its cause, as a TypeError, or be rounded."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # (NumPy's integers are Integral)
        raise UserError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")


def check_bool(name: str, value) -> None:
    """Refuse (UserError) an argument that is no bool: "no", 1 or None would be taken for true or false. NumPy's
    np.bool_ (a comparison's np.True_) is one; a caller that keeps the value makes it Python's (JSON)."""
    if not isinstance(value, (bool, _np_bool())):
        raise UserError(f"{name} must be True or False, got {value!r}")


def check_seed(name: str, value) -> None:
    """Refuse (UserError) a seed that is no integer in [0, 2^64): mx.random.key takes a uint64, and failed inside."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise UserError(f"{name} must be an integer in [0, 2^64), got {value!r}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
