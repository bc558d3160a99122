"""A file fetched from a URL into the cache once: atomically, with a progress bar, and any failure one line that says
the offline way in (Tiny Shakespeare, HellaSwag; the hub's models: hub.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .console import bar_off
from .errors import UserError
from .files import atomic_path


def download(url: str, dest: Path, what: str, hint: str, progress: bool = True,
             check: Callable[[Path], object] | None = None) -> Path:
    """Fetch `url` into `dest` once (atomically, with a progress bar) and return `dest`.

    Any failure (offline, HTTP error, a body cut off before Content-Length, or a body that `check` refuses with a
    UserError, such as a proxy's error page) is one UserError naming `what` and ending with `hint`, the offline way
    in; nothing is kept then.
    """
    import http.client
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, atomic_path(dest) as tmp, open(tmp, "wb") as f:
            size, done = int(resp.headers.get("Content-Length") or 0) or None, 0
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name,
                      disable=bar_off(progress)) as bar:
                while chunk := resp.read(1 << 16):
                    done += f.write(chunk)
                    bar.update(len(chunk))
            if size is not None and done != size:  # urllib ends a cut-off body quietly
                raise UserError(f"download of {url} was cut off after {done} of {size} bytes; {hint}")
            f.flush()
            if check is not None:
                try:
                    check(tmp)
                except UserError as e:
                    raise UserError(f"{url} did not send {what} ({str(e).replace(str(tmp), 'the download')}); "
                                    f"{hint}") from None
    except urllib.error.HTTPError as e:
        raise UserError(f"could not download {what} from {url} (HTTP {e.code} {e.reason}); {hint}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, cut-off bodies
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        raise UserError(f"could not download {what} from {url} ({reason}); {hint}") from None
    return dest
