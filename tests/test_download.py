"""Resumable downloads against a local HTTP server on 127.0.0.1 (never the network)."""

from __future__ import annotations

import subprocess
import sys

import io
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ddpmseg.backbones import _registry, register_preset
from ddpmseg.backbones.adm import build_unet
from ddpmseg.backbones.download import download, download_preset
from ddpmseg.backbones import AdmConfig, Preset
from ddpmseg.errors import DdpmsegError

TINY = AdmConfig(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
    num_head_channels=32,
)  # fmt: skip
OTHER = AdmConfig(
    image_size=32, num_channels=64, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
    num_head_channels=32,
)  # fmt: skip


def _saved(config: AdmConfig) -> bytes:
    buf = io.BytesIO()
    torch.save(build_unet(config).state_dict(), buf)
    return buf.getvalue()


class Server:
    """Files served from memory; records each request's path, Range header and bytes sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ignore_range = False
        self.drop_after: int | None = None  # close the connection after this many body bytes
        self.log: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                entry = {"path": self.path, "range": self.headers.get("Range"), "sent": 0, "status": None}
                server.log.append(entry)
                data = server.files.get(self.path)
                if data is None:
                    entry["status"] = 404
                    self.send_error(404, "Not Found")
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", entry["range"] or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    entry["status"] = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    entry["status"] = 200
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    body = body[: server.drop_after]
                    self.close_connection = True
                entry["sent"] = len(body)  # before writing: the client may return (and the test read this) first
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_bytes() -> bytes:
    torch.manual_seed(0)
    return _saved(TINY)


@pytest.fixture()
def tiny_preset():
    """A preset with the tiny architecture, registered only for the test."""
    preset = register_preset(
        Preset("tiny_test", TINY, "tiny.pt", ("https://example.invalid/models/tiny.pt",), "tiny test model")
    )
    yield preset
    _registry._PRESETS.pop(preset.name, None)


# --------------------------------------------------------------------------- download()


@pytest.mark.parametrize("progress", [False, True])
def test_full_download(server, tmp_path, tiny_bytes, progress):
    server.files["/m/tiny.pt"] = tiny_bytes
    dest = download(server.url("/m/tiny.pt"), tmp_path / "sub" / "tiny.pt", progress=progress, chunk_size=4096)
    assert dest.read_bytes() == tiny_bytes
    assert not (tmp_path / "sub" / "tiny.pt.part").exists()
    assert [e["range"] for e in server.log] == [None]


def test_resume_sends_range_and_gets_only_the_rest(server, tmp_path, tiny_bytes):
    server.files["/tiny.pt"] = tiny_bytes
    dest = tmp_path / "tiny.pt"
    half = len(tiny_bytes) // 3
    (tmp_path / "tiny.pt.part").write_bytes(tiny_bytes[:half])
    download(server.url("/tiny.pt"), dest, progress=False)
    assert dest.read_bytes() == tiny_bytes
    (entry,) = server.log
    assert entry["range"] == f"bytes={half}-" and entry["status"] == 206
    assert entry["sent"] == len(tiny_bytes) - half


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, tiny_bytes):
    server.files["/tiny.pt"] = tiny_bytes
    server.ignore_range = True
    dest = tmp_path / "tiny.pt"
    (tmp_path / "tiny.pt.part").write_bytes(b"garbage that must not be kept" * 10)
    download(server.url("/tiny.pt"), dest, progress=False)
    assert dest.read_bytes() == tiny_bytes
    assert server.log[0]["range"] is not None and server.log[0]["status"] == 200


def test_complete_part_answered_416_is_finished(server, tmp_path, tiny_bytes):
    server.files["/tiny.pt"] = tiny_bytes
    dest = tmp_path / "tiny.pt"
    (tmp_path / "tiny.pt.part").write_bytes(tiny_bytes)
    download(server.url("/tiny.pt"), dest, progress=False)
    assert dest.read_bytes() == tiny_bytes
    assert [e["status"] for e in server.log] == [416]


def test_oversized_part_answered_416_restarts(server, tmp_path, tiny_bytes):
    server.files["/tiny.pt"] = tiny_bytes
    dest = tmp_path / "tiny.pt"
    (tmp_path / "tiny.pt.part").write_bytes(tiny_bytes + b"extra")
    download(server.url("/tiny.pt"), dest, progress=False)
    assert dest.read_bytes() == tiny_bytes
    assert [(e["status"], e["range"]) for e in server.log] == [(416, f"bytes={len(tiny_bytes) + 5}-"), (200, None)]


def test_404_raises_and_leaves_no_file(server, tmp_path):
    dest = tmp_path / "missing.pt"
    with pytest.raises(DdpmsegError, match=r"download of http://127\.0\.0\.1:\d+/missing\.pt failed: HTTP 404") as info:
        download(server.url("/missing.pt"), dest, progress=False)
    assert "\n" not in str(info.value)
    assert not dest.exists() and not (tmp_path / "missing.pt.part").exists()


def test_dropped_connection_keeps_part_then_resumes(server, tmp_path, tiny_bytes):
    server.files["/tiny.pt"] = tiny_bytes
    server.drop_after = 1000
    dest = tmp_path / "tiny.pt"
    with pytest.raises(DdpmsegError, match="run the same command again to resume"):
        download(server.url("/tiny.pt"), dest, progress=False, chunk_size=256)
    part = tmp_path / "tiny.pt.part"
    assert not dest.exists() and part.stat().st_size == 1000
    server.drop_after = None
    download(server.url("/tiny.pt"), dest, progress=False)
    assert dest.read_bytes() == tiny_bytes
    assert server.log[-1]["range"] == "bytes=1000-" and server.log[-1]["sent"] == len(tiny_bytes) - 1000


def test_unreachable_server_is_a_one_line_error(tmp_path):
    s = Server()
    url = s.url("/tiny.pt")
    s.close()  # nothing listens on that port any more
    with pytest.raises(DdpmsegError, match="failed: .*run the same command again to resume") as info:
        download(url, tmp_path / "tiny.pt", progress=False, timeout=5)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- download_preset()


def test_download_preset_via_mirror_env(server, tmp_path, tiny_bytes, tiny_preset, monkeypatch):
    server.files["/mirror/tiny.pt"] = tiny_bytes
    monkeypatch.setenv("DDPMSEG_DOWNLOAD_BASE", server.url("/mirror/"))
    path = download_preset("tiny_test", tmp_path / "ckpts", progress=False)
    assert path == tmp_path / "ckpts" / "tiny.pt" and path.read_bytes() == tiny_bytes
    assert [e["path"] for e in server.log] == ["/mirror/tiny.pt"]
    # a second call only verifies the existing file
    assert download_preset("tiny_test", tmp_path / "ckpts", progress=False) == path
    assert len(server.log) == 1


def test_download_preset_tries_urls_in_order(server, tmp_path, tiny_bytes, monkeypatch):
    server.files["/b/tiny2.pt"] = tiny_bytes
    preset = register_preset(
        Preset("tiny_two", TINY, "tiny2.pt", (server.url("/a/tiny2.pt"), server.url("/b/tiny2.pt")), "two mirrors")
    )
    try:
        monkeypatch.delenv("DDPMSEG_DOWNLOAD_BASE", raising=False)
        path = download_preset(preset.name, tmp_path, progress=False)
    finally:
        _registry._PRESETS.pop(preset.name, None)
    assert path.read_bytes() == tiny_bytes
    assert [(e["path"], e["status"]) for e in server.log] == [("/a/tiny2.pt", 404), ("/b/tiny2.pt", 200)]


def test_download_preset_url_override(server, tmp_path, tiny_bytes, tiny_preset):
    server.files["/x.pt"] = tiny_bytes
    path = download_preset("tiny_test", tmp_path, url=server.url("/x.pt"), progress=False)
    assert path == tmp_path / "tiny.pt" and path.read_bytes() == tiny_bytes


@pytest.mark.parametrize(
    "payload, pattern",
    [
        (lambda: _saved(OTHER), "shape mismatches"),
        (lambda: b"<html>rate limited</html>", "not a readable torch file"),
    ],
    ids=["wrong-architecture", "html-page"],
)
def test_invalid_download_is_moved_to_bad(server, tmp_path, tiny_preset, monkeypatch, payload, pattern):
    server.files["/m/tiny.pt"] = payload()
    monkeypatch.setenv("DDPMSEG_DOWNLOAD_BASE", server.url("/m"))
    with pytest.raises(DdpmsegError, match=f"not a checkpoint of preset tiny_test.*{pattern}") as info:
        download_preset("tiny_test", tmp_path, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "tiny.pt").exists()
    assert (tmp_path / "tiny.pt.bad").read_bytes() == server.files["/m/tiny.pt"]


def test_existing_wrong_file_is_reported_not_downloaded(server, tmp_path, tiny_preset, monkeypatch):
    monkeypatch.setenv("DDPMSEG_DOWNLOAD_BASE", server.url("/m"))
    (tmp_path / "tiny.pt").write_bytes(_saved(OTHER))
    with pytest.raises(DdpmsegError, match=r"does not fit preset tiny_test.*delete .*tiny\.pt to download it again"):
        download_preset("tiny_test", tmp_path, progress=False)
    assert server.log == []


def test_download_preset_404_everywhere(server, tmp_path, tiny_preset, monkeypatch):
    monkeypatch.setenv("DDPMSEG_DOWNLOAD_BASE", server.url("/nothing"))
    with pytest.raises(DdpmsegError, match="HTTP 404"):
        download_preset("tiny_test", tmp_path, progress=False)
    assert list(Path(tmp_path).iterdir()) == []


def test_unknown_preset(tmp_path):
    with pytest.raises(DdpmsegError, match="unknown preset 'nope'"):
        download_preset("nope", tmp_path, progress=False)


def test_a_failed_download_is_reported_once(server, tmp_path):
    """0.1.0 logged the failure as a warning and then printed it again as the error."""
    url = server.url("/missing/ffhq.pt")
    r = subprocess.run([sys.executable, "-m", "ddpmseg.cli.main", "-q", "download", "ffhq_256", "--dir", str(tmp_path),
                        "--url", url], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpmseg: error: download of") and "HTTP 404" in lines[0]
