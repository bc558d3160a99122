"""`python -m nanogpt_mlx COMMAND ...`: the `nanogpt-mlx` command, e.g. for `mlx.launch ... -m nanogpt_mlx train`."""

import sys

from .cli import command

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports this module in a worker
    sys.exit(command())
