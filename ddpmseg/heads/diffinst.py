"""DiffusionInst (Gu et al., 2022) on DiffusionDet's box diffusion, as an instance head on frozen
diffusion features (``fit --head diffinst --instances ANN``).

    head = DiffInstHead(n_classes=4, random_state=0).fit(ImageMaps(maps, keys, size), instances)
    inst = head.predict_instances(maps[0], keys, size)    # Instances at the working resolution

The recipe, from the facts in ``../shared/METHODS.md`` (small-data, CPU-sized):

- Adapter: every cached block map resized to the feature grid (half the working
  resolution R, the stride-2 level of the image), standardised, reduced by a PCA
  fitted on the training pixels, then a learned 1x1 conv to ``width`` channels and
  a 3x3 conv (the decoder blocks already span strides 4-32: one fused level).
- Box diffusion (DiffusionDet): the ground-truth boxes (cx cy w h in [0, 1]) padded
  to ``proposals`` with random boxes (centre 0.5, sigma 1/6), mapped to
  [-scale, scale] (scale 2.0), noised at t ~ U{0..999} of a cosine schedule; the
  head predicts x0 (the boxes).
- ``stages`` iterated heads (Sparse R-CNN style): RoIAlign (plain-torch bilinear
  sampling) of each box, an MLP, self-attention over the proposals, a time
  embedding that scales and shifts the features, then class logits, box deltas and
  CondInst dynamic mask filters (three 1x1 convs 10->8->8->1 on the mask branch's 8
  channels plus 2 relative-coordinate channels); each stage refines the boxes of the
  one before; deep supervision.
- Matching: Hungarian (scipy) on 2 focal + 5 L1 + 2 (-GIoU); losses focal (alpha
  0.25, gamma 2) x 2, L1 x 5, GIoU x 2, dice x 5 on the masks at the feature grid.
- Inference: DDIM (eta 1) over ``steps`` steps with box renewal (proposals scoring
  under ``renewal`` replaced by random boxes), every step's detections merged by
  class-wise NMS 0.5.

``diffusion=False`` is the control (DiffusionInst's ablation): learned fixed
proposal boxes, no noising, one step.
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
from ddpmseg.heads._base import HeadSpec, ImageMaps, Key, NotFittedError, check_config
from ddpmseg.instances.boxes import batched_nms, cxcywh_to_xyxy, generalized_box_iou, roi_align, xyxy_to_cxcywh
from ddpmseg.instances.core import Instances

log = logging.getLogger(__name__)

STATE_FORMAT = "ddpmseg-diffinst-head"
STATE_VERSION = 1
T = 1000  # diffusion steps of the box schedule
MASK_CHANNELS = 8


@dataclass(frozen=True)
class DiffInstConfig:
    """How the DiffusionInst head is built, trained and sampled (``fit --head diffinst --head-option
    key=value``; model.json's ``fit.head_config``). ``resolution`` 0: the model grid, at least 64."""

    proposals: int = field(default=32, metadata={"help": "boxes per image (DiffusionDet: 500)"})
    stages: int = field(default=2, metadata={"help": "iterated RoI heads (DiffusionDet: 6)"})
    width: int = field(default=128, metadata={"help": "channels of the adapter and the RoI heads (paper: 256)"})
    pca: int = field(default=64, metadata={"help": "PCA channels the standardised block maps are reduced to first"})
    pooler: int = field(default=7, metadata={"help": "RoIAlign output side"})
    resolution: int = field(default=0, metadata={"help": "working resolution R of the masks (features at R/2); 0: the model grid, at least 64"})
    diffusion: bool = field(default=True, metadata={"help": "false: the control, learned fixed proposals and one step (no box diffusion)"})
    scale: float = field(default=2.0, metadata={"help": "signal scale of the boxes (DiffusionDet's 2.0)"})
    iterations: int = field(default=1500, metadata={"help": "training steps"})
    batch_size: int = field(default=4, metadata={"help": "images per training step"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate: 50 steps of warm-up, then linear decay to 0"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    steps: int = field(default=1, metadata={"help": "DDIM steps at inference (DiffusionInst: 1 or 4)"})
    renewal: float = field(default=0.5, metadata={"help": "box renewal between steps: keep proposals scoring above this"})
    threshold: float = field(default=0.05, metadata={"help": "lowest score of a kept detection"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips in training"})

    def __post_init__(self) -> None:
        check_config([
            (self.proposals >= 1, f"proposals {self.proposals} must be at least 1"),
            (self.stages >= 1, f"stages {self.stages} must be at least 1"),
            (self.width >= 16 and self.width % 8 == 0, f"width {self.width} must be a multiple of 8, at least 16"),
            (self.pca >= 1, f"pca {self.pca} must be at least 1"),
            (self.pooler >= 1, f"pooler {self.pooler} must be at least 1"),
            (self.resolution == 0 or (self.resolution >= 8 and self.resolution % 2 == 0),
             f"resolution {self.resolution} must be 0 (derived) or an even number >= 8"),
            (self.scale > 0, f"scale {self.scale} must be positive"),
            (self.iterations >= 1, f"iterations {self.iterations} must be at least 1"),
            (self.batch_size >= 1, f"batch_size {self.batch_size} must be at least 1"),
            (self.lr > 0, f"lr {self.lr} must be positive"),
            (self.weight_decay >= 0, f"weight_decay {self.weight_decay} must be 0 or more"),
            (self.steps >= 1, f"steps {self.steps} must be at least 1"),
            (0 <= self.renewal <= 1, f"renewal {self.renewal} must be in [0, 1]"),
            (0 <= self.threshold < 1, f"threshold {self.threshold} must be in [0, 1)"),
        ], "diffinst")

    def working_resolution(self, size: int) -> int:
        return self.resolution or max(64, size)


# -- schedule ------------------------------------------------------------------------------------
def cosine_alphas_cumprod(steps: int = T, s: float = 0.008) -> torch.Tensor:
    """The cosine schedule's alpha-bar at t = 0..steps-1 (betas clipped at 0.999)."""
    x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
    ac = torch.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    betas = (1 - ac[1:] / ac[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, 0).float()


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * f[None]
    return torch.cat([a.sin(), a.cos()], -1)


# -- the network -----------------------------------------------------------------------------------
def n_filter_params(c_in: int = MASK_CHANNELS + 2, hidden: int = 8) -> int:
    return (c_in * hidden + hidden) + (hidden * hidden + hidden) + (hidden + 1)


def dynamic_masks(params: torch.Tensor, feats: torch.Tensor, hidden: int = 8) -> torch.Tensor:
    """CondInst: per instance three 1x1 convs with its own ``params`` (N, P) over ``feats`` (N, C, h, w)
    (the mask branch plus that instance's relative coordinates): mask logits (N, h, w)."""
    n, c = feats.shape[:2]
    sizes = [c * hidden, hidden, hidden * hidden, hidden, hidden, 1]
    w1, b1, w2, b2, w3, b3 = params.split(sizes, 1)
    x = feats.flatten(2)  # (N, C, hw)
    x = F.relu(torch.bmm(w1.view(n, hidden, c), x) + b1[:, :, None])
    x = F.relu(torch.bmm(w2.view(n, hidden, hidden), x) + b2[:, :, None])
    x = torch.bmm(w3.view(n, 1, hidden), x) + b3[:, :, None]
    return x.view(n, *feats.shape[2:])


class Stage(nn.Module):
    """One iterated head: RoI features + the previous proposal features -> (logits, boxes, filters, feats)."""

    def __init__(self, width: int, pooler: int, n_classes: int, heads: int = 8) -> None:
        super().__init__()
        self.roi = nn.Sequential(nn.Linear(width * pooler * pooler, width), nn.LayerNorm(width), nn.ReLU())
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(4 * width, 2 * width))
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.cls = nn.Linear(width, n_classes)
        self.box = nn.Linear(width, 4)
        self.filters = nn.Linear(width, n_filter_params())
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)

    def forward(self, feat: torch.Tensor, boxes: torch.Tensor, prev: torch.Tensor | None, temb: torch.Tensor,
                pooler: int) -> tuple[torch.Tensor, ...]:
        """``feat`` (B, C, h, w), ``boxes`` (B, N, 4) xyxy in [0, 1], ``temb`` (B, 4C)."""
        b, n = boxes.shape[:2]
        rois = torch.stack([roi_align(feat[i], boxes[i].detach(), pooler) for i in range(b)])  # (B, N, C, p, p)
        x = self.roi(rois.flatten(2))
        if prev is not None:
            x = x + prev
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        scale, shift = self.time(temb)[:, None].chunk(2, -1)
        x = x * (1 + scale) + shift
        x = self.norm2(x + self.ffn(x))
        # the delta base keeps its gradient: the control's learned stage-0 boxes learn through it (as in
        # Sparse R-CNN; RoIAlign passes none to the boxes there either); DiffInstNet detaches between stages
        cxcywh = xyxy_to_cxcywh(boxes)
        d = self.box(x)  # Sparse R-CNN's deltas, weights (2, 2, 1, 1)
        ctr = cxcywh[..., :2] + d[..., :2] / 2 * cxcywh[..., 2:]
        wh = cxcywh[..., 2:] * torch.exp(d[..., 2:].clamp(max=math.log(1000 / 16)))
        new = cxcywh_to_xyxy(torch.cat([ctr, wh], -1)).clamp(0, 1)
        return self.cls(x), new, self.filters(x), x


class DiffInstNet(nn.Module):
    """Adapter + mask branch + stages."""

    def __init__(self, n_features: int, n_classes: int, cfg: DiffInstConfig) -> None:
        super().__init__()
        w = cfg.width
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("components", torch.zeros(n_features, cfg.pca))
        self.adapter = nn.Sequential(nn.Conv2d(cfg.pca, w, 1), nn.GroupNorm(8, w), nn.ReLU(),
                                     nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU())
        self.mask_branch = nn.Sequential(nn.Conv2d(w, w // 2, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(w // 2, w // 2, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(w // 2, MASK_CHANNELS, 1))
        self.time_mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, 4 * w))
        self.stages = nn.ModuleList(Stage(w, cfg.pooler, n_classes) for _ in range(cfg.stages))
        if not cfg.diffusion:  # the control: Sparse R-CNN's learned proposal boxes (cx cy w h logits) and features
            self.proposal_boxes = nn.Embedding(cfg.proposals, 4)
            with torch.no_grad():  # spread over the image: identical boxes would give identical proposals
                spread = torch.cat([torch.rand(cfg.proposals, 2) * 0.7 + 0.15, torch.rand(cfg.proposals, 2) * 0.4 + 0.2], 1)
                self.proposal_boxes.weight.copy_(torch.logit(spread))
            self.proposal_features = nn.Embedding(cfg.proposals, w)
        self.width, self.pooler = w, cfg.pooler

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """(D, h, w) resized block maps -> (pca, h, w)."""
        d, h, w = x.shape
        z = (x.reshape(d, -1) - self.mean[:, None]) / self.std[:, None]
        return (self.components.T @ z).reshape(-1, h, w)

    def forward(self, reduced: torch.Tensor, boxes: torch.Tensor, t: torch.Tensor) -> tuple[list, torch.Tensor]:
        """``reduced`` (B, pca, h, w), ``boxes`` (B, N, 4) xyxy in [0, 1], ``t`` (B,): per stage (logits,
        boxes, filters), and the mask branch (B, 8, h, w)."""
        feat = self.adapter(reduced)
        mask_feat = self.mask_branch(feat)
        temb = self.time_mlp(sinusoidal(t, self.width))
        outs = []
        prev = self.proposal_features.weight[None].expand(len(boxes), -1, -1) if hasattr(self, "proposal_features") else None
        for stage in self.stages:
            logits, boxes, filters, prev = stage(feat, boxes, prev, temb, self.pooler)
            outs.append((logits, boxes, filters))
            boxes = boxes.detach()  # Sparse R-CNN: each stage refines the previous one's boxes as constants
        return outs, mask_feat


def rel_coords(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 2, h, w): each pixel's offset from each box centre, in units of the map (CondInst)."""
    ys = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) / w
    c = xyxy_to_cxcywh(boxes)
    return torch.stack([(xs[None, None, :] - c[:, 0, None, None]).expand(-1, h, w),
                        (ys[None, :, None] - c[:, 1, None, None]).expand(-1, h, w)], 1)


def instance_masks(filters: torch.Tensor, boxes: torch.Tensor, mask_feat: torch.Tensor) -> torch.Tensor:
    """Mask logits (N, h, w) of N instances of one image from their filters and boxes."""
    n = filters.shape[0]
    h, w = mask_feat.shape[-2:]
    feats = torch.cat([mask_feat[None].expand(n, -1, -1, -1), rel_coords(boxes.detach(), h, w)], 1)
    return dynamic_masks(filters, feats)


# -- losses --------------------------------------------------------------------------------------
def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))).sum()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum()


def hungarian(logits: torch.Tensor, boxes: torch.Tensor, gt_cls: torch.Tensor, gt_boxes: torch.Tensor
              ) -> tuple[np.ndarray, np.ndarray]:
    """(proposal indices, gt indices) of the min-cost one-to-one matching (2 focal + 5 L1 + 2 -GIoU)."""
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        p = logits.sigmoid()[:, gt_cls]
        alpha, gamma = 0.25, 2.0
        neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
        pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
        cost = 2 * (pos - neg) + 5 * torch.cdist(boxes, gt_boxes, p=1) - 2 * generalized_box_iou(boxes, gt_boxes)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows, cols


# -- the estimator ------------------------------------------------------------------------------------
def _to_tensor_maps(maps: Mapping[Key, Any], keys: Sequence[Key], r: int) -> torch.Tensor:
    out = []
    for k in keys:
        m = torch.as_tensor(np.asarray(maps[k])).float()[None]
        if m.shape[-1] != r:
            m = F.interpolate(m, size=(r, r), mode="bilinear", align_corners=False, antialias=m.shape[-1] > r)
        out.append(m[0])
    return torch.cat(out)


class DiffInstHead(BaseEstimator):
    """The DiffusionInst head as an estimator: ``fit(X, y)``, ``predict_instances(maps, keys, size)``.

    ``X``: an :class:`~ddpmseg.heads.ImageMaps`; ``y``: per image an
    :class:`~ddpmseg.instances.Instances` on a square grid aligned with the model grid
    (any side: the masks are resized to the working resolution). Class indices are
    COCO category ids (0: no object, never a target). Every :class:`DiffInstConfig`
    field is a keyword; learned state ends in ``_``.
    """

    def __init__(self, n_classes: int | None = None, *, proposals: int = 32, stages: int = 2, width: int = 128,
                 pca: int = 64, pooler: int = 7, resolution: int = 0, diffusion: bool = True, scale: float = 2.0,
                 iterations: int = 1500, batch_size: int = 4, lr: float = 5e-4, weight_decay: float = 1e-4,
                 steps: int = 1, renewal: float = 0.5, threshold: float = 0.05, flip: bool = True,
                 ignore_index: int = 255, random_state: int = 0, device: str = "cpu", progress: bool = False) -> None:
        self.n_classes = n_classes
        self.proposals = proposals
        self.stages = stages
        self.width = width
        self.pca = pca
        self.pooler = pooler
        self.resolution = resolution
        self.diffusion = diffusion
        self.scale = scale
        self.iterations = iterations
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.steps = steps
        self.renewal = renewal
        self.threshold = threshold
        self.flip = flip
        self.ignore_index = ignore_index
        self.random_state = random_state
        self.device = device
        self.progress = progress

    @property
    def config(self) -> DiffInstConfig:
        return DiffInstConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DiffInstConfig)})

    # -- boxes of the diffusion -------------------------------------------------------------------
    def _noisy_boxes(self, gt: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffusionDet's prepare_diffusion_concat: (proposal boxes xyxy in [0, 1], t) for one image's
        ground-truth boxes ``gt`` (M, 4) cxcywh."""
        cfg, n = self.config, self.proposals
        t = torch.randint(0, T, (1,), generator=g)
        noise = torch.randn(n, 4, generator=g)
        if len(gt) < n:
            pad = torch.randn(n - len(gt), 4, generator=g) / 6 + 0.5
            pad[:, 2:] = pad[:, 2:].clamp(min=1e-4)
            x0 = torch.cat([gt, pad])
        else:
            x0 = gt[torch.randperm(len(gt), generator=g)[:n]]
        x0 = (x0 * 2 - 1) * cfg.scale
        ab = self.alphas_cumprod_[t]
        x = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).clamp(-cfg.scale, cfg.scale)
        return self._to_xyxy(x), t

    def _to_xyxy(self, x: torch.Tensor) -> torch.Tensor:
        return cxcywh_to_xyxy(((x / self.scale) + 1) / 2).clamp(0, 1)

    def _learned_boxes(self, b: int) -> torch.Tensor:
        return cxcywh_to_xyxy(torch.sigmoid(self.module_.proposal_boxes.weight)).clamp(0, 1)[None].expand(b, -1, -1)

    # -- fitting ----------------------------------------------------------------------------------------
    def fit(self, X: ImageMaps, y: Sequence[Instances]) -> "DiffInstHead":
        """Train on the images' maps ``X`` and their instances ``y``; returns self."""
        if not isinstance(X, ImageMaps):
            raise DdpmsegError(f"diffinst head: X must be an ImageMaps (the images' block maps), got {type(X).__name__}")
        if not X.maps or len(X.maps) != len(y):
            raise DdpmsegError(f"diffinst head: got {len(X.maps)} images' maps and {len(y)} instance sets; give one each")
        if self.n_classes is None or self.n_classes < 2:
            raise DdpmsegError(f"diffinst head: n_classes {self.n_classes} must be at least 2 (0 is no object)")
        if not any(len(i) for i in y):
            raise DdpmsegError("diffinst head: no image holds an instance; give annotations with instances")
        cfg = self.config
        g = torch.Generator().manual_seed(self.random_state)
        self.keys_ = [tuple(k) for k in X.keys]
        self.size_ = int(X.size)
        self.resolution_ = cfg.working_resolution(self.size_)
        f = self.resolution_ // 2
        raw = [_to_tensor_maps(m, self.keys_, f) for m in X.maps]
        d = raw[0].shape[0]
        self.n_features_in_ = d
        self.alphas_cumprod_ = cosine_alphas_cumprod()
        with torch.random.fork_rng(devices=[]):  # the module's init from the seed, the global RNG untouched
            torch.manual_seed(int(self.random_state))
            net = DiffInstNet(d, int(self.n_classes), cfg)
        pixels = torch.cat([x.reshape(d, -1) for x in raw], 1)
        mean, std = pixels.mean(1), pixels.std(1).clamp(min=1e-6)
        z = ((pixels - mean[:, None]) / std[:, None]).T
        sample = z[torch.randperm(len(z), generator=g)[:20000]]
        k = min(cfg.pca, d, len(sample))
        _, _, v = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)
        comps = torch.zeros(d, cfg.pca)
        comps[:, :k] = v[:k].T
        net.mean.copy_(mean)
        net.std.copy_(std)
        net.components.copy_(comps)
        dev = torch.device(self.device)
        self.module_ = net.to(dev)
        feats = torch.stack([net.reduce(x.to(dev)) for x in raw])  # (n, pca, f, f)
        targets = []
        for inst in y:
            m = torch.from_numpy(inst.masks).float()
            m = F.interpolate(m[None], size=(f, f), mode="area")[0] if len(m) else torch.zeros(0, f, f)
            keep = (m > 0.5).flatten(1).any(1)
            m = (m[keep] > 0.5).float()
            boxes = torch.from_numpy(Instances(m.numpy() > 0, inst.classes[keep.numpy()], np.ones(int(keep.sum()))).boxes()) / f
            targets.append((torch.from_numpy(inst.classes[keep.numpy()]).to(dev), boxes.to(dev), m.to(dev)))
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / 50) * max(0.0, 1 - i / max(cfg.iterations, 1)))
        net.train()
        losses = []
        for _ in tqdm(range(cfg.iterations), desc="fit diffinst", disable=not self.progress):
            idx = torch.randint(0, len(feats), (cfg.batch_size,), generator=g)
            batch, tgts = [], []
            for i in idx.tolist():
                x, (cls, boxes, masks) = feats[i], targets[i]
                if cfg.flip and torch.rand(1, generator=g).item() < 0.5:
                    x, masks = x.flip(-1), masks.flip(-1)
                    boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], -1)
                batch.append(x)
                tgts.append((cls, boxes, masks))
            if cfg.diffusion:
                pairs = [self._noisy_boxes(xyxy_to_cxcywh(b).cpu(), g) for _, b, _ in tgts]
                props = torch.stack([p for p, _ in pairs]).to(dev)
                t = torch.cat([t for _, t in pairs]).to(dev)
            else:
                props, t = self._learned_boxes(len(batch)), torch.zeros(len(batch), dtype=torch.int64, device=dev)
            outs, mask_feat = net(torch.stack(batch), props, t)
            loss = self._loss(outs, mask_feat, tgts)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        net.eval()
        self.loss_curve_ = losses
        self.n_iter_ = cfg.iterations
        self.final_loss_ = float(np.mean(losses[-50:]))
        return self

    def _loss(self, outs: list, mask_feat: torch.Tensor, tgts: list) -> torch.Tensor:
        total = mask_feat.new_zeros(())
        n_gt = max(1, sum(len(c) for c, _, _ in tgts))
        for logits, boxes, filters in outs:  # deep supervision
            for b, (cls, gt_boxes, gt_masks) in enumerate(tgts):
                target = torch.zeros_like(logits[b])
                if len(cls):
                    rows, cols = hungarian(logits[b], boxes[b], cls, gt_boxes)
                    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
                    target[rows, cls[cols]] = 1
                    pb, gb = boxes[b][rows], gt_boxes[cols]
                    total = total + (5 * (pb - gb).abs().sum() + 2 * (1 - torch.diag(generalized_box_iou(pb, gb))).sum()) / n_gt
                    masks = instance_masks(filters[b][rows], pb, mask_feat[b])
                    total = total + 5 * dice_loss(masks, gt_masks[cols]) / n_gt
                total = total + 2 * focal_loss(logits[b], target) / n_gt
        return total

    # -- prediction ------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("This DiffInstHead is not fitted yet: call fit(X, y) first.")

    @torch.inference_mode()
    def predict_instances(self, maps: Mapping[Key, Any], keys: Sequence[Key], size: int,
                          steps: int | None = None, seed: int | None = None) -> Instances:
        """One image's instances on an R x R grid aligned with the model grid (R = the working resolution),
        best score first; ``steps``: DDIM steps (default the config's; the control runs one)."""
        self._check_fitted()
        if [tuple(k) for k in keys] != self.keys_:
            raise DdpmsegError(f"the maps' keys {list(keys)} differ from the diffinst head's {self.keys_}; "
                               "use features extracted with the model's settings")
        cfg, net = self.config, self.module_
        r, f = self.resolution_, self.resolution_ // 2
        dev = self.module_.mask_branch[0].weight.device
        x = net.reduce(_to_tensor_maps(maps, self.keys_, f).to(dev))[None]
        g = torch.Generator().manual_seed(self.random_state if seed is None else seed)
        found: list[tuple[torch.Tensor, ...]] = []
        if not cfg.diffusion:
            outs, mask_feat = net(x, self._learned_boxes(1), torch.zeros(1, dtype=torch.int64, device=dev))
            found.append(self._detections(outs[-1], mask_feat))
        else:
            steps = steps or cfg.steps
            ac = self.alphas_cumprod_
            times = torch.linspace(-1, T - 1, steps + 1).long().flip(0).tolist()  # DiffusionDet's time pairs
            xt = torch.randn(1, cfg.proposals, 4, generator=g).to(dev)
            for t, t_next in zip(times[:-1], times[1:]):
                xt = xt.clamp(-cfg.scale, cfg.scale)
                outs, mask_feat = net(x, self._to_xyxy(xt), torch.tensor([t], device=dev))
                logits, boxes, filters = outs[-1]
                found.append(self._detections(outs[-1], mask_feat))
                if t_next < 0:
                    break
                x0 = (xyxy_to_cxcywh(boxes) * 2 - 1) * cfg.scale
                eps = (xt - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
                keep = logits[0, :, 1:].sigmoid().max(-1).values > cfg.renewal  # box renewal
                a, a_next = ac[t], ac[t_next]
                sigma = ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()  # eta 1
                c = (1 - a_next - sigma ** 2).clamp(min=0).sqrt()
                xt = a_next.sqrt() * x0 + c * eps + sigma * torch.randn(x0.shape, generator=g).to(dev)
                fresh = torch.randn(x0.shape, generator=g).to(dev)
                xt = torch.where(keep[None, :, None], xt, fresh)
        scores, classes, boxes, masks = (torch.cat(v).cpu() for v in zip(*found))
        keep = batched_nms(boxes, scores, classes, 0.5)[:100]
        if not len(keep):
            return Instances.empty(r, r)
        soft = F.interpolate(masks[keep][None].sigmoid(), size=(r, r), mode="bilinear", align_corners=False)[0]
        inst = Instances(soft.numpy() > 0.5, classes[keep].numpy(), scores[keep].numpy(), soft.numpy())
        return inst.keep(inst.masks.any((1, 2)))

    def predict_block_maps(self, maps: Mapping[Key, Any], keys: Sequence[Key], size: int) -> Any:
        """Not a class map: commands that need one (suggest, distill, evaluate --masks) say so in one line."""
        raise DdpmsegError("this is an instance model (the diffinst head): it finds instances, not a class map; use "
                           "`ddpmseg predict` or `ddpmseg evaluate --instances ANN` with it")

    def _detections(self, out: tuple, mask_feat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scores, classes, boxes, mask logits) of the proposals above the threshold (class 0 excluded)."""
        logits, boxes, filters = out
        p = logits[0].sigmoid()
        p[:, 0] = 0
        scores, classes = p.max(-1)
        keep = scores > self.threshold
        masks = instance_masks(filters[0][keep], boxes[0][keep], mask_feat[0]) if keep.any() else \
            mask_feat.new_zeros((0, *mask_feat.shape[-2:]))
        return scores[keep], classes[keep], boxes[0][keep], masks

    def describe(self) -> str:
        self._check_fitted()
        cfg = self.config
        what = f"{cfg.steps} DDIM step{'s' if cfg.steps > 1 else ''}" if cfg.diffusion else "the control (learned boxes, one step)"
        n = sum(p.numel() for p in self.module_.parameters())
        return (f"DiffusionInst head, {what}: {cfg.proposals} proposals, {cfg.stages} stages, {n:,} parameters, "
                f"{self.n_iter_:,} steps of {cfg.batch_size} images at {self.resolution_} px, final loss "
                f"{self.final_loss_:.3f} (mean of the last 50 steps)")

    # -- persistence -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "keys": [list(k) for k in self.keys_],
                "size": self.size_, "n_features_in": self.n_features_in_,
                "loss_curve": [float(v) for v in self.loss_curve_],
                "module": {k: v.cpu() for k, v in self.module_.state_dict().items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: str = "cpu", **params: Any) -> "DiffInstHead":
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise DdpmsegError("not a diffinst head's state; rerun `ddpmseg fit --head diffinst`")
        if int(state.get("version", 1)) > STATE_VERSION:
            raise DdpmsegError(f"diffinst head state version {state['version']} is newer than this ddpmseg supports; "
                               "upgrade ddpmseg")
        known = set(cls().get_params())
        head = cls(**{k: v for k, v in params.items() if k in known}, device=str(device))
        try:
            net = DiffInstNet(int(state["n_features_in"]), int(head.n_classes), head.config)
            net.load_state_dict(state["module"])
        except KeyError as e:
            raise DdpmsegError(f"diffinst head state lacks {e}; it is damaged: fit the model again") from None
        except RuntimeError as e:
            raise DdpmsegError(f"diffinst head state does not fit its settings ({str(e).splitlines()[0]}); fit again") from None
        head.module_ = net.to(device).eval()
        head.keys_ = [tuple(int(v) for v in k) for k in state["keys"]]
        head.size_ = int(state["size"])
        head.resolution_ = head.config.working_resolution(head.size_)
        head.n_features_in_ = int(state["n_features_in"])
        head.alphas_cumprod_ = cosine_alphas_cumprod()
        head.loss_curve_ = list(state.get("loss_curve", []))
        head.n_iter_ = head.iterations
        head.final_loss_ = float(np.mean(head.loss_curve_[-50:])) if head.loss_curve_ else float("nan")
        return head


HEAD = HeadSpec("diffinst", "DiffusionInst: box diffusion, iterated RoI heads and dynamic mask filters (instances)",
                DiffInstConfig, DiffInstHead, task="instances")
