"""The Hugging Face hub: a model's config.json and safetensors weights fetched into its cache (or found there),
failing in seconds where the hub cannot be reached. Pickled weights are never fetched (weights.py refuses them)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from .console import quiet
from .errors import UserError, first_line
from .files import read_json

SHARD_INDEX = "model.safetensors.index.json"  # a sharded model's, in place of model.safetensors
HUB_PROBE_TIMEOUT = 3.0  # seconds to reach the hub before giving up (huggingface_hub retries for ~25 s)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE says not to contact the Hugging Face hub (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def shard_names(index: Path) -> list[str]:
    """The files that a sharded model's model.safetensors.index.json names (save_pretrained's max_shard_size)."""
    try:
        names = sorted(set(read_json(index)["weight_map"].values()))
        if not all(isinstance(n, str) for n in names):
            raise ValueError("a weight_map entry that is not a file name")
        if outside := next((n for n in names if Path(n).is_absolute() or ".." in Path(n).parts), None):
            raise ValueError(f"{outside!r} is not in the model's directory")  # a load read any file it named
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index}: not a safetensors index ({first_line(e)})") from None
    return names


def check_hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> None:
    """Open one TCP connection to the hub (or to the proxy for it) within `timeout` seconds.

    Offline, huggingface_hub retries each request for ~25 s with a warning per try; this fails in seconds.
    """
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    hub = urlsplit(constants.ENDPOINT)
    proxy = None if urllib.request.proxy_bypass(hub.hostname or "") else urllib.request.getproxies().get(hub.scheme)
    try:
        target = urlsplit(proxy) if proxy else hub
        port = target.port or (443 if target.scheme == "https" else 80)
        if not target.hostname:
            raise ValueError("no host")
    except ValueError as e:  # a malformed *_PROXY variable
        raise UserError(f"cannot use {'the proxy ' + proxy if proxy else constants.ENDPOINT} for the Hugging Face "
                        f"hub ({e})") from None
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as e:
        via = f" via proxy {target.hostname}:{port}" if proxy else ""
        raise UserError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT}{via} "
                        f"({e.strerror or first_line(e)})") from None


class _NoSafetensors(Exception):
    """A hub repo (or its cache) has config.json but neither model.safetensors nor its index."""


def _fetch_model(get: Callable[[str], str]) -> Path:
    """Fetch config.json and the weights, model.safetensors or else its index and the shards it names, with `get`
    (a file's name in the repo -> its path); return their folder."""
    from huggingface_hub.utils import EntryNotFoundError

    folder = Path(get("config.json")).parent
    try:
        get("model.safetensors")
    except EntryNotFoundError:  # not in the repo (or not in the cache): a sharded model's files instead
        try:
            index = get(SHARD_INDEX)
        except EntryNotFoundError:  # the repo exists (config.json came) without safetensors: a pickle's, or none
            raise _NoSafetensors from None
        for name in shard_names(Path(index)):
            get(name)
    return folder


def _cached_without_safetensors(repo_id: str) -> bool:
    """Whether the Hugging Face cache has `repo_id`'s config.json and no safetensors weights, known to be missing: the
    hub answered that it has neither model.safetensors nor its index (huggingface_hub records it), or its pickled
    weights are cached without them (a whole snapshot downloaded)."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
        found = [try_to_load_from_cache(repo_id, name) for name in ("model.safetensors", SHARD_INDEX)]
    except Exception:  # noqa: BLE001  (an id huggingface_hub refuses is in no cache)
        return False
    if not isinstance(config, str) or any(isinstance(f, str) for f in found):
        return False
    return all(f is _CACHED_NO_EXIST for f in found) or any(Path(config).parent.glob("pytorch_model*.bin"))


def _no_safetensors(repo_id: str, known: str) -> UserError:
    """The refusal of a hub repo that has no safetensors weights (`known`: how that is known)."""
    return UserError(f"{repo_id!r}: the hub repo has no safetensors weights ({known}); pickled ones "
                     "(pytorch_model.bin) are not loaded, as they can run code: convert them with transformers' "
                     f"GPT2LMHeadModel.from_pretrained({repo_id!r}).save_pretrained(DIR), which writes "
                     "model.safetensors, and pass DIR")


def download(repo_id: str) -> Path:
    """Fetch a hub repo's model (config.json, model.safetensors or its shards) into the Hugging Face cache (or find
    it there) and return its folder."""
    try:
        from huggingface_hub import hf_hub_download
    except ValueError as e:  # huggingface_hub parses HF_ENDPOINT when it is imported
        raise UserError(f"HF_ENDPOINT={os.environ.get('HF_ENDPOINT')!r} is not a URL huggingface_hub accepts "
                        f"({first_line(e)})") from None

    tried = f"{repo_id!r} is not a local directory"
    hint = "pass a local directory with config.json and model.safetensors instead"
    try:  # all files cached already: no network round trip at all
        return _fetch_model(lambda f: hf_hub_download(repo_id, f, local_files_only=True))
    except UserError:  # a cached index that is none
        raise
    except Exception:  # noqa: BLE001  (any failure here just means "not fully cached")
        pass
    if hub_offline():
        if _cached_without_safetensors(repo_id):  # known from the cache: not a repo that was never fetched
            raise _no_safetensors(repo_id, "none in the Hugging Face cache, and HF_HUB_OFFLINE is set")
        raise UserError(f"{tried} and not in the Hugging Face cache (HF_HUB_OFFLINE is set); {hint}")
    try:
        check_hub_reachable()
    except UserError as e:
        raise UserError(f"{tried} and not in the Hugging Face cache; {e}; {hint}") from None
    try:
        with quiet("huggingface_hub"):  # its per-retry warnings: a failure is reported once
            return _fetch_model(lambda f: hf_hub_download(repo_id, f, etag_timeout=10))
    except UserError:
        raise
    except _NoSafetensors:  # not the same 404 as a repo that does not exist
        raise _no_safetensors(repo_id, f"no model.safetensors or {SHARD_INDEX}") from None
    except Exception as e:  # noqa: BLE001  (network, auth, unknown repo: all end the same way)
        raise UserError(f"{tried} and could not be downloaded from the Hugging Face hub ({first_line(e)}); "
                        f"{hint}") from None
