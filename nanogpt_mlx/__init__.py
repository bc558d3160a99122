"""GPT-2 training, sampling and evaluation in MLX (build-nanogpt, ported)."""

from . import signals

signals.quiet_start()  # (the command's imports: a Ctrl-C there needs no traceback)

from . import device  # noqa: E402

try:
    device.setup()  # must run before anything imports mlx.core (the CPU profiles load OpenBLAS first)
except ImportError as e:
    if "libmlx" not in str(e):
        raise
    raise ImportError(f"MLX is installed without its library ({e}): on Linux install nanogpt-mlx[cpu], or "
                      "nanogpt-mlx[cuda] for NVIDIA GPUs (pip install 'mlx[cpu]' or 'mlx[cuda]')") from None

from .errors import UserError  # noqa: E402
from .model import GPT, GPTConfig  # noqa: E402

__all__ = ["GPT", "GPTConfig", "UserError"]
__version__ = "0.1.0"
