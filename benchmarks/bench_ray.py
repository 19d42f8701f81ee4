"""What --engine ray costs on one machine: its fixed overhead and images/s against the plain loop.

    python benchmarks/bench_ray.py [--images 8,32] [--workers 1,2]

The demo's tiny ADM and a model fitted on 3 eyes (eyes8); ``predict`` of
``--images`` copies of the eyes8 photos, each mode in its own child process
(its own peak RSS, a cold start as a user sees it): the plain loop (2 torch
threads), and Ray Data actor pools of ``--workers`` actors of 1 CPU each on a
local Ray started by the run (``ray.init(num_cpus=2)``, counted in the time).
Fixed overhead and per-image cost come from a straight line through the two
image counts (wall = fixed + n x per-image). Everything printed is saved in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import EYES8, Results, peak_rss_mb, run_in_child


def _child(mode: str, workers: int, images: Path, model: Path, out: Path, queue) -> None:
    import torch

    torch.set_num_threads(2 if mode == "plain" else 1)
    t0 = time.perf_counter()
    from ddpmseg.pipeline import predict_images

    if mode == "plain":
        s = predict_images([images], model, out, device="cpu")
    else:
        import ray

        from ddpmseg.engines.ray_data import EngineSettings

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        s = predict_images([images], model, out, device="cpu", engine="ray",
                           engine_settings=EngineSettings(workers=workers, cpus_per_worker=1))
        ray.shutdown()
    queue.put({"mode": mode, "workers": workers, "images": s.n_images, "wall_seconds": round(time.perf_counter() - t0, 2),
               "peak_rss_mb_driver": peak_rss_mb()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=lambda s: [int(v) for v in s.split(",")], default=[8, 32])
    ap.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    args = ap.parse_args()
    from ddpmseg.demo import make_tiny_checkpoint
    from ddpmseg.pipeline import extract_features, fit_model

    with Results("ray", args) as log, tempfile.TemporaryDirectory(prefix="ddpmseg-ray-") as tmp:
        work = Path(tmp)
        ckpt, flags = make_tiny_checkpoint(work)
        lab = work / "lab"
        lab.mkdir()
        for i in range(3):
            shutil.copy(EYES8 / f"image_{i}.jpg", lab)
            shutil.copy(EYES8 / f"image_mask{i}.npy", lab)
        extract_features(ckpt, [lab], work / "f.h5", model_flags=flags, device="cpu")
        fit_model(work / "f.h5", lab, work / "model", device="cpu", head="mlp", options={"n_members": 10})
        results = {}
        for n in args.images:
            imgs = work / f"imgs{n}"
            imgs.mkdir()
            for i in range(n):
                shutil.copy(EYES8 / f"image_{i % 8}.jpg", imgs / f"img{i:03d}.jpg")
            for mode, workers in [("plain", 1)] + [("ray", w) for w in args.workers]:
                r = run_in_child(_child, mode, workers, imgs, work / "model", work / f"out_{mode}{workers}_{n}")
                results[(mode, workers, n)] = r
                log.row("ray_predict", **r)
        lo, hi = min(args.images), max(args.images)
        for mode, workers in [("plain", 1)] + [("ray", w) for w in args.workers]:
            a, b = results[(mode, workers, lo)]["wall_seconds"], results[(mode, workers, hi)]["wall_seconds"]
            per = (b - a) / (hi - lo)
            plain = (results[("plain", 1, hi)]["wall_seconds"] - results[("plain", 1, lo)]["wall_seconds"]) / (hi - lo)
            log.row("ray_summary", mode=mode, workers=workers, fixed_seconds=round(a - per * lo, 2),
                    s_per_image=round(per, 3), images_per_s=round(1 / per, 2) if per > 0 else None,
                    per_image_vs_plain=round(per / plain, 2) if plain > 0 else None)


if __name__ == "__main__":
    main()
