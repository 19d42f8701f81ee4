"""The labelling app in tests (and the docs' screenshot script): a server in a thread, headless Chromium."""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

# .ci/run sets this: there, a missing browser is a failure, never a skip
BROWSER_REQUIRED = os.environ.get("DDPMSEG_REQUIRE_BROWSER") == "1"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)


def _which(names: tuple[str, ...]) -> str | None:
    for n in names:
        found = shutil.which(n) or (f"/usr/lib/chromium/{n}" if Path(f"/usr/lib/chromium/{n}").is_file() else None)
        if found:
            return found
    return None


def need_browser() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip (a failure when DDPMSEG_REQUIRE_BROWSER=1, as in CI)."""
    browser, driver = _which(CHROMIUM_NAMES), _which(DRIVER_NAMES)
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser is None or driver is None:
        why = ("headless Chromium test needs selenium (pip install -e '.[test]'), chromium and chromedriver "
               "(apt-get install chromium chromium-driver)")
        if BROWSER_REQUIRED:
            pytest.fail(f"DDPMSEG_REQUIRE_BROWSER=1 but {why}: not found", pytrace=False)
        pytest.skip(why)
    return browser, driver


def chromium(width: int = 1280, height: int = 800):
    """A headless Chromium driven by selenium (the system's chromium and chromedriver, never a download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = need_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


@contextmanager
def served(session) -> Iterator[str]:
    """Serve a ``ddpmseg.label`` session on a free local port in a thread; yields its URL (with the token)."""
    from ddpmseg.label import server

    sock = server.bind("127.0.0.1", 0)
    url = server.url_of(sock, "127.0.0.1", session.token)
    stop = threading.Event()
    t = threading.Thread(target=server.run_server, args=(server.create_app(session), sock, stop), daemon=True)
    t.start()
    try:
        yield url
    finally:
        stop.set()
        t.join(10)
        sock.close()


CLASSES = "index,name,r,g,b\n0,skin,230,180,140\n1,eye,40,90,220\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_ckpt, eyes8):
    """Three eye crops, a 2-class label set and their features from the tiny random ADM (64 px)."""
    from ddpmseg.pipeline import extract_features

    d = tmp_path_factory.mktemp("label_world")
    imgs = d / "imgs"
    imgs.mkdir()
    for i in range(3):
        shutil.copy(eyes8 / f"image_{i}.jpg", imgs)
    (d / "classes.csv").write_text(CLASSES)
    ckpt, flags = tiny_ckpt
    extract_features(ckpt, [imgs], d / "feats.h5", model_flags=flags)
    return d
