"""Does adding images cost more as the cache grows? Appending 2 images to caches of 20, 200 and 1,000 images.

    python benchmarks/bench_cache_append.py [--sizes 20,200,1000] [--repeats 5]

The demo's tiny ADM (64 px, features ~0.4 MB per image) extracts distinct
random 64x64 images. For each cache kind (a single ``.h5`` file, a cache
folder) and size N: extract N images, then time ``extract_features`` on 2
new images (``--repeats`` times, each with 2 other new images: the median is
printed), against the same call on an empty cache in the same run (what
extracting the 2 images costs by itself). The difference is what the cache's
size adds: a single file is rewritten through a full copy at the end of each
run (crash safety), a folder only gains the new images' files. Everything
printed is saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import Results
from ddpmseg.demo import make_tiny_checkpoint
from ddpmseg.pipeline import extract_features


def _images(folder: Path, prefix: str, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _cache_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.h5")) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[20, 200, 1000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with Results("cache_append", args) as log, tempfile.TemporaryDirectory(prefix="ddpmseg-append-") as tmp:
        work = Path(tmp)
        ckpt, flags = make_tiny_checkpoint(work)
        kw = dict(model_flags=flags, device="cpu")
        extract_features(ckpt, _images(work / "warm", "w", 1, 99), work / "warm.h5", **kw)  # warm-up
        for kind, suffix in (("file", ".h5"), ("folder", "")):
            base = []
            for r in range(args.repeats):  # the 2 images into an empty cache
                t0 = time.perf_counter()
                extract_features(ckpt, _images(work / f"e{kind}{r}", "e", 2, 1000 + r), work / f"empty_{kind}{r}{suffix}", **kw)
                base.append(time.perf_counter() - t0)
            empty = statistics.median(base)
            for n in args.sizes:
                out = work / f"cache_{kind}_{n}{suffix}"
                extract_features(ckpt, _images(work / f"big{n}", "b", n, n), out, **kw)
                times = []
                for r in range(args.repeats):
                    new = _images(work / f"new_{kind}_{n}_{r}", f"n{r}_", 2, 10 * n + r)
                    t0 = time.perf_counter()
                    extract_features(ckpt, new, out, **kw)
                    times.append(time.perf_counter() - t0)
                append = statistics.median(times)
                log.row("cache_append", kind=kind, cache_images=n, cache_mb=round(_cache_bytes(out) / 2**20, 1),
                        append_2_seconds=round(append, 3), empty_cache_2_seconds=round(empty, 3),
                        overhead_seconds=round(append - empty, 3), ratio_to_empty=round(append / empty, 2))


if __name__ == "__main__":
    main()
