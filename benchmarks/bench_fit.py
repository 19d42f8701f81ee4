"""Fit memory and speed: the streamed, fused ensemble vs the naive trainer.

    python benchmarks/bench_fit.py [--images 20] [--pixels 8192]

Native-resolution block maps with the paper's shapes (ffhq_256, steps
50/150/250, blocks 5/6/7/8/12: 8448 channels) are drawn at random for
``--images`` images (speed and memory do not depend on the values), and
``--pixels`` labelled pixels spread over them are trained on for one epoch.
Each mode runs in its own child process so its peak RSS is its own:

naive:   the reference's way: every pixel's upsampled 8448-dim fp32 feature of
         the training images held in RAM (only as many images as fit in
         --naive-gb), ten MLPs trained one after another.
ddpmseg: features streamed from the native maps (CachePixels), the ten
         members trained together as one batched computation.
Prints one JSON object per mode and the ratio of time per trained member-step.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from _common import peak_rss_mb, run_in_child

SHAPES = {5: (1024, 32), 6: (512, 32), 7: (512, 32), 8: (512, 64), 12: (256, 128)}
KEYS = [(t, b) for t in (50, 150, 250) for b in SHAPES]
SIZE, CLASSES = 256, 34


def _maps(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn((SHAPES[k[1]][0], SHAPES[k[1]][1], SHAPES[k[1]][1]), generator=g).half() for k in KEYS}
            for _ in range(n)]


def _labels(n_images: int, n_pixels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.full(n_images * SIZE * SIZE, 255, dtype=np.int64)
    y[rng.choice(len(y), n_pixels, replace=False)] = rng.integers(0, CLASSES, n_pixels)
    return y


def _child(mode: str, n_images: int, n_pixels: int, queue) -> None:
    from ddpmseg.classify.ensemble import PixelEnsemble
    from ddpmseg.features.extractor import upsample_concat
    from ddpmseg.features.pixels import CachePixels

    maps = _maps(n_images)
    y = _labels(n_images, n_pixels)
    if mode == "naive":  # every upsampled pixel feature of the images in RAM, fp32
        X = torch.cat([upsample_concat(m, KEYS, SIZE).reshape(-1, SIZE * SIZE).T for m in maps])
        del maps
        est = PixelEnsemble(n_classes=CLASSES, max_epochs=1, fused=False, random_state=0)
        source = X
    else:
        source = CachePixels(maps, KEYS, SIZE)
        del maps
        est = PixelEnsemble(n_classes=CLASSES, max_epochs=1, fused=True, random_state=0)
    t0 = time.perf_counter()
    est.fit(source, y)
    seconds = time.perf_counter() - t0
    steps = sum(est.n_iter_)
    queue.put({"mode": mode, "images": n_images, "pixels": n_pixels, "fit_seconds": round(seconds, 2),
               "member_steps": steps, "ms_per_member_step": round(1000 * seconds / steps, 2),
               "final_loss_mean": float(np.mean(est.final_loss_)),
               "peak_rss_mb": peak_rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--pixels", type=int, default=8192)
    ap.add_argument("--naive-images", type=int, default=2, help="images the naive trainer holds (2.2 GB each)")
    args = ap.parse_args()
    ours = run_in_child(_child, "ddpmseg", args.images, args.pixels)
    print(json.dumps({"benchmark": "fit", **ours}), flush=True)
    naive = run_in_child(_child, "naive", args.naive_images, args.pixels)
    print(json.dumps({"benchmark": "fit", **naive}), flush=True)
    print(json.dumps({"benchmark": "fit_speedup_per_member_step",
                      "ratio": round(naive["ms_per_member_step"] / ours["ms_per_member_step"], 2)}))


if __name__ == "__main__":
    main()
