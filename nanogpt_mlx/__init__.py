"""GPT-2 training, sampling and evaluation in MLX (build-nanogpt, ported)."""

from . import device

device.setup()  # must run before anything imports mlx.core (the CPU profiles load OpenBLAS first)

from .errors import UserError  # noqa: E402
from .model import GPT, GPTConfig  # noqa: E402

__all__ = ["GPT", "GPTConfig", "UserError"]
__version__ = "0.1.0"
