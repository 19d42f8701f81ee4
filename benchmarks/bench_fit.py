"""Fit speed and memory: the fast and the reference recipe vs the naive trainer, in one run.

    python benchmarks/bench_fit.py [--images 20] [--pixels 16384] [--epochs 2]

Native-resolution block maps with the paper's shapes (ffhq_256, steps
50/150/250, blocks 5/6/7/8/12: 8448 channels, 34 classes: the wide 256/128
MLPs) are drawn at random for ``--images`` images (speed and memory do not
depend on the values). ``--pixels`` pixels of the first ``--naive-images``
images are labelled by a fixed random linear teacher (argmax of the exact
pixel feature times a random (8448, 34) matrix, so there is something to
learn) and every mode trains ``--epochs`` epochs on exactly these pixels, i.e.
on the same number of pixels per member. Each mode runs in its own child
process so its peak RSS is its own:

naive:      the reference's way: every upsampled 8448-dim fp32 pixel feature of
            the images in RAM (only ``--naive-images``, 2.2 GB each), ten MLPs
            trained one after another at batch 64 (the reference's loop, written
            out below; the same members, inits and shuffles as ddpmseg's).
reference:  ddpmseg's exact reference recipe: features streamed from the native
            maps of all ``--images`` images (CachePixels), the ten members as one
            batched computation, each on its own batches of 64.
fast:       ddpmseg's fast recipe (shared batches of 1024, layer 1 as one GEMM),
            bf16 layer 1 where the CPU has it ("auto") and in fp32 (fast_fp32).

Prints one JSON object per mode (wall time, ms per member-step, member-pixels/s,
peak RSS, training loss: the mean member cross-entropy on the trained pixels
after training, eval mode) and the ratios of member-pixels/s (= of time per
trained member) of each ddpmseg mode to the naive trainer's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import peak_rss_mb, run_in_child

SHAPES = {5: (1024, 32), 6: (512, 32), 7: (512, 32), 8: (512, 64), 12: (256, 128)}
KEYS = [(t, b) for t in (50, 150, 250) for b in SHAPES]
SIZE, CLASSES, MEMBERS = 256, 34, 10
MODES = {  # mode -> PixelEnsemble arguments (naive: the plain loop below)
    "naive": dict(recipe="reference"),
    "reference": dict(recipe="reference"),
    "fast": dict(recipe="fast", precision="auto"),
    "fast_fp32": dict(recipe="fast", precision="fp32"),
}


def _maps(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn((SHAPES[k[1]][0], SHAPES[k[1]][1], SHAPES[k[1]][1]), generator=g).half() for k in KEYS}
            for _ in range(n)]


def _labels(source, n_images: int, labelled_images: int, n_pixels: int, seed: int = 0) -> np.ndarray:
    """Labels for ``n_pixels`` pixels of the first ``labelled_images`` images (255 elsewhere): a random linear teacher."""
    rng = np.random.default_rng(seed)
    pix = np.sort(rng.choice(labelled_images * SIZE * SIZE, n_pixels, replace=False))
    teacher = torch.from_numpy(rng.normal(size=(source.n_features, CLASSES)).astype(np.float32))
    y = np.full(n_images * SIZE * SIZE, 255, dtype=np.int64)
    for lo in range(0, n_pixels, 4096):
        idx = torch.from_numpy(pix[lo : lo + 4096])
        y[idx.numpy()] = (source.gather(idx) @ teacher).argmax(1).numpy()
    return y


class NaiveEnsemble:
    """The reference's training loop, member after member (Adam 1e-3, batch 64, cross-entropy), in fp32."""

    recipe, precision_, batch_size_ = "naive", "fp32", 64

    def __init__(self, n_classes: int, n_members: int, max_epochs: int, random_state: int) -> None:
        self.k, self.m, self.epochs, self.seed = n_classes, n_members, max_epochs, random_state

    def fit(self, x: torch.Tensor, y: np.ndarray) -> "NaiveEnsemble":
        from ddpmseg.classify.members import default_hidden, init_mlp_, make_mlp
        from ddpmseg.classify.training import member_generators

        keep = torch.from_numpy(np.flatnonzero(y != 255))
        labels = torch.from_numpy(y)
        self.members, self.n_iter_, self.loss_curve_ = [], [], []
        for g in member_generators(self.seed, self.m):
            mlp = init_mlp_(make_mlp(x.shape[1], default_hidden(self.k), self.k), g).train()
            opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
            steps, curve = 0, []
            for _ in range(self.epochs):
                perm, losses = keep[torch.randperm(len(keep), generator=g)], []
                for lo in range(0, len(perm), 64):
                    idx = perm[lo : lo + 64]
                    opt.zero_grad()
                    loss = F.cross_entropy(mlp(x[idx]), labels[idx])
                    loss.backward()
                    opt.step()
                    steps += 1
                    losses.append(loss.item())
                curve.append(float(np.mean(losses)))
            self.members.append(mlp.eval())
            self.n_iter_.append(steps)
            self.loss_curve_.append(curve)
        return self

    @torch.no_grad()
    def predict_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([mlp(x) for mlp in self.members])


def _child(mode: str, n_images: int, labelled_images: int, n_pixels: int, epochs: int, queue) -> None:
    from ddpmseg.classify.ensemble import PixelEnsemble
    from ddpmseg.features.extractor import upsample_concat
    from ddpmseg.features.pixels import CachePixels, as_pixel_source

    maps = _maps(n_images)
    source = CachePixels(maps, KEYS, SIZE)
    y = _labels(source, n_images, labelled_images, n_pixels)
    if mode == "naive":  # every upsampled pixel feature of the images in RAM, fp32
        del source
        source = torch.cat([upsample_concat(m, KEYS, SIZE).reshape(-1, SIZE * SIZE).T for m in maps])
    del maps
    if mode == "naive":
        est = NaiveEnsemble(CLASSES, MEMBERS, epochs, random_state=0)
    else:
        est = PixelEnsemble(n_classes=CLASSES, n_members=MEMBERS, max_epochs=epochs, random_state=0, **MODES[mode])
    t0 = time.perf_counter()
    est.fit(source, y)
    seconds = time.perf_counter() - t0
    labelled = torch.from_numpy(np.flatnonzero(y != 255))
    target = torch.from_numpy(y[labelled.numpy()])
    pixels = as_pixel_source(source)
    logits = torch.cat([est.predict_member_logits(pixels.gather(labelled[lo : lo + 4096]))
                        for lo in range(0, len(labelled), 4096)], dim=1)
    loss = float(np.mean([F.cross_entropy(z, target).item() for z in logits]))
    steps = sum(est.n_iter_)
    member_pixels = MEMBERS * epochs * n_pixels
    queue.put({"mode": mode, "recipe": est.recipe, "precision": est.precision_, "batch_size": est.batch_size_,
               "images_in_ram": n_images, "labelled_pixels": n_pixels, "epochs": epochs,
               "pixels_seen_per_member": epochs * n_pixels, "fit_seconds": round(seconds, 2),
               "member_steps": steps, "ms_per_member_step": round(1000 * seconds / steps, 3),
               "member_pixels_per_s": round(member_pixels / seconds), "train_loss": round(loss, 4),
               "last_epoch_batch_loss": round(float(np.mean([c[-1] for c in est.loss_curve_])), 4),
               "peak_rss_mb": peak_rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--pixels", type=int, default=16384, help="labelled pixels trained on")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--naive-images", type=int, default=2, help="images the naive trainer holds (2.2 GB each)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    args = ap.parse_args()
    results = {}
    for mode in args.modes.split(","):
        n_images = args.naive_images if mode == "naive" else args.images
        results[mode] = run_in_child(_child, mode, n_images, args.naive_images, args.pixels, args.epochs)
        print(json.dumps({"benchmark": "fit", **results[mode]}), flush=True)
    if "naive" in results:
        base = results["naive"]
        for mode, r in results.items():
            if mode != "naive":
                print(json.dumps({"benchmark": "fit_speedup_vs_naive", "mode": mode,
                                  "member_pixels_per_s_ratio": round(r["member_pixels_per_s"] / base["member_pixels_per_s"], 2),
                                  "train_loss": r["train_loss"], "naive_train_loss": base["train_loss"]}), flush=True)


if __name__ == "__main__":
    main()
