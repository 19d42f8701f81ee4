"""Digests of everything a fixed run produces, to show two versions of ddpmseg give the same bits.

    python benchmarks/identity_digest.py > before.json   # on one commit
    python benchmarks/identity_digest.py > after.json    # on another
    diff before.json after.json                          # empty: bit-identical

Runs the CLI only (``extract``, ``fit`` with the reference and fast recipes,
``predict``) on two backbones built here without ddpmseg: the demo's tiny ADM
(guided-diffusion, random weights, seed 0) and a tiny diffusers
``UNet2DModel`` pipeline folder (seed 0), both on the eyes8 images and masks
vendored in ``tests/fixtures/eyes8`` (``--eyes8 DIR`` for another copy, e.g.
when the script runs against a checkout without it). The digests cover the
feature arrays and the noise in ``feats.h5`` (not its JSON attributes), every
tensor of the fitted ensembles, and the pixels of every predicted PNG (labels,
overlay, uncertainty). Single-threaded torch (``OMP_NUM_THREADS=1``), so the
digests depend on the code, not on the thread count.

The MLP settings go through ``fit --head-option n_members=3 / max_epochs=3 /
recipe=NAME`` (ddpmseg 0.2.0's head registry). For a version before it, whose
``fit`` has no ``--head-option``, pass ``--old-flags`` (``--ensemble 3
--max-epochs 3 --recipe NAME``, the same settings; 0.2.0 still takes them as
deprecated aliases, so both spellings give the same digests there).

Unlike the other scripts here it prints digests, not figures: it writes no
``benchmarks/results/*.json`` file (there is nothing for make_tables.py to
tabulate); keep its output yourself to compare two versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

EYES8 = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "eyes8"  # vendored (MIT)
TINY_ADM = {  # ddpmseg demo's tiny ADM (the ffhq_256 block structure at 64x64)
    "image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,2,2,4,4",
    "num_head_channels": 32, "attention_resolutions": "32,16,8", "learn_sigma": True,
    "resblock_updown": True, "use_scale_shift_norm": True,
}
TINY_UNET = dict(  # the google 256 DDPM structure, tiny
    sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128), layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    attention_head_dim=None, norm_num_groups=8, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)


def _zero_init_to_gaussian(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.02)


def make_adm(folder: Path) -> list[str]:
    from guided_diffusion import script_util

    torch.manual_seed(0)
    args = script_util.model_and_diffusion_defaults()
    args.update(TINY_ADM)
    model, _ = script_util.create_model_and_diffusion(**args)
    _zero_init_to_gaussian(model)
    torch.save(model.state_dict(), folder / "tiny_adm.pt")
    (folder / "tiny_adm.json").write_text(json.dumps(TINY_ADM))
    return ["--ckpt", str(folder / "tiny_adm.pt"), "--model-flags", str(folder / "tiny_adm.json")]


def make_diffusers(folder: Path) -> list[str]:
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**TINY_UNET)
    _zero_init_to_gaussian(model)
    model.save_pretrained(folder / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(
        folder / "pipe" / "scheduler"
    )
    return ["--ckpt", str(folder / "pipe")]


def _sha(a: np.ndarray | torch.Tensor) -> str:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.dtype).encode() + str(arr.shape).encode()).hexdigest()[:16]


def _tensors(obj, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = _sha(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            out.update(_tensors(obj[k], f"{prefix}/{k}"))
    return out


def digest_cache(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, _sha(obj[()])) if isinstance(obj, h5py.Dataset) else None)
    return dict(sorted(out.items()))


def run(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "ddpmseg.cli.main", "-q", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"ddpmseg {' '.join(args)} failed: {r.stderr.strip()}")


def mlp_options(recipe: str, old_flags: bool) -> list[str]:
    """fit's options for 3 members, 3 epochs at most and ``recipe``."""
    if old_flags:  # versions before the head registry (0.2.0 keeps these as deprecated aliases)
        return ["--ensemble", "3", "--max-epochs", "3", "--recipe", recipe]
    return ["--head", "mlp", "--head-option", "n_members=3", "--head-option", "max_epochs=3",
            "--head-option", f"recipe={recipe}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eyes8", type=Path, default=EYES8, help=f"the eyes8 images and masks (default: {EYES8})")
    ap.add_argument("--old-flags", action="store_true",
                    help="fit with --ensemble/--max-epochs/--recipe, for a ddpmseg before 0.2.0 (no --head-option)")
    args = ap.parse_args()
    eyes8 = args.eyes8
    if not all((eyes8 / f"image_{i}.jpg").is_file() and (eyes8 / f"image_mask{i}.npy").is_file() for i in range(8)):
        raise SystemExit(f"{eyes8} does not hold eyes8's image_0..7.jpg and image_mask0..7.npy; give --eyes8 DIR")
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        for i in range(8):
            shutil.copy(eyes8 / f"image_{i}.jpg", images)
        train = [str(images / f"image_{i}.jpg") for i in range(6)]
        for name, make in (("adm", make_adm), ("diffusers", make_diffusers)):
            d = work / name
            d.mkdir()
            ckpt = make(d)
            feats = d / "feats.h5"
            for img in train:  # one --images per file: works whether or not --images takes several paths
                run("extract", *ckpt, "--images", img, "--out", str(feats), "--device", "cpu")
            entry: dict[str, dict] = {"features": digest_cache(feats)}
            for recipe in ("reference", "fast"):
                model = d / f"model_{recipe}"
                run("fit", "--features", str(feats), "--masks", str(eyes8), *mlp_options(recipe, args.old_flags),
                    "--out", str(model), "--device", "cpu")
                entry[f"fit_{recipe}"] = _tensors(torch.load(model / "tensors.pt", weights_only=True))
                preds = d / f"preds_{recipe}"
                run("predict", str(images / "image_6.jpg"), str(images / "image_7.jpg"), "--model", str(model),
                    "--out", str(preds), "--device", "cpu")
                entry[f"predict_{recipe}"] = {p.name: _sha(np.asarray(Image.open(p))) for p in sorted(preds.glob("*.png"))}
            result[name] = entry
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
