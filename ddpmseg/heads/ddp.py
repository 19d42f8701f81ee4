"""DDP's diffusion map decoder (Ji et al., ICCV 2023) as a head on frozen diffusion features.

    head = DDPHead(n_classes=6, steps=3, random_state=0).fit(ImageMaps(maps, keys, size), labels)
    seg = head.predict_block_maps(maps[0], keys, size)     # Segmentation(labels, uncertainty, proba)

``fit --head ddp`` builds it from :class:`DDPConfig` (every field is also a keyword of DDPHead).

The recipe, from DDP's public code (``../shared/METHODS.md``):

- The label map at the working resolution R (nearest-downsampled; the ignore
  label is one more embedding row) is embedded by a learned table and squashed
  to ``(sigmoid(e) * 2 - 1) * bit_scale``.
- Noising at continuous t ~ U(0, 0.999) with the cosine log-SNR schedule:
  ``x_t = alpha(t) * emb + sigma(t) * eps``.
- Conditioning: every cached block map resized to R (bilinear) and
  concatenated, standardised per channel, projected by one 1x1 conv to the
  head width (what a 1x1 conv per block and a sum give), GroupNorm + SiLU;
  concatenated with ``x_t`` and fused by a 1x1 conv.
- Decoder: residual conv blocks with time FiLM (``h * (1 + scale) + shift``
  from a learned-sinusoidal embedding of the log-SNR). DDP uses deformable
  attention, which needs a custom CUDA op; here plain 3x3 convs.
- Loss: cross-entropy of the logits (upsampled to the label grid) against the
  labels (x0 in logit space, no epsilon MSE) + ``aux_weight`` x the CE of a 1x1
  classifier on the fused features (DDP's auxiliary FCN head).
- Inference: DDIM over DDP's asymmetric time pairs; each step's argmax is
  re-embedded as the x0 estimate, ``eps = (x_t - alpha x0) / sigma``,
  ``x_next = alpha_next x0 + sigma_next eps``. ``generations`` noise draws run
  as one batch; the label is the argmax of their mean last-step softmax
  (SegDiff's multiple generation, DDP's randsteps), the uncertainty the mutual
  information over every step and generation (entropy of the mean softmax
  minus the mean entropy; the entropy itself when there is one sample).

Training draws ``batch_size`` random crops of ``crop`` x ``crop`` at R a step,
resizing the native-resolution maps of each drawn image on the fly (only the
native maps are held in RAM).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from torch import nn
from tqdm.auto import tqdm

from ddpmseg.errors import DdpmsegError
from ddpmseg.heads._base import HeadSpec, ImageMaps, Key, NotFittedError, Segmentation, check_config
from ddpmseg.heads._uncertainty import entropy, mutual_information

log = logging.getLogger(__name__)

STATE_FORMAT = "ddpmseg-ddp-head"
STATE_VERSION = 2  # 1: the settings were also saved in the state (model.json holds them alone since 2)
WARMUP = 50  # steps of linear lr warm-up


@dataclass(frozen=True)
class DDPConfig:
    """How the DDP head is built, trained and sampled (``fit --head ddp --head-option key=value``;
    model.json's ``fit.head_config``).

    ``resolution`` 0 means "derive it": a quarter of the model grid, at least 32
    (64 for a 256 model, as DDP's 1/4-resolution decoder) and at most the grid.
    ``diffusion=False`` is the control: the same decoder trained and run on a
    zero label map at a fixed time, one step (no denoising).
    """

    width: int = field(default=128, metadata={"help": "the decoder's channels (DDP: 256, 3.5x slower on a CPU)"})
    depth: int = field(default=4, metadata={"help": 'residual conv blocks with time FiLM (DDP: 6 deformable-attention layers)'})
    resolution: int = field(default=0, metadata={"help": 'working resolution; 0: a quarter of the model grid, at least 32, at most the grid'})
    bit_scale: float = field(default=0.01, metadata={"help": "label embedding (sigmoid(e) * 2 - 1) * bit_scale (DDP's)"})
    aux_weight: float = field(default=0.4, metadata={"help": "weight of the auxiliary CE of a 1x1 classifier on the fused features (DDP's FCN head)"})
    diffusion: bool = field(default=True, metadata={"help": 'false: the control, the same decoder on a zero label map, one step (no denoising)'})
    iterations: int = field(default=1500, metadata={"help": 'training steps'})
    batch_size: int = field(default=4, metadata={"help": 'crops per training step'})
    crop: int = field(default=32, metadata={"help": 'crop side at the working resolution (the whole map when smaller)'})
    lr: float = field(default=1e-3, metadata={"help": 'AdamW learning rate: 50 steps of warm-up, then linear decay to 0'})
    weight_decay: float = field(default=1e-4, metadata={"help": 'AdamW weight decay'})
    steps: int = field(default=3, metadata={"help": 'DDIM steps at inference (DDP reports 1, 3, 10)'})
    generations: int = field(default=1, metadata={"help": "noise draws averaged at inference (SegDiff's multiple generations)"})
    time_difference: float = field(default=1.0, metadata={"help": "DDP's asymmetric time pairs (td)"})

    def __post_init__(self) -> None:
        checks = [
            (self.width >= 8 and self.width % 8 == 0, f"width {self.width} must be a multiple of 8"),
            (self.depth >= 1, f"depth {self.depth} must be at least 1"),
            (self.resolution >= 0, f"resolution {self.resolution} must be 0 (derived) or positive"),
            (self.bit_scale > 0, f"bit_scale {self.bit_scale} must be positive"),
            (self.aux_weight >= 0, f"aux_weight {self.aux_weight} must be 0 or more"),
            (self.iterations >= 1, f"iterations {self.iterations} must be at least 1"),
            (self.batch_size >= 1, f"batch_size {self.batch_size} must be at least 1"),
            (self.crop >= 4, f"crop {self.crop} must be at least 4"),
            (self.lr > 0, f"lr {self.lr} must be positive"),
            (self.weight_decay >= 0, f"weight_decay {self.weight_decay} must be 0 or more"),
            (self.steps >= 1, f"steps {self.steps} must be at least 1"),
            (self.generations >= 1, f"generations {self.generations} must be at least 1"),
            (self.time_difference >= 0, f"time_difference {self.time_difference} must be 0 or more"),
        ]
        check_config(checks, "ddp")

    def working_resolution(self, size: int) -> int:
        return self.resolution or min(size, max(32, size // 4))


# -- the schedule ----------------------------------------------------------------------------
def log_snr(t: torch.Tensor, ns: float = 0.0002, ds: float = 0.00025) -> torch.Tensor:
    """DDP's cosine log-SNR: ``-log(cos((t + ns) / (1 + ds) * pi / 2) ** -2 - 1)`` (clamped at 1e-5)."""
    return -torch.log((torch.cos((t + ns) / (1 + ds) * math.pi * 0.5) ** -2 - 1).clamp(min=1e-5))


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) = (sqrt(sigmoid(log_snr)), sqrt(sigmoid(-log_snr))) at times ``t``."""
    s = log_snr(t)
    return torch.sigmoid(s).sqrt(), torch.sigmoid(-s).sqrt()


def time_pairs(steps: int, time_difference: float = 1.0) -> list[tuple[float, float]]:
    """DDP's sampling times: step i goes from ``1 - i / steps`` to ``max(1 - (i + 1 + td) / steps, 0)``."""
    return [(1 - i / steps, max(1 - (i + 1 + time_difference) / steps, 0.0)) for i in range(steps)]


# -- the decoder ------------------------------------------------------------------------------
class LearnedSinusoidal(nn.Module):
    """``[x, sin(2 pi x w), cos(2 pi x w)]`` with learned frequencies ``w`` (dim/2 of them)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x[:, None] * self.weights[None] * 2 * math.pi
        return torch.cat([x[:, None], f.sin(), f.cos()], dim=-1)


class FiLMBlock(nn.Module):
    """Residual block: GN-SiLU-conv3x3, GN, FiLM by the time embedding, SiLU-conv3x3, plus the input."""

    def __init__(self, width: int, time_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(min(32, width // 4), width), nn.GroupNorm(min(32, width // 4), width)
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * width))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class DDPDecoder(nn.Module):
    """Features (B, D, r, r) + noisy label embedding (B, W, r, r) + time (B,) -> class logits (B, K, r, r)."""

    def __init__(self, n_features: int, n_classes: int, config: DDPConfig) -> None:
        super().__init__()
        w = config.width
        self.n_classes, self.bit_scale = n_classes, config.bit_scale
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.proj = nn.Conv2d(n_features, w, 1)
        self.proj_norm = nn.GroupNorm(min(32, w // 4), w)
        self.embed = nn.Embedding(n_classes + 1, w)  # the last row: the ignore label
        self.fuse = nn.Conv2d(2 * w, w, 1)
        self.time_mlp = nn.Sequential(LearnedSinusoidal(16), nn.Linear(17, 4 * w), nn.GELU(), nn.Linear(4 * w, 4 * w))
        self.blocks = nn.ModuleList(FiLMBlock(w, 4 * w) for _ in range(config.depth))
        self.out = nn.Sequential(nn.GroupNorm(min(32, w // 4), w), nn.SiLU(), nn.Conv2d(w, n_classes, 1))
        self.aux = nn.Conv2d(w, n_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return F.silu(self.proj_norm(self.proj(x)))

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, r, r) labels (``n_classes`` = ignore) -> the squashed embedding (B, W, r, r)."""
        e = self.embed(labels).permute(0, 3, 1, 2)
        return (torch.sigmoid(e) * 2 - 1) * self.bit_scale

    def decode(self, feat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.fuse(torch.cat([feat, x_t], dim=1))
        temb = self.time_mlp(log_snr(t))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


# -- features at the working resolution --------------------------------------------------------
def resized_features(maps: Mapping[Key, Any], keys: Sequence[Key], r: int) -> torch.Tensor:
    """Every block map resized to ``r`` x ``r`` (bilinear; antialiased when shrinking) and concatenated:
    float32 (D, r, r)."""
    out = []
    for k in keys:
        m = torch.as_tensor(maps[k]).float()[None]
        if m.shape[-1] != r:
            m = F.interpolate(m, size=(r, r), mode="bilinear", align_corners=False, antialias=m.shape[-1] > r)
        out.append(m[0])
    return torch.cat(out)


def _uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) softmaxes of N samples -> their mutual information (N = 1: the entropy)."""
    if len(probs) == 1:
        return entropy(probs[0], 0)
    return mutual_information(probs, 1)


class DDPHead(BaseEstimator):
    """The DDP head as an estimator: ``fit(X, y)``, ``predict_block_maps(maps, keys, size)``.

    ``X``: an :class:`~ddpmseg.heads.ImageMaps` (per image a {(t, block): (C, h, w)}
    dict of native block maps, every image with the same keys); ``y``: per image
    an (S, S) integer label map on the model grid, ``ignore_index`` where
    unlabelled. Every :class:`DDPConfig` field is a keyword; learned state ends in ``_``.
    """

    def __init__(self, n_classes: int | None = None, *, width: int = 128, depth: int = 4, resolution: int = 0,
                 bit_scale: float = 0.01, aux_weight: float = 0.4, diffusion: bool = True, iterations: int = 1500,
                 batch_size: int = 4, crop: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4, steps: int = 3,
                 generations: int = 1, time_difference: float = 1.0, ignore_index: int = 255,
                 random_state: int = 0, device: str = "cpu", progress: bool = False) -> None:
        self.n_classes = n_classes
        self.width = width
        self.depth = depth
        self.resolution = resolution
        self.bit_scale = bit_scale
        self.aux_weight = aux_weight
        self.diffusion = diffusion
        self.iterations = iterations
        self.batch_size = batch_size
        self.crop = crop
        self.lr = lr
        self.weight_decay = weight_decay
        self.steps = steps
        self.generations = generations
        self.time_difference = time_difference
        self.ignore_index = ignore_index
        self.random_state = random_state
        self.device = device
        self.progress = progress

    @property
    def config(self) -> DDPConfig:
        """The settings as a (validated) :class:`DDPConfig`."""
        return DDPConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DDPConfig)})

    # -- fitting ----------------------------------------------------------------------------
    def fit(self, X: ImageMaps, y: Sequence[np.ndarray]) -> "DDPHead":
        """Train the decoder on the images' maps ``X`` and label maps ``y``; returns self."""
        if not isinstance(X, ImageMaps):
            raise DdpmsegError(f"DDP head: X must be an ImageMaps (the images' block maps), got {type(X).__name__}")
        maps, labels = X.maps, y
        if not maps or len(maps) != len(labels):
            raise DdpmsegError(f"DDP head: got {len(maps)} images' maps and {len(labels)} label maps; give one each")
        if self.n_classes is None or self.n_classes < 1:
            raise DdpmsegError(f"DDP head: n_classes {self.n_classes} must be at least 1")
        cfg, k = self.config, int(self.n_classes)
        keys = list(X.keys)
        size = int(np.asarray(labels[0]).shape[-1])
        r = cfg.working_resolution(size)
        if size % r:
            raise DdpmsegError(f"DDP head: the working resolution {r} must divide the model grid {size}; "
                               "set the head's resolution to a divisor of it")
        f, crop = size // r, min(cfg.crop, r)
        device = torch.device(self.device)
        g = torch.Generator().manual_seed(int(self.random_state))
        native = [{key: torch.as_tensor(m[key]) for key in keys} for m in maps]
        y = torch.stack([torch.as_tensor(np.asarray(a), dtype=torch.long) for a in labels])
        y = torch.where((y >= 0) & (y < k), y, torch.full_like(y, k))  # the ignore label -> index k
        n_features = sum(int(native[0][key].shape[0]) for key in keys)
        with torch.random.fork_rng(devices=[]):  # the module's init from the seed, the global RNG untouched
            torch.manual_seed(int(self.random_state))
            module = DDPDecoder(n_features, k, cfg).to(device)
        self._standardise(module, native, keys)
        opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.0, 1 - s / cfg.iterations))
        module.train()
        losses: list[float] = []
        bar = tqdm(range(cfg.iterations), desc="fit ddp", unit="step", disable=not self.progress, leave=False)
        for step in bar:
            idx = torch.randint(len(native), (cfg.batch_size,), generator=g)
            y0 = torch.randint(r - crop + 1, (cfg.batch_size,), generator=g)
            x0 = torch.randint(r - crop + 1, (cfg.batch_size,), generator=g)
            feats = torch.stack([resized_features(native[i], keys, r)[:, a : a + crop, b : b + crop]
                                 for i, a, b in zip(idx.tolist(), y0.tolist(), x0.tolist())]).to(device)
            full = torch.stack([y[i, a * f : (a + crop) * f, b * f : (b + crop) * f]
                                for i, a, b in zip(idx.tolist(), y0.tolist(), x0.tolist())]).to(device)
            small = full[:, ::f, ::f]  # nearest (floor), as F.interpolate(mode="nearest")
            feat = module.features(feats)
            if cfg.diffusion:
                t = torch.rand(cfg.batch_size, generator=g).mul_(0.999).to(device)
                eps = torch.randn(feat.shape, generator=g).to(device)
                alpha, sigma = (v[:, None, None, None] for v in alpha_sigma(t))
                x_t = alpha * module.encode_labels(small) + sigma * eps
            else:
                t, x_t = torch.full((cfg.batch_size,), 0.999, device=device), torch.zeros_like(feat)
            loss = self._ce(module.decode(feat, x_t, t), full, f, k)
            if cfg.aux_weight:
                loss = loss + cfg.aux_weight * self._ce(module.aux(feat), full, f, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if self.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        bar.close()
        self.module_ = module.eval()
        self.keys_ = keys
        self.size_ = size
        self.resolution_ = r
        self.n_features_in_ = n_features
        self.loss_curve_ = losses
        self.n_iter_ = cfg.iterations
        self.final_loss_ = float(np.mean(losses[-50:]))
        log.info("DDP head: %d steps, final loss %.4f", cfg.iterations, self.final_loss_)
        return self

    @staticmethod
    def _ce(logits: torch.Tensor, full: torch.Tensor, f: int, k: int) -> torch.Tensor:
        if f > 1:
            logits = F.interpolate(logits, scale_factor=f, mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, full, ignore_index=k, reduction="sum") / (full != k).sum().clamp_min(1)

    @staticmethod
    @torch.no_grad()
    def _standardise(module: DDPDecoder, native: list[dict[Key, torch.Tensor]], keys: list[Key]) -> None:
        """Per-channel mean and std of the training maps at their native resolution."""
        means, stds = [], []
        for key in keys:
            x = torch.stack([m[key].float() for m in native]).transpose(0, 1).flatten(1)  # (C, n*h*w)
            means.append(x.mean(1))
            stds.append(x.std(1).clamp_min(1e-6))
        module.mean.copy_(torch.cat(means))
        module.std.copy_(torch.cat(stds))

    # -- prediction ---------------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("This DDPHead is not fitted yet: call fit(X, y) first.")

    @torch.inference_mode()
    def sample(self, maps: Mapping[Key, Any], steps: int | None = None, generations: int | None = None,
               seed: int | None = None) -> torch.Tensor:
        """Softmaxes (steps, generations, K, r, r) of every DDIM step of every generation, at the working
        resolution (``steps`` / ``generations`` default to the config's; the control runs one step)."""
        self._check_fitted()
        cfg, m = self.config, self.module_
        steps = steps or cfg.steps
        gens = generations or cfg.generations
        device = next(m.parameters()).device
        x = resized_features(maps, self.keys_, self.resolution_).to(device)[None]
        if x.shape[1] != self.n_features_in_:
            raise DdpmsegError(f"the block maps have {x.shape[1]} channels but this DDP head was fitted on "
                               f"{self.n_features_in_}; use features extracted with the model's settings")
        feat = m.features(x).expand(gens, -1, -1, -1)
        g = torch.Generator().manual_seed(int(self.random_state if seed is None else seed))
        if not cfg.diffusion:
            t = torch.full((gens,), 0.999, device=device)
            return m.decode(feat, torch.zeros_like(feat), t).softmax(1)[None]
        x_t = torch.randn(feat.shape, generator=g).to(device)
        out = []
        for t_now, t_next in time_pairs(steps, cfg.time_difference):
            t = torch.full((gens,), t_now, device=device)
            probs = m.decode(feat, x_t, t).softmax(1)
            out.append(probs)
            x0 = m.encode_labels(probs.argmax(1))
            a, s = (v[:, None, None, None] for v in alpha_sigma(t))
            a_next, s_next = (v[:, None, None, None] for v in alpha_sigma(torch.full_like(t, t_next)))
            eps = (x_t - a * x0) / s.clamp(min=1e-8)
            x_t = a_next * x0 + s_next * eps
        return torch.stack(out)

    def predict_proba_maps(self, maps: Mapping[Key, Any], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean last-step softmax (K, S, S), uncertainty (S, S)) at the model grid ``size``."""
        probs = self.sample(maps)
        mean = probs[-1].mean(0)
        unc = _uncertainty(probs.flatten(0, 1))
        up = lambda a: F.interpolate(a[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
        return up(mean).cpu(), up(unc[None])[0].cpu()

    def predict_block_maps(self, maps: Mapping[Key, Any], keys: Sequence[Key], size: int) -> Segmentation:
        """One image's labels (argmax of the mean softmax) and uncertainty at the model grid."""
        self._check_fitted()
        if list(keys) != self.keys_:
            raise DdpmsegError(f"the maps' keys {list(keys)} differ from the DDP head's {self.keys_}; "
                               "use features extracted with the model's settings")
        mean, unc = self.predict_proba_maps(maps, size)
        return Segmentation(mean.argmax(0).numpy().astype(np.int64), unc.numpy().astype(np.float32),
                            mean.numpy().astype(np.float32))

    def describe(self) -> str:
        """One line on the fit: steps, crops, final loss."""
        self._check_fitted()
        cfg = self.config
        return (f"DDP head{'' if cfg.diffusion else ' without diffusion'}: {self.n_iter_:,} steps of "
                f"{cfg.batch_size} crops, final loss {self.final_loss_:.3f} (mean of the last 50 steps)")

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The learned state (the settings are :meth:`get_params`, saved in model.json)."""
        self._check_fitted()
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "keys": [list(k) for k in self.keys_], "size": self.size_, "n_features_in": self.n_features_in_,
            "loss_curve": [float(v) for v in self.loss_curve_],
            "module": {k: v.cpu() for k, v in self.module_.state_dict().items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: str = "cpu", **params: Any) -> "DDPHead":
        """A fitted head from :meth:`state_dict` and its settings ``params`` (those of :meth:`get_params`;
        a version-1 state carries its own)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise DdpmsegError("not a DDP head's state; rerun `ddpmseg fit --head ddp`")
        if int(state.get("version", 1)) > STATE_VERSION:
            raise DdpmsegError(f"DDP head state version {state['version']} is newer than this ddpmseg supports; "
                               "upgrade ddpmseg")
        saved: dict[str, Any] = dict(state.get("config", {}))  # version 1
        saved.update({k: state[k] for k in ("n_classes", "ignore_index", "random_state") if k in state})
        known = set(cls().get_params())
        head = cls(**{**{k: v for k, v in saved.items() if k in known},
                      **{k: v for k, v in params.items() if k in known}, "device": str(device)})
        if head.n_classes is None:
            raise DdpmsegError("this DDP head state holds no settings (model.json does): pass them, e.g. "
                               "DDPHead.from_state_dict(state, **head.get_params())")
        try:
            module = DDPDecoder(int(state["n_features_in"]), int(head.n_classes), head.config)
            module.load_state_dict(state["module"])
        except KeyError as e:
            raise DdpmsegError(f"DDP head state lacks {e}; it is damaged: fit the model again") from None
        except RuntimeError as e:
            raise DdpmsegError(f"DDP head state does not fit its settings ({str(e).splitlines()[0]}); fit again") from None
        head.module_ = module.to(device).eval()
        head.keys_ = [tuple(int(v) for v in k) for k in state["keys"]]
        head.size_ = int(state["size"])
        # version 1 kept the working resolution here; since 2 model.json's resolution holds it (resolved)
        head.resolution_ = int(state.get("resolution") or head.config.working_resolution(head.size_))
        head.n_features_in_ = int(state["n_features_in"])
        head.loss_curve_ = list(state.get("loss_curve", []))
        head.n_iter_ = head.iterations
        head.final_loss_ = float(np.mean(head.loss_curve_[-50:])) if head.loss_curve_ else float("nan")
        return head

    def to(self, device: str | torch.device) -> "DDPHead":
        self._check_fitted()
        self.module_.to(device)
        self.device = str(device)
        return self


HEAD = HeadSpec("ddp", "DDP's diffusion map decoder: conv blocks that denoise the label map", DDPConfig, DDPHead)
