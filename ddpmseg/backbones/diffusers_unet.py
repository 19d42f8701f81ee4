"""A diffusers ``UNet2DModel`` as a frozen feature backbone (the second family).

Needs the optional extra: ``pip install "ddpmseg[diffusers]"``. diffusers and
huggingface_hub are imported only inside the functions of this module (through
``ddpmseg._optional``). Locating a folder or hub id and loading it is here;
``create_backbone`` (the builder) decides which family a source is.

Block numbering is guided-diffusion's ``output_blocks`` numbering. With
``L = layers_per_block``, every diffusers up block holds ``L + 1`` resnets
(each followed by an attention in ``AttnUpBlock2D``) and, except the last
block, an upsampler; guided-diffusion's decoder level holds ``L + 1`` output
blocks, the last one ending with the upsampler. So decoder unit ``k`` is up
block ``level = k // (L+1)``, position ``j = k % (L+1)``:

* ``j < L``: the output of ``up_blocks[level].attentions[j]`` when the block
  has attentions, else of ``up_blocks[level].resnets[j]``;
* ``j = L``: the output of the whole up block ``up_blocks[level]``, i.e. its
  last resnet (``resnets[L]``), its last attention (``attentions[L]``, if
  any), then its upsampler (none in the last up block).

For the 256x256 google DDPMs, blocks 5, 6, 7, 8, 12 are 512x32^2, 256x32^2,
256x32^2, 256x64^2, 128x128^2 (1408 channels per timestep), the same depths
as the paper's ADM blocks.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmseg._optional import diffusers as import_diffusers
from ddpmseg._optional import guided_diffusion, optional_import
from ddpmseg.backbones._base import Backbone, BlockInfo, fill_zero_weights_
from ddpmseg.backbones.configs import CheckpointRef, DiffusersConfig
from ddpmseg.errors import DdpmsegError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".npz", ".h5")
# huggingface_hub's errors (offline, not cached, no such repository, bad id) are OSErrors or ValueErrors
_HUB_ERRORS = (OSError, ValueError)


# --------------------------------------------------------------------------- locating


def looks_like_hub_id(checkpoint: str | Path) -> bool:
    """``org/name`` that is not a local path (and whose first part is no local folder)."""
    text = str(checkpoint)
    if Path(text).exists() or not _HUB_ID.match(text) or text.lower().endswith(_FILE_SUFFIXES):
        return False
    return not Path(text.split("/")[0]).is_dir()


def _snapshot(repo_id: str, purpose: str, **kwargs: Any) -> Path:
    hub = optional_import("huggingface_hub", purpose)
    return Path(hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, **kwargs))


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub model: from the cache, else downloaded (configs + weights)."""
    purpose = f"{repo_id} looks like a Hugging Face hub id, which"
    fix = f"download it where there is network (hf download {repo_id} --local-dir DIR) and pass --ckpt DIR"
    try:
        return _snapshot(repo_id, purpose, local_files_only=True)
    except _HUB_ERRORS:
        pass  # not in the cache: download it below, unless offline
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise DdpmsegError(f"{repo_id} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set; {fix}")
    try:
        return _snapshot(repo_id, purpose)
    except _HUB_ERRORS as e:
        raise DdpmsegError(
            f"cannot download {repo_id} from the Hugging Face hub (no network, or no such repository: "
            f"{type(e).__name__}); {fix}"
        ) from None


def download_hub(repo_id: str, dest: Path) -> Path:
    """Fetch a hub model's configs and weights into the folder ``dest`` (huggingface_hub resumes)."""
    try:
        _snapshot(repo_id, f"downloading {repo_id}", local_dir=str(dest))
    except _HUB_ERRORS as e:
        raise DdpmsegError(
            f"download of {repo_id} into {dest} failed (no network, HF_HUB_OFFLINE set, or no such repository: "
            f"{type(e).__name__}); run the same command again, or download it elsewhere "
            f"(hf download {repo_id} --local-dir DIR) and pass the folder as --ckpt"
        ) from None
    locate(dest)  # checks config.json + weights are there
    return dest


def _weights_file(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def locate(checkpoint: str | Path) -> tuple[Path, Path | None, str]:
    """(unet folder, scheduler config file or None, display name) of a folder or hub id."""
    name = str(checkpoint)
    root = resolve_hub_id(name) if looks_like_hub_id(checkpoint) else Path(checkpoint)
    if not root.exists():
        raise DdpmsegError(f"diffusers model folder {root} does not exist; pass a folder with config.json and weights, or a hub id")
    if not root.is_dir():
        raise DdpmsegError(f"{root} is a file, not a diffusers model folder")
    if (root / "unet" / "config.json").is_file():
        unet = root / "unet"
    elif (root / "config.json").is_file():
        unet = root
    else:
        raise DdpmsegError(
            f"{root} is not a diffusers model folder: no config.json nor unet/config.json in it; "
            "pass the folder written by UNet2DModel.save_pretrained or a pipeline folder with unet/"
        )
    if _weights_file(unet) is None:
        raise DdpmsegError(
            f"diffusers model folder {unet} has config.json but no weights ({' or '.join(WEIGHT_FILES)}); "
            "copy the weights file next to it"
        )
    sched = None
    for cand in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                 unet.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            sched = cand
            break
    return unet, sched, name


def weights_file(unet_dir: Path) -> Path:
    """The weights file of a located unet folder (what the recorded sha256 is taken of)."""
    path = _weights_file(unet_dir)
    if path is None:  # pragma: no cover - locate() refuses such folders
        raise DdpmsegError(f"diffusers model folder {unet_dir} has no weights ({' or '.join(WEIGHT_FILES)})")
    return path


# --------------------------------------------------------------------------- building


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DdpmsegError(f"cannot read {what} {path}: {' '.join(str(e).split())}; fix or replace the file") from None
    if not isinstance(obj, dict):
        raise DdpmsegError(f"{what} {path} must hold a JSON object")
    return obj


def build_scheduler(config: DiffusersConfig):
    """The diffusers scheduler of ``config`` (None: guided-diffusion's linear schedule is used)."""
    if config.scheduler is None:
        return None
    diffusers = import_diffusers()
    cls_name = dict(config.scheduler).get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not hasattr(cls, "add_noise"):
        cls = diffusers.DDPMScheduler
    try:
        return cls.from_config(dict(config.scheduler))
    except (ValueError, KeyError) as e:
        raise DdpmsegError(
            f"cannot build the scheduler from its config ({type(e).__name__}: {e}); remove or fix scheduler_config.json"
        ) from None


class DiffusersBackbone(Backbone):
    """A frozen diffusers UNet2DModel plus the noise schedule of its pipeline."""

    def __init__(
        self,
        config: DiffusersConfig,
        model: torch.nn.Module,
        preset: str | None = None,
        checkpoint: CheckpointRef | None = None,
    ) -> None:
        self.config = config
        self.model = model.eval().requires_grad_(False)
        self.preset = preset
        self.checkpoint = checkpoint
        self._check_structure()
        self.scheduler = build_scheduler(config)
        if self.scheduler is None:
            self.diffusion = guided_diffusion("script_util").create_gaussian_diffusion(
                steps=config.diffusion_steps, noise_schedule="linear", timestep_respacing=""
            )

    def _check_structure(self) -> None:
        m, cfg = self.model, self.config
        n = len(cfg.block_out_channels)
        if len(m.up_blocks) != n:
            raise DdpmsegError(f"UNet2DModel has {len(m.up_blocks)} up blocks but config.json lists {n} channel widths")
        for i, block in enumerate(m.up_blocks):
            kind = type(block).__name__
            if kind not in SUPPORTED_UP_BLOCKS:
                raise DdpmsegError(
                    f"up block {i} is a {kind}; ddpmseg taps {', '.join(SUPPORTED_UP_BLOCKS)} only"
                )
            if len(block.resnets) != cfg.layers_per_block + 1:
                raise DdpmsegError(f"up block {i} has {len(block.resnets)} resnets, expected layers_per_block + 1")
        if m.class_embedding is not None:
            raise DdpmsegError("this UNet2DModel is class-conditional; ddpmseg supports unconditional models only")
        cfg.image_size  # noqa: B018 (raises on non-square / missing sample_size)

    def _unit(self, k: int) -> tuple[int, int]:
        return divmod(k, self.config.layers_per_block + 1)

    def block_name(self, k: int) -> str:
        """The module whose output is decoder unit ``k`` ("up_blocks.1 (upsampler)" = the whole up block)."""
        level, j = self._unit(k)
        block = self.model.up_blocks[level]
        if j == self.config.layers_per_block:
            return f"up_blocks.{level}" + (" (upsampler)" if block.upsamplers is not None else "")
        part = "attentions" if getattr(block, "attentions", None) is not None and len(block.attentions) else "resnets"
        return f"up_blocks.{level}.{part}.{j}"

    def blocks(self) -> list[BlockInfo]:
        return [
            BlockInfo(k, self.block_name(k), c, r) for k, (c, r) in enumerate(self.config.output_block_shapes())
        ]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t with the pipeline's scheduler (``add_noise``), else guided-diffusion's linear schedule."""
        if self.scheduler is not None:
            return self.scheduler.add_noise(x0, noise, t)
        return self.diffusion.q_sample(x0, t, noise=noise)

    def betas(self) -> np.ndarray:
        if self.scheduler is not None:
            return self.scheduler.betas.double().cpu().numpy()
        return np.asarray(self.diffusion.betas, dtype=np.float64)

    def variance(self) -> str:
        if self.model.config.out_channels == 2 * self.model.config.in_channels:
            return "learned"
        kind = dict(self.config.scheduler or {}).get("variance_type", "fixed_small")
        return "fixed_large" if str(kind).startswith("fixed_large") else "fixed_small"

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = dict(self.config.scheduler or {}).get("prediction_type", "epsilon")
        if kind != "epsilon":
            raise DdpmsegError(f"this model predicts {kind!r}, not the noise; the reverse process here needs an "
                               "epsilon-prediction model")
        return self.model(x_t, t).sample.float()

    @torch.inference_mode()
    def _forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, indices: list[int], stop_early: bool
    ) -> dict[int, torch.Tensor]:
        """Mirrors ``UNet2DModel.forward`` (diffusers 0.30-0.42) and the up blocks' own forwards."""
        m = self.model
        wanted = set(indices)
        last = max(wanted)
        L = self.config.layers_per_block
        sample = x
        if m.config.center_input_sample:
            sample = 2 * sample - 1.0
        # 1. time
        timesteps = t
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = m.time_embedding(m.time_proj(timesteps).to(dtype=m.dtype))
        # 2. pre-process
        skip_sample = sample
        sample = m.conv_in(sample)
        # 3. down
        res_samples_all: tuple[torch.Tensor, ...] = (sample,)
        for down in m.down_blocks:
            if hasattr(down, "skip_conv"):
                sample, res, skip_sample = down(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, res = down(hidden_states=sample, temb=emb)
            res_samples_all += res
        # 4. mid
        if m.mid_block is not None:
            sample = m.mid_block(sample, emb)
        # 5. up, resnet by resnet (the up blocks' forward code, unrolled)
        out: dict[int, torch.Tensor] = {}
        for level, up in enumerate(m.up_blocks):
            n_res = len(up.resnets)
            res = res_samples_all[-n_res:]
            res_samples_all = res_samples_all[:-n_res]
            attns = getattr(up, "attentions", None)
            for j, resnet in enumerate(up.resnets):
                sample = torch.cat([sample, res[-1]], dim=1)
                res = res[:-1]
                sample = resnet(sample, emb)
                if attns is not None:
                    sample = attns[j](sample)
                if j == L:
                    break
                k = level * (L + 1) + j
                if k in wanted:
                    out[k] = sample
                if k == last and stop_early:
                    return out
            if up.upsamplers is not None:
                for upsampler in up.upsamplers:
                    kind = type(up).__name__
                    if kind == "ResnetUpsampleBlock2D":
                        sample = upsampler(sample, emb)
                    elif kind == "AttnUpBlock2D" and getattr(up, "upsample_type", "conv") == "resnet":
                        sample = upsampler(sample, temb=emb)
                    elif kind == "AttnUpBlock2D":
                        sample = upsampler(sample)
                    else:
                        sample = upsampler(sample, None)
            k = level * (L + 1) + L
            if k in wanted:
                out[k] = sample
            if k == last and stop_early:
                return out
        m.conv_out(m.conv_act(m.conv_norm_out(sample)))  # the output head (stop_early=False)
        return out


# what from_pretrained raises on a folder whose files do not belong together or are broken
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


def load_unet(unet_dir: Path) -> torch.nn.Module:
    """The ``UNet2DModel`` of a located unet folder, on the CPU."""
    diffusers = import_diffusers()
    config = _read_json(unet_dir / "config.json", "UNet config")
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name != "UNet2DModel":
        raise DdpmsegError(f"{unet_dir}/config.json describes a {cls_name}; ddpmseg supports diffusers UNet2DModel only")
    safetensors_error = getattr(optional_import("safetensors", "reading diffusers weights"), "SafetensorError", OSError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    except _LOAD_ERRORS + (safetensors_error,) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise DdpmsegError(
            f"cannot load the UNet2DModel in {unet_dir} ({type(e).__name__}: {reason}); "
            "check that config.json and the weights belong together"
        ) from None


def read_scheduler_config(sched_file: Path | None) -> dict[str, Any] | None:
    return _read_json(sched_file, "scheduler config") if sched_file is not None else None


def random_unet2d(unet_config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A deterministic random UNet2DModel whose every block does something (tests, benchmarks)."""
    diffusers = import_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fill_zero_weights_(diffusers.UNet2DModel(**unet_config)).eval()
