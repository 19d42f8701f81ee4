"""Fit speed and memory: the recipes against the naive trainer, in one run, on the paper's feature shapes.

    python benchmarks/bench_fit.py [--images 20] [--budget 32768] [--modes naive,reference,fast,tiles,tiles_full]
                                   [--full-reference]

Native-resolution block maps with the paper's shapes (ffhq_256, steps
50/150/250, blocks 5/6/7/8/12: 8448 channels, 34 classes: the wide 256/128
MLPs) are drawn at random for ``--images`` 256x256 images, and every pixel is
labelled by a fixed random linear teacher (argmax of the exact pixel feature
times a random (8448, 34) matrix: dense labels like FFHQ-34's, and something
to learn). Each mode runs in its own child process (its own peak RSS):

naive       the reference's way: every upsampled 8448-dim fp32 pixel feature in RAM (only
            ``--naive-images`` images fit: 2.2 GB each), ten MLPs one after another at batch
            64 (the reference's loop, written out below; the members, inits and shuffles are
            ddpmseg's), ``--budget`` pixels per member
reference   ddpmseg's exact reference recipe, streaming all images' native maps,
            ``--budget`` pixels per member
fast        shared batches of 1024 gathered pixels (bf16 layer 1 where the CPU has it)
tiles       shared batches of image tiles, layer 1 at the maps' native resolution
tiles_full  the tiles recipe as `ddpmseg fit` runs it by default: every labelled pixel of
            all images until its stopping rule (a plateau of the training loss) ends it
reference_full  (``--full-reference``) the reference recipe's whole fit of every labelled
            pixel, to its own early stop (at least 4 epochs; hours on 2 CPU cores)

Prints one JSON object per mode (wall time, member-pixels/s, peak RSS, the
training loss on the first 4096 labelled pixels, eval mode), the speed ratios
to the naive trainer, and the full fits compared (``fit_full_comparison``):
the tiles recipe's measured fit against the reference recipe's, which is
measured with ``--full-reference`` and otherwise projected from the
``reference`` mode's member-pixels/s at its minimum budget (4 epochs of
every labelled pixel, ten members: its stop comes later, so the projection
understates it); ``reference_full_fit`` says which ("measured" or
"projected"). Everything printed is saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import Results, peak_rss_mb, run_in_child

SHAPES = {5: (1024, 32), 6: (512, 32), 7: (512, 32), 8: (512, 64), 12: (256, 128)}
KEYS = [(t, b) for t in (50, 150, 250) for b in SHAPES]
SIZE, CLASSES, MEMBERS = 256, 34, 10
MODES = {  # mode -> PixelEnsemble arguments (naive: the plain loop below)
    "naive": dict(recipe="reference"),
    "reference": dict(recipe="reference"),
    "fast": dict(recipe="fast", precision="auto"),
    "tiles": dict(recipe="tiles", precision="auto"),
    "tiles_full": dict(recipe="tiles", precision="auto"),
    "reference_full": dict(recipe="reference"),
}
FULL = ("tiles_full", "reference_full")  # every labelled pixel, each recipe's own stopping rule


def _maps(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn((SHAPES[k[1]][0], SHAPES[k[1]][1], SHAPES[k[1]][1]), generator=g).half() for k in KEYS}
            for _ in range(n)]


def _labels(source, n_images: int, seed: int = 0) -> np.ndarray:
    """Every pixel of the ``n_images`` images labelled by a random linear teacher."""
    rng = np.random.default_rng(seed)
    teacher = torch.from_numpy(rng.normal(size=(source.n_features, CLASSES)).astype(np.float32))
    y = np.empty(n_images * SIZE * SIZE, dtype=np.int64)
    for lo in range(0, len(y), 8192):
        idx = torch.arange(lo, min(len(y), lo + 8192))
        y[lo : lo + len(idx)] = (source.gather(idx) @ teacher).argmax(1).numpy()
    return y


def _budget_labels(y: np.ndarray, budget: int) -> np.ndarray:
    """The same labels, kept on the first ``budget`` pixels (raster order: a dense region, as masks are)."""
    out = np.full_like(y, 255)
    out[:budget] = y[:budget]
    return out


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
        self.members, self.n_iter_ = [], []
        for g in member_generators(self.seed, self.m):
            mlp = init_mlp_(make_mlp(x.shape[1], default_hidden(self.k), self.k), g).train()
            opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
            steps = 0
            for _ in range(self.epochs):
                perm = keep[torch.randperm(len(keep), generator=g)]
                for lo in range(0, len(perm), 64):
                    idx = perm[lo : lo + 64]
                    opt.zero_grad()
                    F.cross_entropy(mlp(x[idx]), labels[idx]).backward()
                    opt.step()
                    steps += 1
            self.members.append(mlp.eval())
            self.n_iter_.append(steps)
        return self

    @torch.no_grad()
    def predict_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([mlp(x) for mlp in self.members])


def _child(mode: str, n_images: int, naive_images: int, budget: int, queue) -> None:
    from ddpmseg.heads.mlp import PixelEnsemble
    from ddpmseg.features.extractor import upsample_concat
    from ddpmseg.features.pixels import CachePixels, as_pixel_source

    maps = _maps(n_images)
    source = CachePixels(maps, KEYS, SIZE)
    y = _labels(source, n_images)
    full = mode in FULL
    if not full:  # the speed modes: the same budget of labelled pixels, one epoch per member
        y = _budget_labels(y, budget)
    if mode == "naive":  # every upsampled pixel feature of the first images in RAM, fp32 (the budget's pixels lie there)
        assert budget <= naive_images * SIZE * SIZE, "--budget must fit in the naive trainer's images"
        del source
        source = torch.cat([upsample_concat(m, KEYS, SIZE).reshape(-1, SIZE * SIZE).T for m in maps[:naive_images]])
        y = y[: naive_images * SIZE * SIZE]
        est = NaiveEnsemble(CLASSES, MEMBERS, 1, random_state=0)
    else:
        est = PixelEnsemble(n_classes=CLASSES, n_members=MEMBERS, max_epochs=100 if full else 1, min_epochs=4,
                            random_state=0, **MODES[mode])
    del maps
    t0 = time.perf_counter()
    est.fit(source, y)
    seconds = time.perf_counter() - t0
    labelled = torch.from_numpy(np.flatnonzero(y != 255))
    probe = labelled[:4096]
    pixels = as_pixel_source(source)
    logits = est.predict_member_logits(pixels.gather(probe))
    loss = float(np.mean([F.cross_entropy(z, torch.from_numpy(y[probe.numpy()])).item() for z in logits]))
    steps = sum(est.n_iter_)
    batch = getattr(est, "batch_size_", 64)
    member_pixels = sum(est.pixels_seen_) if hasattr(est, "pixels_seen_") else MEMBERS * len(labelled)
    queue.put({"mode": mode, "recipe": est.recipe, "precision": est.precision_, "batch_size": batch,
               "images": n_images if mode != "naive" else naive_images, "labelled_pixels": int(len(labelled)),
               "fit_seconds": round(seconds, 2), "member_steps": steps, "steps_per_member": max(est.n_iter_),
               "pixels_per_member": member_pixels // MEMBERS,
               "member_pixels_per_s": round(member_pixels / seconds), "train_loss": round(loss, 4),
               "peak_rss_mb": peak_rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--budget", type=int, default=32768, help="labelled pixels per member in the speed modes")
    ap.add_argument("--naive-images", type=int, default=2, help="images the naive trainer holds (2.2 GB each)")
    ap.add_argument("--modes", default="naive,reference,fast,tiles,tiles_full",
                    help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--full-reference", action="store_true",
                    help="also measure the reference recipe's whole fit (mode reference_full; hours) instead of "
                         "projecting it from the reference mode's rate")
    args = ap.parse_args()
    modes = args.modes.split(",") + (["reference_full"] if args.full_reference and "reference_full" not in args.modes else [])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)}; use {', '.join(MODES)}")
    with Results("fit", args) as out:
        results = {}
        for mode in modes:
            results[mode] = run_in_child(_child, mode, args.images, args.naive_images, args.budget)
            out.row("fit", **results[mode])
        base = results.get("naive")
        for mode, r in results.items():
            if base is not None and mode != "naive":
                out.row("fit_speedup_vs_naive", mode=mode, member_pixels_per_s_ratio=
                        round(r["member_pixels_per_s"] / base["member_pixels_per_s"], 2))
        labelled = args.images * SIZE * SIZE
        if "reference_full" in results:
            line = {"reference_full_fit": "measured", "reference_full_fit_seconds": results["reference_full"]["fit_seconds"],
                    "reference_steps_per_member": results["reference_full"]["steps_per_member"]}
        elif "reference" in results:
            line = {"reference_full_fit": "projected",
                    "reference_full_fit_seconds": round(4 * labelled * MEMBERS / results["reference"]["member_pixels_per_s"]),
                    "projection_budget": "4 epochs x every labelled pixel x 10 members (the reference's minimum; "
                                         "its early stop comes later, so this understates it)"}
        else:
            return
        line.update(images=args.images, labelled_pixels=labelled)
        if "tiles_full" in results:
            line["tiles_full_fit_seconds"] = results["tiles_full"]["fit_seconds"]
            line["tiles_steps_per_member"] = results["tiles_full"]["steps_per_member"]
            line["speedup"] = round(line["reference_full_fit_seconds"] / results["tiles_full"]["fit_seconds"], 1)
        out.row("fit_full_comparison", **line)


if __name__ == "__main__":
    main()
