"""Does denoising the label map help? The DDP head against the MLP ensemble and the same head without diffusion.

    python benchmarks/bench_ddp_head.py [--kinds tiny,trained] [--seeds 3] [--iterations 1500]

Real images, real labels: FASSEG frontal02 (20 face photos, 6 classes; research
use only, read in place), the first 10 photos (sorted names) train, the last
10 are held out. Features of two kinds, each extracted once into a train and
a test cache:

tiny     the demo's random-weight ADM with the ffhq_256 block structure (64 px,
         1056 dims): the random-weight ffhq-depth ADM of the other benchmarks
trained  the 32 px DDPM that ``bench_trained_features.py`` trains on the 20
         photos with ``ddpmseg train-ddpm`` (its newest EMA weights; trained first
         if the run is missing)

Per kind and seed, three fits on the same features through ``fit_model``:

mlp      the MLP ensemble as ``ddpmseg fit`` runs it by default
ddp      the DDP head, then inference at 1, 3 and 10 steps with 1 and 8
         generations (one training, six inferences)
control  the same head trained and run without diffusion (a zero label map at
         a fixed time, one step): what the decoder alone gives

Prints one JSON object per (kind, seed, head, inference): held-out mIoU and
the expected calibration error of the mean softmax, both at the photos'
original size as ``ddpmseg evaluate`` scores them (ECE: 15 bins,
``ddpmseg.metrics.Calibration``), fit seconds and the classifier's seconds per
image (features from the cache); then per kind and variant the mean and
sample standard deviation over seeds. Everything printed is saved in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import FASSEG, Results, heldout_score, peak_rss_mb
from ddpmseg.pipeline import extract_features, fit_model

TRAINED_STEPS = 2400  # bench_trained_features.py's default run
INFERENCE = [(1, 1), (3, 1), (10, 1), (1, 8), (3, 8), (10, 8)]  # (steps, generations)


def _caches(kind: str, work: Path, train: list[Path], test: list[Path]) -> tuple[Path, Path]:
    if kind == "tiny":
        from ddpmseg.demo import make_tiny_checkpoint

        ckpt, flags = make_tiny_checkpoint(work)
        kw: dict = dict(model_flags=flags)
    elif kind == "trained":
        from bench_trained_features import fasseg_ddpm

        ckpt, kw = fasseg_ddpm(TRAINED_STEPS, 400), {}
    else:
        raise SystemExit(f"--kinds: unknown kind {kind!r}; use tiny or trained")
    out = work / f"{kind}_train.h5", work / f"{kind}_test.h5"
    extract_features(ckpt, train, out[0], device="cpu", **kw)
    extract_features(ckpt, test, out[1], device="cpu", **kw)
    return out


def _set_inference(model_dir: Path, steps: int, generations: int) -> None:
    """Rewrite a DDP model's inference settings in model.json (its weights are unchanged)."""
    path = model_dir / "model.json"
    d = json.loads(path.read_text())
    d["fit"]["head_config"].update(steps=steps, generations=generations)  # model.json format 3
    path.write_text(json.dumps(d, indent=2))


def _width(model_dir: Path) -> int | None:
    """The DDP head's width as model.json records it (None for the MLP ensemble)."""
    config = json.loads((model_dir / "model.json").read_text())["fit"].get("head_config") or {}
    return config.get("width")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FASSEG)
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["tiny", "trained"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=None, help="DDP head training steps (default: the head's)")
    ap.add_argument("--width", type=int, default=None, help="DDP head width (default: the head's; DDP's: 256)")
    ap.add_argument("--heads", type=lambda s: s.split(","), default=["mlp", "ddp", "control"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    images = sorted((args.data / "train" / "images").glob("*.png"))
    labels, classes = args.data / "train" / "labels", str(args.data / "classes.csv")
    train, test = images[:10], images[-10:]
    results: dict[tuple[str, str], list[dict]] = {}
    with Results("ddp_head", args) as out, tempfile.TemporaryDirectory(prefix="ddpmseg-ddp-") as tmp:
        work = Path(tmp)
        for kind in args.kinds:
            train_cache, test_cache = _caches(kind, work, train, test)
            for seed in range(args.seeds):
                for head in args.heads:
                    model = work / f"{kind}_{head}_{seed}"
                    if head == "mlp":
                        fit = fit_model(train_cache, labels, model, classes=classes, seed=seed, device="cpu", head="mlp")
                    else:
                        options = {"diffusion": head != "control", **{k: v for k, v in (("iterations", args.iterations),
                                                                                         ("width", args.width)) if v is not None}}
                        fit = fit_model(train_cache, labels, model, classes=classes, seed=seed, device="cpu", head="ddp",
                                        options=options)
                    variants = [(head, None)] if head != "ddp" else [(f"ddp_s{s}_g{g}", (s, g)) for s, g in INFERENCE]
                    for name, inference in variants:
                        if inference is not None:  # the same trained head, sampled another way
                            _set_inference(model, *inference)
                        r = out.row("ddp_head", kind=kind, seed=seed, variant=name, width=_width(model),
                                    fit_seconds=round(fit.seconds, 1), **heldout_score(model, test_cache, labels),
                                    peak_rss_mb=peak_rss_mb(), fit=fit.description)
                        results.setdefault((kind, name), []).append(r)
        for (kind, name), rows in results.items():
            summary = {"kind": kind, "variant": name, "width": rows[0]["width"], "seeds": len(rows), "ece_at": "original size"}
            for key in ("heldout_miou", "ece", "fit_seconds", "classify_s_per_image"):
                vals = [r[key] for r in rows]
                summary[f"{key}_mean"] = round(statistics.mean(vals), 4)
                summary[f"{key}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
            out.row("ddp_head_summary", **summary)


if __name__ == "__main__":
    main()
