"""Extraction speed, arithmetic rate and cache size: ddpmseg vs the naive recipe, same run.

    python benchmarks/bench_extract.py [--preset ffhq_256] [--images 2] [--explore]

Builds the preset's full architecture with random weights (real checkpoints
cannot be downloaded here; speed does not depend on the weights): an ADM
preset (ffhq_256, ...) or a diffusers one (ddpm_celebahq_256, ...). Each mode
runs in its own child process so its peak RSS is its own. Prints one JSON
object per measurement.

naive:         the reference's way: one full forward per timestep (batch 1),
               forward hooks on the decoder blocks, every block upsampled to
               full size and concatenated in fp32 (8448 x 256 x 256 per image).
ddpmseg:       the default: the timesteps of an image as one batch, forward
               stopped after the last requested block, native maps kept, fp32.
ddpmseg_bf16:  the same with --precision bf16.
--explore adds variants that were measured and not kept: one timestep per
forward (--batch-size 1), channels_last memory format, one thread.

Also printed: the FLOPs each mode spends per image (torch's FlopCounterMode,
counted on the untimed warm-up image), the achieved GFLOP/s, and this CPU's
dense matmul rate in fp32 and bf16 measured in the same run. Everything
printed is saved in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import Results, peak_rss_mb, run_in_child

STEPS, BLOCKS = (50, 150, 250), (5, 6, 7, 8, 12)
MODES = {
    "naive": {},
    "ddpmseg": {"precision": "fp32"},
    "ddpmseg_bf16": {"precision": "bf16"},
}
EXPLORE = {
    "ddpmseg_batch1": {"precision": "fp32", "batch_size": 1},
    "ddpmseg_channels_last": {"precision": "fp32", "channels_last": True},
    "ddpmseg_bf16_batch1": {"precision": "bf16", "batch_size": 1},
    "ddpmseg_bf16_1thread": {"precision": "bf16", "threads": 1},
}


def build_backbone(preset: str):
    """The preset's architecture with deterministic random weights (either family)."""
    from ddpmseg.backbones import get_preset
    from ddpmseg.backbones.adm import AdmBackbone, random_unet

    p = get_preset(preset)
    if p.family == "diffusers":
        from ddpmseg.backbones.diffusers_unet import DiffusersBackbone, random_unet2d

        return DiffusersBackbone(p.config, random_unet2d(p.config.unet, seed=0), preset=preset)
    return AdmBackbone(p.config, random_unet(p.config, seed=0).eval(), preset=preset)


def block_modules(backbone) -> dict[int, torch.nn.Module]:
    """{block: module whose output is that decoder block}, for forward hooks."""
    if backbone.family == "adm":
        return {b: backbone.model.output_blocks[b] for b in BLOCKS}
    return {b: backbone.model.get_submodule(backbone.block_name(b).split(" ")[0]) for b in BLOCKS}


def naive_features(backbone, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The reference recipe: full forward per t with hooks, every block upsampled, fp32, in RAM."""
    size = backbone.image_size
    taps: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, b=b: taps.__setitem__(b, o))
             for b, m in block_modules(backbone).items()]
    feats = []
    try:
        with torch.no_grad():
            for t in STEPS:
                tt = torch.tensor([t])
                backbone.model(backbone.q_sample(x0, tt, noise), tt)
                feats += [F.interpolate(taps[b], size=(size, size), mode="bilinear", align_corners=False)
                          for b in BLOCKS]
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats, dim=1)


def _child(mode: str, preset: str, n_images: int, queue) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from ddpmseg.features.extractor import extract_block_maps, make_noise

    opts = {**MODES, **EXPLORE}[mode]
    if "threads" in opts:
        torch.set_num_threads(opts["threads"])
    backbone = build_backbone(preset)
    if opts.get("channels_last"):
        backbone.model.to(memory_format=torch.channels_last)
    size = backbone.image_size
    noise = make_noise(0, size)
    gen = torch.Generator().manual_seed(1)

    def run(x0: torch.Tensor):
        if mode == "naive":
            return naive_features(backbone, x0, noise)
        if opts.get("channels_last"):
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return extract_block_maps(backbone, x0, noise, STEPS, BLOCKS, opts.get("batch_size", 0), opts["precision"])

    times, flops = [], 0
    for i in range(n_images + 1):  # the first image warms up, counts FLOPs and is not timed
        x0 = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
        if i == 0:
            with FlopCounterMode(display=False) as counter:
                out = run(x0)
            flops = counter.get_total_flops()
            continue
        t0 = time.perf_counter()
        out = run(x0)
        times.append(time.perf_counter() - t0)
    seconds = sum(times) / len(times)
    if mode == "naive":
        nbytes = out.numel() * out.element_size()
    else:
        nbytes = sum(m.numel() * 2 for m in out.values())  # as stored: float16
    result = {"mode": mode, "preset": preset, "threads": torch.get_num_threads(),
              "seconds_per_image": round(seconds, 2), "gflop_per_image": round(flops / 1e9),
              "achieved_gflops": round(flops / 1e9 / seconds, 1), "bytes_per_image": nbytes,
              "peak_rss_mb": peak_rss_mb()}
    if mode != "naive" and opts["precision"] != "fp32":  # error of the last image's maps vs fp32
        ref = extract_block_maps(backbone, x0, noise, STEPS, BLOCKS)
        result["max_rel_error_vs_fp32"] = round(max(float((out[k] - ref[k]).norm() / ref[k].norm()) for k in ref), 4)
    queue.put(result)


def matmul_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """Best-of-``reps`` dense (n x n) @ (n x n) rate of this CPU at the current thread count."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cache_file_bytes(preset: str) -> int:
    """Size on disk of a one-image feature cache written by `extract` (ADM presets)."""
    import numpy as np
    from PIL import Image

    from ddpmseg.pipeline import extract_features
    from ddpmseg.records import ExtractConfig

    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "random.pt"
        torch.save(build_backbone(preset).model.state_dict(), ckpt)
        img = Path(d) / "img.png"
        Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8")).save(img)
        extract_features(ckpt, [img], Path(d) / "feats.h5", config=ExtractConfig(), preset=preset, device="cpu")
        return (Path(d) / "feats.h5").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ffhq_256", help="ADM or diffusers preset (see `ddpmseg presets`)")
    ap.add_argument("--images", type=int, default=2, help="timed images per mode (after one warm-up)")
    ap.add_argument("--explore", action="store_true", help="also measure the variants that were not kept")
    ap.add_argument("--no-cache-size", action="store_true", help="skip writing a one-image cache file")
    args = ap.parse_args()
    from ddpmseg.backbones import get_preset

    family = get_preset(args.preset).family
    with Results("extract", args) as out:
        rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
        out.row("matmul_peak", threads=torch.get_num_threads(), **{f"{k}_gflops": round(v, 1) for k, v in rates.items()})
        modes = list(MODES) + (list(EXPLORE) if args.explore else [])
        results = {}
        for mode in modes:
            r = run_in_child(_child, mode, args.preset, args.images)
            precision = (MODES | EXPLORE)[mode].get("precision", "fp32")
            r["fraction_of_matmul_peak"] = round(r["achieved_gflops"] / rates[precision], 3)
            results[mode] = r
            out.row("extract", **r)
        naive = results["naive"]["seconds_per_image"]
        out.row("extract_speedup", preset=args.preset,
                **{m: round(naive / r["seconds_per_image"], 2) for m, r in results.items() if m != "naive"})
        if family == "adm" and not args.no_cache_size:
            disk = cache_file_bytes(args.preset)
            naive_bytes = results["naive"]["bytes_per_image"]
            out.row("cache_size", preset=args.preset, cache_bytes_per_image=disk, naive_bytes_per_image=naive_bytes,
                    ratio=round(naive_bytes / disk, 1))


if __name__ == "__main__":
    sys.exit(main())
