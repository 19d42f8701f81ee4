"""The HTTP side of `ddpmseg label`: a Starlette app (the page and its JSON / PNG API) and the uvicorn
server that runs it. Every request needs the session's token: ``?token=`` (the first visit, which sets a
cookie for the page's reads) or the ``X-Token`` header; writes (PUT / POST) need the token itself (header
or query), never just the cookie, so a page of another site cannot write. See docs/label.md.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import secrets
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ddpmseg._optional import optional_import
from ddpmseg.errors import DdpmsegError
from ddpmseg.label.store import UNLABELLED, BadInput, LabelStore, NotFound, rle_decode, rle_encode

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}  # what /static/ serves, nothing else
COOKIE = "ddpmseg_label_token"  # + "_PORT": browsers share cookies across ports, so each server names its own
MAX_PNG_BYTES = 16 << 20  # PUT /api/labels
MAX_JSON_BYTES = 32 << 20  # PUT /api/history (strokes and run-length label maps)
MAX_PIXELS = 100_000_000  # a label PNG larger than this is refused before it is decoded
PURPOSE = "ddpmseg label (the labelling web app)"


def cookie_name(scope: dict[str, Any]) -> str:
    """The token cookie of the server that got this request: one name per listening port, so a second
    ``ddpmseg label`` on another port of the same host does not overwrite the first one's cookie."""
    server = scope.get("server") or (None, None)
    return f"{COOKIE}_{server[1] if server[1] is not None else 0}"


class TooLarge(DdpmsegError):
    """A request body over its limit (HTTP 413)."""


def _png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """PNG bytes: a palette PNG of class indices (255 transparent) when ``palette`` is given, else RGB."""
    buf = io.BytesIO()
    if palette is None:
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    img = Image.fromarray(np.asarray(array, dtype=np.uint8), "L").convert("P")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(palette)] = palette
    img.putpalette(full.reshape(-1).tolist())
    alpha = bytes([255] * 255 + [0])  # index 255 (unlabelled) transparent, so the PNG lies over the image
    img.save(buf, "PNG", transparency=alpha, compress_level=1)
    return buf.getvalue()


def read_label_png(body: bytes, width: int, height: int) -> np.ndarray:
    """A PUT label PNG as (H, W) class indices: a greyscale or palette PNG whose values are the labels."""
    try:
        img = Image.open(io.BytesIO(body))  # the header only: sizes are checked before any decoding
        if img.width * img.height > MAX_PIXELS:
            raise BadInput(f"the label PNG is {img.width}x{img.height}, over the limit of {MAX_PIXELS:,} pixels")
        if img.format != "PNG":
            raise BadInput(f"the labels must be a PNG, got {img.format}")
        if img.size != (width, height):
            raise BadInput(f"the label PNG is {img.width}x{img.height} but the image is {width}x{height}")
        if img.mode not in ("L", "P"):
            raise BadInput(f"the label PNG has mode {img.mode}; send a greyscale (L) or palette (P) PNG whose "
                           "pixel values are class indices, 255 = unlabelled")
        return np.asarray(img).astype(np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInput(f"the body is not a readable PNG ({type(e).__name__}: {e})") from None


@dataclass
class Session:
    """What the app serves: the store, the labeller and the token."""

    store: LabelStore
    labeller: Any  # ddpmseg.label.engine.Labeller (imported lazily: it imports torch)
    token: str


def create_app(session: Session):
    """The Starlette app of one labelling session."""
    optional_import("starlette", PURPOSE)  # the one-line error when the extra is missing
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    store, labeller, token = session.store, session.labeller, session.token

    def token_ok(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise TooLarge(f"the body is larger than {limit >> 20} MiB")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise TooLarge(f"the body is larger than {limit >> 20} MiB")
            chunks.append(chunk)
        return b"".join(chunks)

    def handler(fn: Callable) -> Callable:
        """Errors as JSON ({"error": one line}) with their status; the rest of the app sees only results."""

        async def wrapped(request: Request):
            try:
                return await fn(request)
            except NotFound as e:
                return error(404, str(e))
            except TooLarge as e:
                return error(413, str(e))
            except BadInput as e:
                return error(400, str(e))
            except DdpmsegError as e:
                return error(409, str(e))
            except Exception as e:  # noqa: BLE001 - the page shows it; the log keeps the traceback
                log.exception("label server: %s %s failed", request.method, request.url.path)
                return error(500, f"{type(e).__name__}: {e}")

        return wrapped

    async def index(request: Request):
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        html = html.replace("{{TOKEN}}", token)  # only ever sent to a request that holds the token already
        resp = HTMLResponse(html, headers={"Cache-Control": "no-store"})
        if request.query_params.get("token"):
            resp.set_cookie(cookie_name(request.scope), token, httponly=True, samesite="strict")
        return resp

    async def static(request: Request):
        name = request.path_params["file"]
        if name not in STATIC_FILES:
            return error(404, f"no static file {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-store"})

    async def images(request: Request):
        def listing():
            order = labeller.suggestion()
            rank = {n: i + 1 for i, n in enumerate(order)}
            return [{"name": e.name, "width": e.width, "height": e.height, "state": store.state(e.name),
                     "suggest_rank": rank.get(e.name)} for e in store.entries.values()]

        return JSONResponse(await run_in_threadpool(listing))

    async def classes(request: Request):
        ls = store.labelset
        return JSONResponse({"name": ls.name, "names": list(ls.names), "colors": [list(c) for c in ls.colors],
                             "ignore_index": ls.ignore_index, "unlabelled": UNLABELLED})

    async def image(request: Request):
        name = request.path_params["name"]
        return Response(await run_in_threadpool(store.image_png, name), media_type="image/png")

    async def labels(request: Request):
        name = request.path_params["name"]
        e = store.entry(name)
        if request.method == "PUT":
            arr = read_label_png(await body(request, MAX_PNG_BYTES), e.width, e.height)
            state = await run_in_threadpool(store.set_labels, name, arr)
            return JSONResponse({"name": name, "state": state})
        arr = await run_in_threadpool(store.labels, name)
        return Response(_png(arr, store.labelset.palette()), media_type="image/png")

    async def history(request: Request):
        name = request.path_params["name"]
        e = store.entry(name)
        if request.method == "PUT":
            raw = await body(request, MAX_JSON_BYTES)
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise BadInput(f"the body is not JSON ({err})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list):
                raise BadInput("a history PUT is {'ops': [...], 'cursor': N, 'done': bool, 'labels': rle}")
            arr = rle_decode(doc["labels"], e.width, e.height)
            state = await run_in_threadpool(store.save, name, doc, arr)
            return JSONResponse({"name": name, "state": state})
        return JSONResponse(await run_in_threadpool(store.history, name))

    async def predict(request: Request):
        name = request.path_params["name"]
        store.entry(name)
        p = await run_in_threadpool(labeller.predict, name)
        headers = {"X-Fitted": str(p.fitted).lower(), "X-Seconds": f"{p.seconds:.3f}",
                   "X-Uncertainty-Score": f"{p.score:.6g}"}
        asyncio.get_running_loop().run_in_executor(None, labeller.rank_pool)  # suggest's order, in the background
        return Response(_png(p.labels, store.labelset.palette()), media_type="image/png", headers=headers)

    async def prediction(request: Request):
        """The last prediction of an image: ?format=rle (JSON, what Accept applies) or a PNG (default)."""
        name = request.path_params["name"]
        kind = request.path_params.get("kind", "labels")
        path = store.prediction_path(name, kind)
        if not path.is_file():
            raise NotFound(f"{name} has no prediction yet; press Predict")
        if kind == "uncertainty":
            return Response(path.read_bytes(), media_type="image/png")
        arr = np.asarray(Image.open(path)).astype(np.uint8)
        if request.query_params.get("format") == "rle":
            return JSONResponse({"width": arr.shape[1], "height": arr.shape[0], "rle": rle_encode(arr)})
        return Response(_png(arr, store.labelset.palette()), media_type="image/png")

    async def status(request: Request):
        return JSONResponse(labeller.progress.to_dict())

    wrap = handler
    routes = [
        Route("/", index),
        Route("/static/{file}", wrap(static)),
        Route("/api/classes", wrap(classes)),
        Route("/api/images", wrap(images)),
        Route("/api/images/{name}", wrap(image)),
        Route("/api/labels/{name}", wrap(labels), methods=["GET", "PUT"]),
        Route("/api/history/{name}", wrap(history), methods=["GET", "PUT"]),
        Route("/api/predict/{name}", wrap(predict), methods=["POST"]),
        Route("/api/prediction/{name}", wrap(prediction)),
        Route("/api/prediction/{name}/{kind:str}", wrap(prediction)),
        Route("/api/status", wrap(status)),
    ]

    app = Starlette(routes=routes)

    class Guard:
        """The token check before any route (the page, static files, the API)."""

        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            request = Request(scope)
            given = request.headers.get("x-token") or request.query_params.get("token")
            allowed = token_ok(given)
            if not allowed and request.method in ("GET", "HEAD"):
                allowed = token_ok(request.cookies.get(cookie_name(scope)))
            if not allowed:
                write = request.method not in ("GET", "HEAD")
                msg = ("this request needs the session's token in the X-Token header (or ?token=)" if write else
                       "open the URL with ?token=... that `ddpmseg label` printed")
                return await error(401, msg)(scope, receive, send)
            if ".." in request.url.path.split("/") or "\\" in request.url.path:
                return await error(404, "no such path")(scope, receive, send)
            return await self.inner(scope, receive, send)

    return Guard(app)


def make_token() -> str:
    return secrets.token_urlsafe(24)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the URL printed is the one served."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DdpmsegError(f"--host {host}: {e.strerror}; give an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise DdpmsegError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0: any free one)") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def run_server(app, sock: socket.socket, stop: threading.Event | None = None) -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C (or ``stop`` is set)."""
    uvicorn = optional_import("uvicorn", PURPOSE)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
    caught: list[int] = []
    handle_exit = server.handle_exit

    def note(sig: int, frame) -> None:
        caught.append(sig)
        handle_exit(sig, frame)

    server.handle_exit = note  # uvicorn installs this for SIGINT / SIGTERM while it serves
    server.run(sockets=[sock])
    if signal.SIGINT in caught:
        # uvicorn re-raises the Ctrl-C it caught into asyncio's handler, which loses it when the main task has no
        # await left (Python 3.11): the command then ended with status 0 instead of the Ctrl-C message and 130
        raise KeyboardInterrupt
