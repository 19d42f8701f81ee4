"""Resumable checkpoint downloads (urllib only) and preset checkpoint fetching."""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from ddpmseg._version import __version__
from ddpmseg.backbones._checkpoint import check_signature, config_signature, read_state_dict
from ddpmseg.backbones._registry import Preset, get_preset
from ddpmseg.backbones.diffusers_unet import download_hub
from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

BASE_ENV = "DDPMSEG_DOWNLOAD_BASE"
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError)


def _user_agent() -> str:
    return f"ddpmseg/{__version__}"


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a ``Content-Range: bytes a-b/total`` (or ``bytes */total``) header."""
    if not value:
        return None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _failed(url: str, reason: str, resumable: bool = True) -> DdpmsegError:
    tail = "run the same command again to resume" if resumable else "check the URL (or $" + BASE_ENV + ")"
    return DdpmsegError(f"download of {url} failed: {reason}; {tail}")


def download(
    url: str,
    dest: Path,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``dest.part`` with an HTTP Range request.

    Bytes go to ``<dest>.part``, renamed to ``dest`` only once complete; on a
    network error the ``.part`` stays so the next call resumes. A server that
    ignores the Range header (answers 200) makes the download restart from 0.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    for _attempt in range(2):  # the 2nd attempt only after discarding an unusable .part
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": _user_agent()}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                _, total = _content_range(e.headers.get("Content-Range"))
                e.close()
                if total == offset:
                    log.info("%s was already complete", part)
                    os.replace(part, dest)
                    return dest
                log.warning("%s (%d bytes) does not match %s; downloading again", part, offset, url)
                part.unlink()
                continue
            e.close()
            resumable = e.code in (408, 429) or e.code >= 500
            raise _failed(url, f"HTTP {e.code} {e.reason}", resumable) from None
        except _NETWORK_ERRORS as e:
            reason = getattr(e, "reason", None) or e
            raise _failed(url, str(reason) or type(e).__name__) from None
        with response:
            status = response.getcode() or 200  # file:// URLs have no status
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    log.warning("server resumed %s at byte %s, not %d; downloading again", url, start, offset)
                    part.unlink()
                    continue
                if total is None and length is not None:
                    total = offset + length
            else:
                if offset:
                    log.info("server ignored the Range request for %s; restarting from byte 0", url)
                offset, total = 0, length
            written = _stream(response, part, offset, total, chunk_size, progress, url, dest.name)
        if total is not None and written != total:
            raise _failed(url, f"connection closed after {written} of {total} bytes")
        os.replace(part, dest)
        log.info("downloaded %s to %s (%d bytes)", url, dest, written)
        return dest
    raise _failed(url, "the server does not resume consistently")  # pragma: no cover


def _stream(response, part: Path, offset: int, total: int | None, chunk_size: int, progress: bool, url: str, name: str) -> int:
    """Append (offset > 0) or write the response body to ``part``; returns the file's size."""
    written = offset
    with open(part, "ab" if offset else "wb") as f, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress
    ) as bar:
        try:
            while chunk := response.read(chunk_size):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        except _NETWORK_ERRORS + (OSError,) as e:
            f.flush()
            raise _failed(url, f"{type(e).__name__} after {written} bytes: {e}") from None
    return written


def _mirror(url: str) -> str:
    """``url`` with its directory replaced by ``$DDPMSEG_DOWNLOAD_BASE``, when set."""
    base = os.environ.get(BASE_ENV, "").strip()
    if not base:
        return url
    return base.rstrip("/") + "/" + url.rstrip("/").rsplit("/", 1)[-1]


def _verify(path: Path, preset: Preset) -> None:
    state = read_state_dict(path)
    check_signature(config_signature(preset.config), state, f"preset {preset.name}", str(path))


def download_preset(
    name: str,
    directory: Path = Path("checkpoints"),
    url: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch the checkpoint of preset ``name`` into ``directory`` and check that it fits.

    The preset's URLs are tried in order (``url`` replaces them). If the
    environment variable ``DDPMSEG_DOWNLOAD_BASE`` is set (a mirror, or a local
    server in tests), it replaces the directory part of each preset URL:
    ``DDPMSEG_DOWNLOAD_BASE=http://host/ckpts`` fetches ``http://host/ckpts/ffhq.pt``.
    An existing file is only verified. A downloaded file that does not load or
    does not fit the preset is renamed to ``*.bad`` and an error is raised.
    """
    preset = get_preset(name)
    directory = Path(directory)
    dest = directory / preset.filename
    if preset.family == "diffusers":
        return download_hub(url or preset.urls[0].removeprefix("hf://"), dest)
    if dest.exists():
        try:
            _verify(dest, preset)
        except DdpmsegError as e:
            raise DdpmsegError(f"{e} (existing file: delete {dest} to download it again)") from None
        log.info("%s already present and fits preset %s", dest, name)
        return dest

    urls = [url] if url else list(dict.fromkeys(_mirror(u) for u in preset.urls))
    if not urls:
        raise DdpmsegError(f"preset {name} has no download URL; pass --url URL")
    error: DdpmsegError | None = None
    for i, source in enumerate(urls):
        if i and _part_path(dest).exists():
            _part_path(dest).unlink()  # never splice bytes from two servers
        more = i < len(urls) - 1  # only a failure with a next URL to try is logged; the last one is raised
        try:
            download(source, dest, progress=progress)
        except DdpmsegError as e:
            if more:
                log.warning("%s (trying %s next)", e, urls[i + 1])
            error = e
            continue
        try:
            _verify(dest, preset)
        except DdpmsegError as e:
            bad = dest.with_name(dest.name + ".bad")
            os.replace(dest, bad)
            error = DdpmsegError(
                f"the file downloaded from {source} is not a checkpoint of preset {name} and was moved to {bad}: {e}"
            )
            if more:
                log.warning("%s (trying %s next)", error, urls[i + 1])
            continue
        return dest
    raise error
