"""Extraction speed and cache size: ddpmseg vs the naive recipe, same run.

    python benchmarks/bench_extract.py [--images 2] [--preset ffhq_256]

Builds the preset's full architecture with random weights (real checkpoints
cannot be downloaded here; speed does not depend on the weights). Each mode
runs in its own child process so its peak RSS is its own. Prints one JSON
object per measurement.

naive:   the reference's way: one full forward per timestep (batch 1), forward
         hooks on the decoder blocks, every block upsampled to full size and
         concatenated in fp32 (8448 x 256 x 256 per image).
ddpmseg: the timesteps of an image as one batch, forward stopped after the
         last requested block, native-resolution maps kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import peak_rss_mb, run_in_child

STEPS, BLOCKS = (50, 150, 250), (5, 6, 7, 8, 12)


def _child(mode: str, preset: str, n_images: int, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    from ddpmseg.backbones.adm import AdmBackbone, random_unet
    from ddpmseg.backbones.presets import get_preset
    from ddpmseg.features.extractor import extract_block_maps, make_noise

    cfg = get_preset(preset).config
    backbone = AdmBackbone(cfg, random_unet(cfg, seed=0).eval(), name=preset)
    size = cfg.image_size
    noise = make_noise(0, size)
    gen = torch.Generator().manual_seed(1)
    times = []
    nbytes = 0
    for i in range(n_images + 1):  # the first image warms up and is not timed
        x0 = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
        t0 = time.perf_counter()
        if mode == "naive":
            taps = {}
            hooks = [backbone.model.output_blocks[b].register_forward_hook(
                lambda m, i, o, b=b: taps.__setitem__(b, o)) for b in BLOCKS]
            feats = []
            with torch.no_grad():
                for t in STEPS:
                    tt = torch.tensor([t])
                    backbone.model(backbone.q_sample(x0, tt, noise), tt)
                    feats += [F.interpolate(taps[b], size=(size, size), mode="bilinear", align_corners=False)
                              for b in BLOCKS]
            out = torch.cat(feats, dim=1)
            nbytes = out.numel() * out.element_size()
            for h in hooks:
                h.remove()
        else:
            maps = extract_block_maps(backbone, x0, noise, STEPS, BLOCKS)
            nbytes = sum(m.numel() * 2 for m in maps.values())  # as stored: float16
        if i:
            times.append(time.perf_counter() - t0)
    queue.put({"mode": mode, "seconds_per_image": sum(times) / len(times), "bytes_per_image": nbytes,
               "peak_rss_mb": peak_rss_mb()})


def cache_file_bytes(preset: str) -> int:
    """Size on disk of a one-image feature cache written by `extract`."""
    from ddpmseg.backbones.adm import random_unet
    from ddpmseg.backbones.presets import get_preset
    from ddpmseg.features.extractor import ExtractConfig
    from ddpmseg.pipeline import extract_features
    from PIL import Image
    import numpy as np

    cfg = get_preset(preset).config
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "random.pt"
        torch.save(random_unet(cfg).state_dict(), ckpt)
        img = Path(d) / "img.png"
        Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8")).save(img)
        extract_features(ckpt, [img], Path(d) / "feats.h5", config=ExtractConfig(), preset=preset, device="cpu")
        return (Path(d) / "feats.h5").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ffhq_256")
    ap.add_argument("--images", type=int, default=2, help="timed images per mode (after one warm-up)")
    args = ap.parse_args()
    naive = run_in_child(_child, "naive", args.preset, args.images)
    print(json.dumps({"benchmark": "extract", "threads": torch.get_num_threads(), **naive}), flush=True)
    ours = run_in_child(_child, "ddpmseg", args.preset, args.images)
    print(json.dumps({"benchmark": "extract", "threads": torch.get_num_threads(), **ours}), flush=True)
    print(json.dumps({"benchmark": "extract_speedup", "ratio": round(naive["seconds_per_image"] / ours["seconds_per_image"], 2)}))
    disk = cache_file_bytes(args.preset)
    print(json.dumps({"benchmark": "cache_size", "cache_bytes_per_image": disk,
                      "naive_bytes_per_image": naive["bytes_per_image"],
                      "ratio": round(naive["bytes_per_image"] / disk, 1)}))


if __name__ == "__main__":
    sys.exit(main())
