"""Box operations in plain torch (torchvision's ops do not load beside this CPU torch).

Boxes are (..., 4) tensors, ``xyxy`` (x0, y0, x1, y1) or ``cxcywh``, in any one unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU (N, M) of xyxy boxes, and the unions."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = _area(a)[:, None] + _area(b)[None] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (N, M) of xyxy boxes: IoU - (enclosing area - union) / enclosing area."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=1e-9)


def roi_align(features: torch.Tensor, boxes: torch.Tensor, output: int, samples: int = 2) -> torch.Tensor:
    """RoIAlign (aligned, no -0.5 pixel shift issues: coordinates are fractions of the map) of one
    image's (C, H, W) ``features`` over ``boxes`` (N, 4) xyxy in [0, 1] of the map's width / height:
    (N, C, output, output), each bin the mean of ``samples`` x ``samples`` bilinear samples."""
    n = boxes.shape[0]
    k = output * samples
    t = (torch.arange(k, dtype=features.dtype, device=features.device) + 0.5) / k  # sample centres in [0, 1]
    x = boxes[:, 0:1] + t[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # (N, k)
    y = boxes[:, 1:2] + t[None] * (boxes[:, 3:4] - boxes[:, 1:2])
    grid = torch.stack([x[:, None, :].expand(n, k, k), y[:, :, None].expand(n, k, k)], -1) * 2 - 1
    out = F.grid_sample(features[None].expand(n, -1, -1, -1), grid, mode="bilinear", align_corners=False,
                        padding_mode="zeros")
    return F.avg_pool2d(out, samples) if samples > 1 else out


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    order = scores.argsort(descending=True)
    keep = []
    ious = box_iou(boxes, boxes)[0]
    dropped = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if dropped[i]:
            continue
        keep.append(i)
        dropped |= ious[i] > iou
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Class-wise NMS: boxes of different classes never suppress each other; best score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    shift = classes.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + shift, scores, iou)
