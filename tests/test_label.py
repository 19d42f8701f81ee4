"""`ddpmseg label` without a browser: the HTTP API (token, traversal, size limits), the store (atomic
label PNG + history), sparse strokes through `fit --masks LABELS/`, kill -9 of a real server, the CLI."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import cli as run_cli, fails
from label_helpers import world  # noqa: F401 (a fixture)
from ddpmseg import data
from ddpmseg.errors import DdpmsegError
from ddpmseg.label import open_session
from ddpmseg.label.store import UNLABELLED, WORK_DIR as WORK, rle_decode, rle_encode
from ddpmseg.label.strokes import paint_stroke, replay, scribbles

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from ddpmseg.label import server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "test-token-123"
FIT = {"n_members": 2, "recipe": "fast", "max_epochs": 2}


def session(world, out, **kw):
    return open_session([world / "imgs"], world / "classes.csv", out, features=world / "feats.h5", token=TOKEN,
                        fit_options=FIT, **kw)


@pytest.fixture
def client(world, tmp_path):
    s = session(world, tmp_path / "labels")
    return TestClient(server.create_app(s)), s


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


H = {"X-Token": TOKEN}


# -- the token --------------------------------------------------------------------------------
def test_every_route_needs_the_token(client):
    c, _ = client
    for path in ("/", "/static/app.js", "/api/images", "/api/classes", "/api/images/image_0", "/api/labels/image_0",
                 "/api/history/image_0", "/api/status"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"X-Token": "wrong"}).status_code == 401, path
        assert c.get(path, headers=H).status_code == 200, path
    for path in ("/api/prediction/image_0", "/api/prediction/image_0?format=rle", "/api/prediction/image_0/uncertainty"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"X-Token": "wrong"}).status_code == 401, path
        assert c.get(path, headers=H).status_code == 404, path  # past the token: no prediction yet
    assert c.post("/api/predict/image_0").status_code == 401
    assert c.put("/api/labels/image_0", content=b"x").status_code == 401
    doc = {"ops": [], "cursor": 0, "done": True, "labels": rle_encode(np.full((256, 256), UNLABELLED, np.uint8))}
    assert c.put("/api/history/image_0", content=json.dumps(doc)).status_code == 401
    assert c.put("/api/history/image_0", content=json.dumps(doc), headers={"X-Token": "wrong"}).status_code == 401
    assert c.get("/api/history/image_0", headers=H).json()["done"] is False  # nothing was written


def test_first_visit_sets_a_cookie_that_reads_but_never_writes(client):
    c, _ = client
    r = c.get(f"/?token={TOKEN}")
    assert r.status_code == 200 and TOKEN in r.text  # the page gets the token for its X-Token header
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/api/images").status_code == 200  # the cookie alone: reads
    lab = np.full((256, 256), UNLABELLED, np.uint8)
    lab[5:9, 5:50] = 1
    assert c.put("/api/labels/image_0", content=png_bytes(lab)).status_code == 401  # a cross-site write has only the cookie
    assert c.post("/api/predict/image_0").status_code == 401
    assert c.put("/api/labels/image_0", content=png_bytes(lab), headers=H).status_code == 200
    c.cookies.clear()
    assert c.get("/api/images").status_code == 401


def test_two_servers_on_one_host_keep_their_own_cookies(world, tmp_path):
    # browsers send a host's cookies to every port of it: a second server must not replace the first's
    apps = {}
    for port, token in ((8001, "token-of-8001"), (8002, "token-of-8002")):
        s = open_session([world / "imgs"], world / "classes.csv", tmp_path / f"labels{port}", features=world / "feats.h5",
                         token=token, fit_options=FIT)
        apps[port] = TestClient(server.create_app(s), base_url=f"http://127.0.0.1:{port}")
    jar = {}
    for port, c in apps.items():
        r = c.get(f"/?token=token-of-{port}")
        assert r.status_code == 200
        jar.update(dict(r.cookies))
    assert len(jar) == 2 and all(str(port) in name for port, name in zip(apps, sorted(jar)))
    for c in apps.values():  # both cookies reach both servers; each reads its own
        c.cookies.clear()
        c.cookies.update(jar)
        assert c.get("/api/images").status_code == 200


# -- names, traversal, limits -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "image_0.jpg", "nothing", "..",
                                  "image_0%00", "classes"])
def test_names_outside_the_image_set_are_404(client, name):
    c, _ = client
    for path in (f"/api/images/{name}", f"/api/labels/{name}", f"/api/history/{name}"):
        assert c.get(path, headers=H).status_code == 404, path
    assert c.post(f"/api/predict/{name}", headers=H).status_code == 404
    assert c.put(f"/api/labels/{name}", content=b"x", headers=H).status_code == 404


def test_traversal_in_the_raw_path_is_refused(client):
    c, _ = client
    for raw in ("/api/images/../../etc/passwd", "/static/../store.py", "/static/..%2Fstore.py", "/static/index.html"):
        r = c.get(raw, headers=H)
        assert r.status_code == 404, raw
        assert b"import" not in r.content


def test_a_symlink_out_of_labels_is_refused(client, tmp_path):
    c, s = client
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((256, 256), np.uint8), "L").save(secret)
    lab = np.full((256, 256), UNLABELLED, np.uint8)
    lab[5:9, 5:50] = 1
    assert c.put("/api/labels/image_0", content=png_bytes(lab), headers=H).status_code == 200
    digest = s.store.label_digest()
    (s.store.out / "image_1.png").symlink_to(secret)
    assert c.get("/api/labels/image_1", headers=H).status_code == 404
    assert c.get("/api/history/image_1", headers=H).status_code == 404
    # not a labelled image, nor in what a fit depends on; Predict refuses (fit --masks LABELS/ would read it)
    assert s.store.labelled() == ["image_0"] and s.store.label_digest() == digest
    assert {i["name"]: i["state"] for i in c.get("/api/images", headers=H).json()}["image_1"] == "unlabelled"
    r = c.post("/api/predict/image_0", headers=H)
    assert r.status_code == 409 and "image_1" in r.json()["error"] and "symlink" in r.json()["error"]
    (s.store.out / "image_1.png").unlink()
    (s.store.out / "image_1.png").symlink_to(s.store.out / "image_0.png")  # a link inside LABELS/ is a label
    assert s.store.labelled() == ["image_0", "image_1"]


@pytest.mark.parametrize("folder", ["strokes", WORK])
def test_a_symlinked_store_folder_is_refused_at_start(world, tmp_path, folder):
    out = tmp_path / "labels"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / folder).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(DdpmsegError, match="symlink") as err:
        session(world, out)
    assert "\n" not in str(err.value)
    fails("label", world / "imgs", "--classes", world / "classes.csv", "--out", out, "--features", world / "feats.h5",
          "--port", "0", match=("symlink", folder))


def test_upload_limits_and_bad_bodies(client, monkeypatch):
    c, s = client
    noisy = np.random.default_rng(0).integers(0, 2, (256, 256)).astype(np.uint8)
    with monkeypatch.context() as m:
        m.setattr(server, "MAX_PNG_BYTES", 1000)  # read when the request comes
        assert c.put("/api/labels/image_0", content=png_bytes(noisy), headers=H).status_code == 413
        m.setattr(server, "MAX_JSON_BYTES", 1000)
        r = c.put("/api/history/image_0", content=json.dumps({"ops": [], "cursor": 0, "labels": [0] * 500}), headers=H)
        assert r.status_code == 413
    assert c.put("/api/labels/image_0", content=b"not a png", headers=H).status_code == 400
    assert c.put("/api/labels/image_0", content=png_bytes(np.zeros((10, 10))), headers=H).status_code == 400
    bad_class = np.full((256, 256), 7, np.uint8)
    assert c.put("/api/labels/image_0", content=png_bytes(bad_class), headers=H).status_code == 400
    rgb = io.BytesIO()
    Image.new("RGB", (256, 256)).save(rgb, "PNG")
    assert c.put("/api/labels/image_0", content=rgb.getvalue(), headers=H).status_code == 400
    lab = rle_encode(np.full((256, 256), UNLABELLED, np.uint8))
    for doc in ({"ops": "x", "cursor": 0, "labels": lab}, {"ops": [], "cursor": 3, "labels": lab},
                {"ops": [{"k": "eval", "code": "1"}], "cursor": 1, "labels": lab},
                {"ops": [{"k": "s", "c": 9, "r": 2, "p": [1, 1]}], "cursor": 1, "labels": lab},
                {"ops": [], "cursor": 0, "labels": [0, 5]}):
        r = c.put("/api/history/image_0", content=json.dumps(doc), headers=H)
        assert r.status_code == 400, doc
        assert r.json()["error"]
    assert c.put("/api/history/image_0", content=b"{not json", headers=H).status_code == 400
    assert not (s.store.out / "image_0.png").exists()  # nothing written by a refused request


def test_decompression_bomb_is_refused_before_decoding(client, monkeypatch):
    c, _ = client
    monkeypatch.setattr(server, "MAX_PIXELS", 1000)
    r = c.put("/api/labels/image_0", content=png_bytes(np.zeros((256, 256))), headers=H)
    assert r.status_code == 400


# -- store -------------------------------------------------------------------------------------
def test_history_and_labels_round_trip_and_fit_reads_them(client):
    c, s = client
    ops = [{"k": "s", "c": 0, "r": 3, "p": [10, 10, 60, 12]}, {"k": "s", "c": 1, "r": 2.5, "p": [100, 100, 140, 150]},
           {"k": "s", "c": 255, "r": 2, "p": [30, 5, 30, 20]}]
    doc = {"ops": ops, "cursor": 3, "done": False}
    labels = replay({**doc, "width": 256, "height": 256})
    r = c.put("/api/history/image_0", content=json.dumps({**doc, "labels": rle_encode(labels)}), headers=H)
    assert r.status_code == 200 and r.json()["state"] == "partly labelled"
    back = c.get("/api/history/image_0", headers=H).json()
    assert back["ops"] == ops and back["cursor"] == 3
    on_disk = data.load_mask(s.store.out / "image_0.png")  # what fit reads: class indices, 255 unlabelled
    assert np.array_equal(on_disk, labels)
    assert set(np.unique(on_disk)) == {0, 1, 255} and (on_disk == 255).mean() > 0.9
    got = np.asarray(Image.open(io.BytesIO(c.get("/api/labels/image_0", headers=H).content)))
    assert np.array_equal(got, labels)
    # undo everything: no labelled pixel, no mask file, history kept for redo
    empty = np.full((256, 256), UNLABELLED, np.uint8)
    r = c.put("/api/history/image_0", content=json.dumps({**doc, "cursor": 0, "labels": rle_encode(empty)}), headers=H)
    assert r.json()["state"] == "unlabelled" and not (s.store.out / "image_0.png").exists()
    assert len(c.get("/api/history/image_0", headers=H).json()["ops"]) == 3


def test_opening_rewrites_a_label_png_behind_its_history(world, tmp_path):
    # a kill between save()'s two writes: the history holds an edit the PNG (what fit reads) lacks
    out = tmp_path / "labels"
    s = session(world, out).store
    ops = [{"k": "s", "c": 0, "r": 3, "p": [10, 10, 60, 12]}, {"k": "s", "c": 1, "r": 4, "p": [100, 100, 140, 150]}]
    doc = {"ops": ops, "cursor": 2, "done": False, "width": 256, "height": 256}
    s.save("image_0", doc, replay({**doc, "cursor": 1}))  # the PNG of the first edit only
    s.save("image_1", {**doc, "cursor": 0}, replay({**doc, "cursor": 2}))  # a PNG of edits since undone
    assert not np.array_equal(data.load_mask(out / "image_0.png"), replay(doc))
    session(world, out)  # reopening
    assert np.array_equal(data.load_mask(out / "image_0.png"), replay(doc))
    assert not (out / "image_1.png").exists()  # nothing applied: no mask
    assert json.loads((out / "strokes" / "image_0.json").read_text())["ops"] == ops  # the history is untouched


def test_put_labels_becomes_an_undoable_edit(client):
    c, s = client
    lab = np.full((256, 256), UNLABELLED, np.uint8)
    lab[:40] = 0
    assert c.put("/api/labels/image_2", content=png_bytes(lab), headers=H).status_code == 200
    doc = c.get("/api/history/image_2", headers=H).json()
    assert doc["cursor"] == 1 and doc["ops"][0]["k"] == "set"
    assert np.array_equal(rle_decode(doc["ops"][0]["rle"], 256, 256), lab)


def test_put_labels_racing_a_history_put_drops_no_edit(world, tmp_path, monkeypatch):
    store = session(world, tmp_path / "labels").store
    stroke = {"k": "s", "c": 0, "r": 3, "p": [10, 10, 60, 12]}
    other = {"ops": [stroke], "cursor": 1, "done": False, "width": 256, "height": 256}
    read, racers = store.history, []

    def history_then_a_racing_put(name):  # a PUT /api/history arrives between set_labels' read and write
        doc = read(name)
        t = threading.Thread(target=store.save, args=(name, other, replay(other)))
        t.start()
        t.join(0.5)  # it finishes here unless set_labels holds the lock
        racers.append(t)
        return doc

    monkeypatch.setattr(store, "history", history_then_a_racing_put)
    lab = np.full((256, 256), UNLABELLED, np.uint8)
    lab[100:110, 100:150] = 1
    store.set_labels("image_0", lab)
    racers[0].join(10)
    monkeypatch.undo()
    final = store.history("image_0")
    assert stroke in final["ops"]  # the racing PUT's edit is the last write, not overwritten by a stale one
    assert np.array_equal(data.load_mask(store.label_path("image_0")), replay(final))


def test_masks_made_elsewhere_open_as_one_edit(client):
    """A full mask already in LABELS/ (colour-coded with the label set's colours) is there to correct."""
    c, s = client
    truth = np.zeros((256, 256), np.uint8)
    truth[60:190, 40:220] = 1
    Image.fromarray(s.store.labelset.palette()[truth]).save(s.store.out / "image_2.png")  # RGB colours
    doc = c.get("/api/history/image_2", headers=H).json()
    assert doc["cursor"] == 1 and doc["ops"][0]["k"] == "set"
    assert np.array_equal(rle_decode(doc["ops"][0]["rle"], 256, 256), truth)


def test_python_replay_matches_an_independent_disk_rasteriser():
    """A stroke is dabs every r/2 along each segment; check against a brute-force distance test."""
    lab = np.full((40, 50), UNLABELLED, np.uint8)
    pts = [5.2, 6.1, 30.7, 20.3, 44.0, 35.5]
    paint_stroke(lab, 1, 2.5, pts)
    yy, xx = np.mgrid[0:40, 0:50] + 0.5
    near = np.zeros_like(lab, bool)
    for (xa, ya), (xb, yb) in zip(zip(pts[0::2], pts[1::2]), zip(pts[2::2], pts[3::2])):
        t = np.clip(((xx - xa) * (xb - xa) + (yy - ya) * (yb - ya)) / ((xb - xa) ** 2 + (yb - ya) ** 2), 0, 1)
        near |= np.hypot(xx - (xa + t * (xb - xa)), yy - (ya + t * (yb - ya))) <= 2.5
    painted = lab == 1
    assert not (painted & ~near).any()  # never outside the stroke's capsule
    assert painted.sum() >= 0.9 * near.sum()  # dabs every r/2 cover nearly all of it


def test_rle_round_trip():
    a = np.random.default_rng(1).integers(0, 3, (17, 23)).astype(np.uint8)
    assert np.array_equal(rle_decode(rle_encode(a), 23, 17), a)


@pytest.mark.parametrize("make", [lambda n: [0, 2**62, 0, 2**62, 0, 2**62, 0, 2**62 + n],  # an int64 sum wraps to n
                                  lambda n: [0, 2**64 + n], lambda n: [0, -1, 0, n + 1], lambda n: [0, float(n)],
                                  lambda n: [0, str(n)], lambda n: [0, None], lambda n: [0, 2, 1, n - 2.5],
                                  lambda n: [300, n], lambda n: [0, 0, 0, n], lambda n: "0" * n, lambda n: [0, n - 1]])
def test_bad_rle_is_bad_input_never_a_crash(client, make):
    with pytest.raises(DdpmsegError, match="rle"):
        rle_decode(make(4), 2, 2)
    c, _ = client
    rle = make(256 * 256)
    good = rle_encode(np.zeros((256, 256), np.uint8))
    for doc in ({"ops": [{"k": "set", "rle": rle}], "cursor": 1, "done": False, "labels": good},  # a 'set' edit
                {"ops": [], "cursor": 0, "done": False, "labels": rle}):  # the labels of the PUT
        r = c.put("/api/history/image_0", content=json.dumps(doc), headers=H)
        assert r.status_code == 400 and "rle" in r.json()["error"], (doc, r.text)


# -- sparse labels -----------------------------------------------------------------------------
def _footprint_reference(mask: np.ndarray, pre: data.Preprocess, ignore: int) -> np.ndarray:
    """Straightforward per-cell loop: nearest sample, else the majority label of the cell's pixels."""
    w, h = pre.original_size
    rw, rh = pre.resized_size
    left, top = pre.crop_box[:2]
    near = data.prepare_mask(mask, pre)
    out = near.copy()
    for gy in range(near.shape[0]):
        for gx in range(near.shape[1]):
            if near[gy, gx] != ignore:
                continue
            votes = {}
            for y in range(h):
                if int((y + 0.5) * rh / h) - top != gy:
                    continue
                for x in range(w):
                    if int((x + 0.5) * rw / w) - left == gx and mask[y, x] != ignore:
                        votes[int(mask[y, x])] = votes.get(int(mask[y, x]), 0) + 1
            if votes:
                out[gy, gx] = max(sorted(votes), key=lambda k: votes[k])
    return out


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_thin_strokes_survive_a_coarse_grid(mode):
    rng = np.random.default_rng(0)
    mask = np.full((120, 90), UNLABELLED, np.int64)
    paint_stroke(mask, 0, 1.0, [5, 5, 80, 40])
    paint_stroke(mask, 1, 1.0, [10, 100, 70, 60])
    mask[rng.random(mask.shape) < 0.01] = 2
    _, pre = data.preprocess_image(np.zeros((120, 90, 3), np.uint8), 16, mode)
    got = data.prepare_mask(mask, pre, UNLABELLED)
    assert (data.prepare_mask(mask, pre) != UNLABELLED).sum() < (got != UNLABELLED).sum()
    assert np.array_equal(got, _footprint_reference(mask, pre, UNLABELLED))
    dense = rng.integers(0, 3, (120, 90))
    assert np.array_equal(data.prepare_mask(dense, pre, UNLABELLED), data.prepare_mask(dense, pre))
    dense[30:80, 20:60] = UNLABELLED  # a void region of a dense mask is not filled from its neighbours
    assert np.array_equal(data.prepare_mask(dense, pre, UNLABELLED), data.prepare_mask(dense, pre))


def test_a_class_under_min_pixels_is_ignored_not_replaced(world):
    """fit's 20-pixel rule on a sparse mask: the rare class's cells are ignored, never given a neighbour's label."""
    from ddpmseg.features.cache import FeatureCache
    from ddpmseg.pipeline import _training_masks

    mask = np.full((256, 256), UNLABELLED, np.int64)
    mask[100:104, 20:200] = 0
    mask[104:106, 60:65] = 1  # 10 pixels of class 1, touching the class-0 stroke
    path = world / "rare.npy"
    np.save(path, mask)
    with FeatureCache(world / "feats.h5") as cache:
        (grid,), largest = _training_masks(cache, [("image_0", path)], data.load_label_set(world / "classes.csv"),
                                           UNLABELLED, 20)
        pre = data.Preprocess.from_dict(cache.preprocess("image_0"))
    assert largest == 1 and set(np.unique(grid)) == {0, UNLABELLED}
    assert (grid[data.prepare_mask(mask, pre) == 1] == UNLABELLED).all()
    assert (grid == 0).sum() >= (data.prepare_mask(np.where(mask == 1, UNLABELLED, mask), pre) == 0).sum()


def test_fit_masks_labels_on_a_few_strokes(world, tmp_path):
    """`ddpmseg fit --masks LABELS/` on masks that are >95 % unlabelled: trains, quickly, on the strokes."""
    s = session(world, tmp_path / "labels")
    for i in range(2):
        truth = np.load(Path(__file__).parent / "fixtures" / "eyes8" / f"image_mask{i}.npy")
        truth = np.where(truth == 0, 0, 1)
        ops = scribbles(truth, per_class=2, radius=1.5, seed=i)
        doc = {"ops": ops, "cursor": len(ops), "done": False, "width": 256, "height": 256}
        s.store.save(f"image_{i}", doc, replay(doc))
        lab = data.load_mask(s.store.out / f"image_{i}.png")
        assert (lab == UNLABELLED).mean() > 0.95
        assert np.array_equal(lab[lab != UNLABELLED], truth[lab != UNLABELLED])  # scribbles stay inside their class
    t0 = time.perf_counter()
    r = run_cli("fit", "--features", world / "feats.h5", "--masks", tmp_path / "labels", "--classes",
                world / "classes.csv", "--ensemble", 2, "--max-epochs", 2, "--out", tmp_path / "model")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 60
    rec = json.loads((tmp_path / "model" / "model.json").read_text())
    assert rec["fit"]["images"] == ["image_0", "image_1"] and 0 < rec["fit"]["n_pixels"]


def test_predict_fits_once_per_label_change(client):
    c, s = client
    assert c.post("/api/predict/image_0", headers=H).status_code == 409  # nothing labelled yet: said in one line
    assert "nothing is labelled" in s.labeller.progress.error
    lab = np.full((256, 256), UNLABELLED, np.uint8)
    lab[10:30, 10:200] = 0
    lab[120:140, 60:120] = 1
    c.put("/api/labels/image_0", content=png_bytes(lab), headers=H)
    r = c.post("/api/predict/image_0", headers=H)
    assert r.status_code == 200 and r.headers["x-fitted"] == "true"
    pred = np.asarray(Image.open(io.BytesIO(r.content)))
    assert pred.shape == (256, 256) and set(np.unique(pred)) <= {0, 1}
    assert c.post("/api/predict/image_1", headers=H).headers["x-fitted"] == "false"  # same labels: no refit
    states = {i["name"]: i["state"] for i in c.get("/api/images", headers=H).json()}
    assert states == {"image_0": "predicted", "image_1": "predicted", "image_2": "unlabelled"}
    rle = c.get("/api/prediction/image_0?format=rle", headers=H).json()
    assert np.array_equal(rle_decode(rle["rle"], 256, 256), pred)
    assert c.get("/api/prediction/image_0/uncertainty", headers=H).status_code == 200
    assert c.get("/api/status", headers=H).json()["fits"] == 1
    lab[200:210, 10:100] = 1
    c.put("/api/labels/image_0", content=png_bytes(lab), headers=H)
    assert c.post("/api/predict/image_0", headers=H).headers["x-fitted"] == "true"


# -- a real server, killed ---------------------------------------------------------------------
def _start(world, out, port_file: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ddpmseg.cli.main", "-q", "label", str(world / "imgs"), "--classes",
           str(world / "classes.csv"), "--out", str(out), "--features", str(world / "feats.h5"), "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
    assert m, (line, p.stderr.read() if p.poll() is not None else "")
    return p, m.group(0)


def _put(url: str, token: str, name: str, doc: dict) -> None:
    base = url.split("?")[0]
    req = urllib.request.Request(f"{base}api/history/{name}", data=json.dumps(doc).encode(), method="PUT",
                                 headers={"X-Token": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def _get(url: str, token: str, path: str) -> dict:
    req = urllib.request.Request(f"{url.split('?')[0]}{path}", headers={"X-Token": token})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_kill_9_keeps_every_acknowledged_edit(world, tmp_path):
    out = tmp_path / "labels"
    p, url = _start(world, out, tmp_path / "port")
    token = url.split("token=")[1]
    try:
        ops: list[dict] = []
        rng = np.random.default_rng(0)
        acked = 0
        stop_at = time.perf_counter() + 60.0

        def kill_mid_stream() -> None:  # after a few acknowledged saves, while the next ones stream in
            while acked < 5 and time.perf_counter() < stop_at:
                time.sleep(0.01)
            time.sleep(0.05)
            p.send_signal(signal.SIGKILL)

        kill_after = threading.Thread(target=kill_mid_stream)
        kill_after.start()
        while time.perf_counter() < stop_at:
            x, y = rng.uniform(5, 250, 2)
            ops.append({"k": "s", "c": int(rng.integers(2)), "r": 3, "p": [round(x, 2), round(y, 2), round(x + 9, 2), round(y, 2)]})
            doc = {"ops": ops, "cursor": len(ops), "done": False, "width": 256, "height": 256}
            try:
                _put(url, token, "image_1", {**doc, "labels": rle_encode(replay(doc))})
            except (urllib.error.URLError, ConnectionError, OSError):
                break
            acked = len(ops)
        kill_after.join()
        p.wait(10)
        assert p.returncode == -signal.SIGKILL and acked > 3
    finally:
        if p.poll() is None:
            p.kill()
    p, url = _start(world, out, tmp_path / "port")
    token = url.split("token=")[1]
    try:
        doc = _get(url, token, "api/history/image_1")
        assert doc["cursor"] in (acked, acked + 1)  # every acknowledged edit; at most the one in flight beyond
        assert doc["ops"] == ops[: doc["cursor"]]
        on_disk = data.load_mask(out / "image_1.png")  # even after a kill between the JSON and the PNG
        assert np.array_equal(on_disk, replay(doc))
        assert not [f for f in out.rglob("*.tmp") if WORK not in f.parts]  # a killed write's temp files are gone
    finally:
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert p.returncode == 130  # Ctrl-C: one line saying what is kept
    assert err.strip().splitlines() == [err.strip()] and "every edit was saved" in err and "1 labelled image" in err


# -- CLI and library errors ---------------------------------------------------------------------
def test_cli_needs_exactly_one_source_of_features(world, tmp_path):
    r = run_cli("label", world / "imgs", "--classes", world / "classes.csv", "--out", tmp_path / "l")
    assert r.exit_code == 2 and "--features CACHE or --ckpt CKPT" in r.output
    r = run_cli("label", world / "imgs", "--classes", world / "classes.csv", "--out", tmp_path / "l", "--features",
                world / "feats.h5", "--preset", "ffhq_256")
    assert r.exit_code == 2


def test_cache_without_the_images_is_one_line(world, tmp_path, eyes8):
    fails("label", eyes8 / "image_7.jpg", "--classes", world / "classes.csv", "--out", tmp_path / "l", "--features",
          world / "feats.h5", match="not in --features")


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(DdpmsegError, match=r'pip install "ddpmseg\[label\]"'):
        server.run_server(None, None)


def test_other_hosts_warn(world, tmp_path, caplog):
    from ddpmseg.label import label_images

    stop = threading.Event()
    stop.set()  # serve nothing: return as soon as the server starts
    urls = []
    label_images([world / "imgs"], world / "classes.csv", tmp_path / "l", features=world / "feats.h5", host="0.0.0.0",
                 port=0, announce=urls.append, stop=stop)
    assert urls and urls[0].startswith("http://0.0.0.0:")
    assert any("other machines" in r.message for r in caplog.records)


def test_the_library_logs_the_url_instead_of_printing_it(world, tmp_path, caplog, capsys):
    import logging

    from ddpmseg.label import label_images

    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.INFO, logger="ddpmseg.label"):
        label_images([world / "imgs"], world / "classes.csv", tmp_path / "l", features=world / "feats.h5", port=0,
                     stop=stop)
    assert capsys.readouterr().out == ""  # library code is quiet
    assert any("http://127.0.0.1:" in r.getMessage() and "token=" in r.getMessage() for r in caplog.records)


def test_the_page_is_package_data():
    """Every file of the page is installed (setup.cfg's package_data), so a wheel serves it too."""
    import configparser
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    assert "ddpmseg.label" in cfg["options"]["packages"].split()
    patterns = [p.strip() for p in cfg["options.package_data"]["ddpmseg.label"].split(",")]
    files = [f.relative_to(server.STATIC.parent).as_posix() for f in server.STATIC.iterdir()]
    assert {"static/index.html", *(f"static/{n}" for n in server.STATIC_FILES)} <= set(files)
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files), (files, patterns)


def test_a_missing_browser_fails_where_ci_requires_it(monkeypatch):
    """.ci/run sets DDPMSEG_REQUIRE_BROWSER=1: there the browser test fails without chromium, never skips."""
    import label_helpers

    monkeypatch.setattr(label_helpers, "_which", lambda names: None)
    monkeypatch.setattr(label_helpers, "BROWSER_REQUIRED", True)
    with pytest.raises(pytest.fail.Exception, match="DDPMSEG_REQUIRE_BROWSER=1"):
        label_helpers.need_browser()
    monkeypatch.setattr(label_helpers, "BROWSER_REQUIRED", False)
    with pytest.raises(pytest.skip.Exception, match="chromium-driver"):
        label_helpers.need_browser()
    assert "DDPMSEG_REQUIRE_BROWSER=1" in (Path(__file__).parents[1] / ".ci" / "run").read_text()
