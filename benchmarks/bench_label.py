"""`ddpmseg label` on real faces: the time from Predict to the overlay, and what strokes alone reach.

    python benchmarks/bench_label.py [--kinds trained,tiny] [--seeds 3] [--n-labelled 3]

FASSEG frontal02 (research use only, read in place; sorted names): the first ``--n-labelled`` photos are
labelled, the other photos are held out. Features of the 32 px DDPM trained on those photos
(``trained``: ~/.cache/ddpmseg/bench/fasseg32, made by bench_trained_features.py) and of the demo's
random-weight 64 px tiny ADM (``tiny``).

Strokes stand in for a person: per seed and photo, ``ddpmseg.label.strokes.scribbles`` draws 2 random
walks of radius 3 px per class inside the true mask (eroded, so every stroke pixel is right).

Predict to overlay: a real labelling server (uvicorn on 127.0.0.1, its HTTP API as the page calls it)
gets the strokes (PUT /api/history, as the page saves them); then the wall time of POST
/api/predict/NAME until its PNG has arrived: the first Predict (fits on the strokes, then predicts),
a Predict of another photo (no refit), and one after a new stroke (refit). The page then decodes and
draws the PNG (milliseconds, not included). ``--ckpt`` mode (seed 0): the first Predict of a fresh
server given the checkpoint instead of a feature cache, which loads the DDPM and extracts the
labelled photos first.

Strokes vs full masks: held-out mIoU (original size, as ``ddpmseg evaluate``) of a fit on the strokes
of the labelled photos and of a fit on their full masks, each with the labeller's quick fit
(``LABEL_FIT_OPTIONS``: 4 members, the fast recipe, 8 epochs) and with fit's default (10 members,
tiles recipe), and the fit seconds. Torch runs single-threaded; timings on a shared machine are
contaminated by its other load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from _common import FASSEG, Results, heldout_score
from ddpmseg import data, viz
from ddpmseg.label import open_session, server
from ddpmseg.label.engine import LABEL_FIT_OPTIONS
from ddpmseg.label.store import UNLABELLED, rle_encode
from ddpmseg.label.strokes import replay, scribbles
from ddpmseg.pipeline import extract_features, fit_model

FASSEG_DDPM = Path.home() / ".cache" / "ddpmseg" / "bench" / "fasseg32"
STROKE = dict(per_class=2, radius=3.0, steps=12)


def _checkpoint(kind: str, work: Path) -> tuple[Path, dict]:
    if kind == "tiny":
        from ddpmseg.demo import make_tiny_checkpoint

        ckpt, flags = make_tiny_checkpoint(work / "tiny")
        return ckpt, {"model_flags": flags}
    if not (FASSEG_DDPM / "flags.json").is_file():
        raise SystemExit(f"{FASSEG_DDPM} is missing: run benchmarks/bench_trained_features.py first")
    return FASSEG_DDPM, {}


class Server:
    """A labelling session served by uvicorn in a thread; requests as the page sends them."""

    def __init__(self, session) -> None:
        self.session = session
        self.sock = server.bind("127.0.0.1", 0)
        self.base = server.url_of(self.sock, "127.0.0.1", session.token).split("?")[0]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=server.run_server, args=(server.create_app(session), self.sock, self.stop),
                                       daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[bytes, dict]:
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={"X-Token": self.session.token, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.read(), dict(r.headers)

    def save(self, name: str, doc: dict) -> None:
        self.request("PUT", f"api/history/{name}", json.dumps({**doc, "labels": rle_encode(replay(doc))}).encode())

    def predict(self, name: str) -> tuple[float, bool]:
        t0 = time.perf_counter()
        png, headers = self.request("POST", f"api/predict/{name}")
        seconds = time.perf_counter() - t0
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        return seconds, headers.get("X-Fitted", headers.get("x-fitted")) == "true"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.sock.close()


def stroke_docs(truth: dict[str, np.ndarray], seed: int) -> dict[str, dict]:
    docs = {}
    for k, (name, mask) in enumerate(truth.items()):
        ops = scribbles(mask, seed=seed * 100 + k, **STROKE)
        h, w = mask.shape
        docs[name] = {"ops": ops, "cursor": len(ops), "done": False, "width": w, "height": h}
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG)
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["trained", "tiny"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-labelled", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=0, help="held-out photos (0: all the others)")
    ap.add_argument("--no-default-fit", action="store_true", help="leave out the fits with fit's default recipe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels = args.data / "train" / "labels"
    classes = args.data / "classes.csv"
    labelset = data.load_label_set(str(classes))
    train, test = images[: args.n_labelled], images[args.n_labelled:]
    test = test[: args.n_test] if args.n_test else test
    truth = {p.stem: data.load_mask(data.find_mask(p.stem, labels), labelset) for p in train}
    with Results("label", args) as out, tempfile.TemporaryDirectory(prefix="ddpmseg-bench-label-") as tmp:
        work = Path(tmp)
        full = work / "full"  # the true masks of the labelled photos as index PNGs (temporary, never kept)
        full.mkdir()
        for name, mask in truth.items():
            viz.save_label_png(full / f"{name}.png", mask, labelset.palette())
        for kind in args.kinds:
            ckpt, kw = _checkpoint(kind, work)
            t0 = time.perf_counter()
            extract_features(ckpt, train, work / f"{kind}-train.h5", **kw)
            extract_features(ckpt, test, work / f"{kind}-test.h5", **kw)
            extract_s = (time.perf_counter() - t0) / (len(train) + len(test))
            rows = []
            for seed in range(args.seeds):
                docs = stroke_docs(truth, seed)
                labelled_frac = float(np.mean([(replay(d) != UNLABELLED).mean() for d in docs.values()]))
                lab_dir = work / f"{kind}-labels-{seed}"
                s = open_session(train, classes, lab_dir, features=work / f"{kind}-train.h5")
                s.labeller.warm_up()  # what `ddpmseg label` does in a thread as it starts
                srv = Server(s)
                try:
                    for name, doc in docs.items():
                        srv.save(name, doc)
                    names = list(docs)
                    first, fitted = srv.predict(names[0])
                    assert fitted
                    other, refit = srv.predict(names[1])
                    assert not refit
                    extra = scribbles(truth[names[1]], seed=seed + 999, **{**STROKE, "per_class": 1})[:1]
                    doc = docs[names[1]]
                    doc = {**doc, "ops": doc["ops"] + extra, "cursor": len(doc["ops"]) + len(extra)}
                    srv.save(names[1], doc)
                    after_edit, refit = srv.predict(names[1])
                    assert refit
                    fit_s = s.labeller.progress.last_fit_seconds
                finally:
                    srv.close()
                row = dict(kind=kind, seed=seed, n_labelled=len(train), n_test=len(test),
                           labelled_pixels_percent=round(100 * labelled_frac, 2),
                           predict_first_s=round(first, 3), predict_other_s=round(other, 3),
                           predict_after_edit_s=round(after_edit, 3), label_fit_s=round(fit_s, 3))
                if seed == 0:  # --ckpt: the first Predict also loads the DDPM and extracts the labelled photos
                    s2 = open_session(train, classes, work / f"{kind}-ckpt-labels", checkpoint=ckpt,
                                      backbone_args=kw)
                    s2.labeller.warm_up()
                    srv = Server(s2)
                    try:
                        for name, d in docs.items():
                            srv.save(name, d)
                        row["predict_first_ckpt_s"] = round(srv.predict(names[0])[0], 3)
                    finally:
                        srv.close()
                # strokes vs full masks, held out; the strokes are the LABELS/ folder the server wrote
                recipes = {"label": dict(LABEL_FIT_OPTIONS)}
                if not args.no_default_fit:
                    recipes["default"] = None
                for what, masks in (("strokes", lab_dir), ("full", full)):
                    for recipe, options in recipes.items():
                        model = work / f"{kind}-{what}-{recipe}-{seed}"
                        summary = fit_model(work / f"{kind}-train.h5", masks, model, options=options,
                                            classes=str(classes), seed=seed, device="cpu", overwrite=True)
                        score = heldout_score(model, work / f"{kind}-test.h5", labels)
                        row[f"miou_{what}_{recipe}"] = score["heldout_miou"]
                        row[f"fit_s_{what}_{recipe}"] = round(summary.seconds, 2)
                        row[f"pixels_{what}"] = summary.n_pixels
                rows.append(row)
                out.row("label_run", **row)
            summary_row = dict(kind=kind, seeds=args.seeds, n_labelled=len(train), n_test=len(test),
                               extract_s_per_photo=round(extract_s, 3),
                               note="single-threaded torch; timings measured while other jobs loaded the machine")
            for key in rows[0]:
                if key in ("kind", "seed", "n_labelled", "n_test"):
                    continue
                vals = [r[key] for r in rows if key in r]
                summary_row[key] = {"mean": round(statistics.mean(vals), 3), "sd": round(statistics.stdev(vals), 3)
                                    if len(vals) > 1 else None, "n": len(vals)}
            out.row("label", **summary_row)


if __name__ == "__main__":
    main()
