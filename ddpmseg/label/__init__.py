"""``ddpmseg label``: model-assisted labelling in the browser (the optional extra ``ddpmseg[label]``).

    store.py    LABELS/: the label PNGs fit reads and the edit histories (torch-free)
    engine.py   features, fits on the strokes (pipeline.fit_model) and predictions
    server.py   the Starlette app (page + HTTP API, token, limits) and its uvicorn server
    static/     the page: plain HTML, CSS and JavaScript

:func:`label_images` is what the CLI calls; docs/label.md describes the page and the API.
"""

from __future__ import annotations

import logging
import threading
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from ddpmseg.records import ExtractConfig

from ddpmseg.errors import DdpmsegError

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def open_session(images: Sequence[str | Path], classes: str | Path, out: str | Path, *,
                 features: str | Path | None = None, checkpoint: str | Path | None = None,
                 backbone_args: Mapping[str, Any] | None = None, extract: "ExtractConfig | None" = None,
                 fit_options: Mapping[str, Any] | None = None, device: str = "auto", token: str | None = None):
    """The store, labeller and token of a session (everything checked before a port is opened)."""
    from ddpmseg import data
    from ddpmseg._io import check_writable
    from ddpmseg.label.engine import LABEL_FIT_OPTIONS, Labeller
    from ddpmseg.label.server import Session, make_token
    from ddpmseg.label.store import LabelStore
    from ddpmseg.records import ExtractConfig

    labelset = data.load_label_set(classes)
    if labelset.n_classes > 255:
        raise DdpmsegError(f"label set {labelset.name} has {labelset.n_classes} classes; labelling takes at most 255 "
                           "(255 marks unlabelled pixels)")
    check_writable(out, folder=True)
    store = LabelStore(images, out, labelset)
    labeller = Labeller(store, str(classes), None if features is None else Path(features),
                        None if checkpoint is None else Path(checkpoint), dict(backbone_args or {}), extract or ExtractConfig(),
                        dict(LABEL_FIT_OPTIONS if fit_options is None else fit_options), device)
    return Session(store, labeller, token or make_token())


def label_images(images: Sequence[str | Path], classes: str | Path, out: str | Path, *,
                 features: str | Path | None = None, checkpoint: str | Path | None = None,
                 host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False,
                 backbone_args: Mapping[str, Any] | None = None, extract: "ExtractConfig | None" = None,
                 fit_options: Mapping[str, Any] | None = None, device: str = "auto",
                 announce: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:
    """Serve the labelling page for ``images`` (label set ``classes``, labels saved in ``out``) until
    Ctrl-C; ``announce`` gets the one line with the URL and its token (default: logged at INFO; the CLI
    prints it). Features: ``features`` (a cache
    holding the images) or ``checkpoint`` (extracted on demand into ``out``/.ddpmseg-label/features)."""
    from ddpmseg._optional import optional_import
    from ddpmseg.label import server

    for module in ("starlette", "uvicorn"):  # the one-line error before any work
        optional_import(module, server.PURPOSE)
    session = open_session(images, classes, out, features=features, checkpoint=checkpoint,
                           backbone_args=backbone_args, extract=extract, fit_options=fit_options, device=device)
    if host not in LOCAL_HOSTS:
        log.warning("--host %s: the labeller is reachable from other machines; anyone with the token can read the "
                    "images and change the labels", host)
    sock = server.bind(host, port)
    threading.Thread(target=session.labeller.warm_up, daemon=True, name="ddpmseg-label-warm-up").start()
    url = server.url_of(sock, host, session.token)
    if announce is None:
        log.info("ddpmseg label: open %s", url)
    else:
        announce(url)
    if open_browser:
        webbrowser.open(url)
    server.run_server(server.create_app(session), sock, stop)
