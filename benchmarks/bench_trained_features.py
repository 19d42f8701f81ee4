"""Do features a diffusion model learned beat random ones? A DDPM trained here on 20 face photos.

    python benchmarks/bench_trained_features.py [--steps 2400] [--save-every 400] [--seeds 3]

The project's first measurement of the method on learned features. ``ddpmseg
train-ddpm``'s trainer trains the small 32 px ADM (``--image-size 32``: 32
channels, channel_mult 1,2,2, attention at 8, 1.9 M parameters) on the 20
FASSEG train photos (images only, no labels; research use, read in place)
with batch 16, lr 2e-4, flips, resized like extract resizes them. The run
is kept in ``$DDPMSEG_BENCH_CACHE`` (default ``~/.cache/ddpmseg/bench``) for
other benchmarks, and resumed there if it is shorter than ``--steps``.

Then, for the EMA weights after each ``--save-every`` steps and two controls
of the same architecture, the untrained initialisation (what training starts
from) and the project's usual random weights (every zero-initialised layer
filled, as the other benchmarks' random ADMs), ddpmseg's features of all 20
photos (t 50/150/250, blocks ``--blocks``: ``auto`` picks 2,3,4,6 of the 9)
and the pixel classifier (reference recipe, 10 members) fitted on the first
10 photos (their labels) for ``--seeds`` seeds, scored on the other 10.

Prints one JSON object per fit and a summary per weights (mean and sample
standard deviation of the held-out mIoU over seeds, per-class IoU means).
Everything printed is saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import FASSEG, Results
from ddpmseg.backbones.adm import build_unet, random_unet
from ddpmseg.pipeline import evaluate_model, extract_features, fit_model
from ddpmseg.records import ExtractConfig
from ddpmseg.train import TrainConfig, small_architecture, train_ddpm

CACHE = Path(os.environ.get("DDPMSEG_BENCH_CACHE", Path.home() / ".cache" / "ddpmseg" / "bench"))


def fasseg_ddpm(steps: int, save_every: int, progress: bool = True) -> Path:
    """The 32 px DDPM trained on the FASSEG photos, ``steps`` steps (trained or resumed here, then kept)."""
    run = CACHE / "fasseg32"
    images = FASSEG / "train" / "images"
    if (run / "train.json").is_file():
        train_ddpm([images], run, resume=True, steps=steps, device="cpu", progress=progress)
    else:
        config = TrainConfig(steps=steps, batch_size=16, lr=2e-4, save_every=save_every, sample_every=save_every,
                             n_samples=16, sample_steps=50)
        train_ddpm([images], run, config, image_size=32, device="cpu", progress=progress)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--save-every", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=10, help="labelled photos the classifier is fitted on")
    ap.add_argument("--blocks", default="auto", help="decoder blocks (auto: the paper's depths for this decoder)")
    args = ap.parse_args()
    with Results("trained_features", args) as out:
        _run(args, out)


def _run(args: argparse.Namespace, out: Results) -> None:
    t0 = time.perf_counter()
    run = fasseg_ddpm(args.steps, args.save_every)
    train_seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    out.row("train_ddpm", run=str(run), steps=args.steps, seconds_here=round(train_seconds),
            images_per_s=round(statistics.median(r["images_per_s"] for r in log), 1), final_loss=log[-1]["loss"],
            samples=str(sorted(run.glob("samples_*.png"))[-1]))

    images = sorted((FASSEG / "train" / "images").glob("*.png"))
    labels, classes = FASSEG / "train" / "labels", str(FASSEG / "classes.csv")
    train, test = images[: args.train], images[args.train :]
    arch = small_architecture(32)
    blocks = () if args.blocks == "auto" else tuple(int(b) for b in args.blocks.split(","))
    config = ExtractConfig(blocks=blocks)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "flags.json").write_text(json.dumps(arch.to_dict()))
        torch.manual_seed(TrainConfig().seed)  # the trainer's seeded initialisation
        torch.save(build_unet(arch).state_dict(), work / "untrained.pt")
        torch.save(random_unet(arch, seed=0).state_dict(), work / "random.pt")
        weights = {"random (filled)": work / "random.pt", "untrained init": work / "untrained.pt"}
        for step in range(args.save_every, args.steps + 1, args.save_every):
            weights[f"trained {step} steps"] = run / f"ema_{TrainConfig().ema}_{step:06d}.pt"
        for name, ckpt in weights.items():
            feats = work / f"{name}.h5"
            extract_features(ckpt, train, feats, config=config, model_flags=work / "flags.json", device="cpu")
            scores, per_class = [], []
            for seed in range(args.seeds):
                model = work / f"{name}_{seed}"
                f = fit_model(feats, labels, model, classes=classes, seed=seed, device="cpu", head="mlp",
                              options={"recipe": "reference"})
                r = evaluate_model(model, test, labels, device="cpu")
                scores.append(100 * r["miou"])
                per_class.append(r["per_class"])
                out.row("trained_features", weights=name, seed=seed, heldout_miou=round(scores[-1], 2),
                        fit_seconds=round(f.seconds, 1))
            classes_mean = {c: round(100 * statistics.mean(p[c] for p in per_class), 1) for c in per_class[0]}
            out.row("trained_features_summary", weights=name, seeds=args.seeds, miou_mean=round(statistics.mean(scores), 2),
                    miou_std=round(statistics.stdev(scores), 2) if len(scores) > 1 else 0.0, per_class=classes_mean)


if __name__ == "__main__":
    main()
