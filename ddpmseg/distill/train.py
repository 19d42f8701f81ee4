"""Training a student network on (image, label map) pairs: augmentation, epochs, checkpoints, the epoch kept.

One epoch draws ``max(N, epoch_images)`` training pairs (shuffled passes over
the N pairs), so a small training set still gets a useful number of steps per
epoch. Adam, cross-entropy with the ignore label. After every epoch the
network is scored (mIoU) on ``select`` (the labelled images with their true
masks: the reference also picks its epoch on training images; no test image
is touched) and the whole state is checkpointed atomically, so ``resume``
continues a killed run from its last finished epoch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpmseg._io import remove_stale_temps, write_atomic
from ddpmseg.distill.config import StudentTrainConfig
from ddpmseg.errors import DdpmsegError
from ddpmseg.metrics import SegmentationScore


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [-1, 1], the diffusion models' (and ddpmseg's) range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(x: torch.Tensor, y: torch.Tensor, config: StudentTrainConfig, gen: torch.Generator,
            ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: a random scale, then a random crop (or padding: image 0, labels ignored) back to S; a flip."""
    s = x.shape[-1]
    xs, ys = [], []
    lo, hi = config.scale_range
    for xi, yi in zip(x, y):
        if config.flip and torch.rand((), generator=gen) < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        n = max(8, int(round(s * math.exp(float(torch.empty(()).uniform_(math.log(lo), math.log(hi), generator=gen))))))
        xi = F.interpolate(xi[None], size=(n, n), mode="bilinear", align_corners=False)[0]
        yi = F.interpolate(yi[None, None].float(), size=(n, n), mode="nearest")[0, 0].long()
        if n < s:  # pad at a random place
            px, py = (int(torch.randint(0, s - n + 1, (), generator=gen)) for _ in range(2))
            xi = F.pad(xi, (px, s - n - px, py, s - n - py), value=0.0)
            yi = F.pad(yi, (px, s - n - px, py, s - n - py), value=ignore_index)
        elif n > s:
            cx, cy = (int(torch.randint(0, n - s + 1, (), generator=gen)) for _ in range(2))
            xi, yi = xi[:, cy:cy + s, cx:cx + s], yi[cy:cy + s, cx:cx + s]
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


@torch.inference_mode()
def score(network: torch.nn.Module, images: np.ndarray, masks: np.ndarray, n_classes: int, ignore_index: int,
          batch_size: int = 8) -> float:
    """mIoU (percent) of ``network`` on (N, S, S, 3) uint8 images against (N, S, S) label maps."""
    network.eval()
    device = next(network.parameters()).device
    acc = SegmentationScore(n_classes, ignore_index)
    for i in range(0, len(images), batch_size):
        pred = network(to_input(images[i:i + batch_size]).to(device)).argmax(1).cpu().numpy()
        for p, m in zip(pred, masks[i:i + batch_size]):
            acc.update(p, m)
    return 100.0 * float(acc.result()["miou"])


def train_student(network: torch.nn.Module, images: np.ndarray, labels: np.ndarray, select: tuple[np.ndarray, np.ndarray],
                  folder: Path, config: StudentTrainConfig, *, n_classes: int, ignore_index: int, resume: bool = False,
                  progress: bool = False) -> tuple[torch.nn.Module, TrainState]:
    """Train ``network`` (on its device) on ``images`` (N, S, S, 3) uint8 / ``labels`` (N, S, S); checkpoints in
    ``folder/checkpoint.pt``, one JSON line per epoch in ``folder/train_log.jsonl``. Returns the network with
    the weights of the best epoch on ``select`` and the training state."""
    device = next(network.parameters()).device
    opt = torch.optim.Adam(network.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    state, best = TrainState(), None
    ckpt = folder / "checkpoint.pt"
    remove_stale_temps(ckpt)
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        now = json.loads(json.dumps(config.to_dict()))
        before = saved["config"]
        changed = sorted(k for k in now if k != "epochs" and before.get(k) != now[k])
        if changed:  # more (or fewer) epochs is fine; anything else would mix two trainings
            was = ", ".join(f"{k}={before.get(k)}" for k in changed)
            raise DdpmsegError(f"{ckpt} was trained with other settings ({was}); resume with the same settings, "
                               "or pass --overwrite to start again")
        network.load_state_dict(saved["network"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        state = TrainState(int(saved["epoch"]), json.loads(saved["history"]), int(saved["best_epoch"]),
                           float(saved["best_score"]))
        best = saved["best"]
    n = len(images)
    per_epoch = max(n, config.epoch_images)
    bar = tqdm(range(state.epoch, config.epochs), desc="student", unit="epoch", disable=not progress,
               initial=state.epoch, total=config.epochs)
    for epoch in bar:
        network.train()
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(per_epoch / n))])[:per_epoch]
        t0, total, seen = time.perf_counter(), 0.0, 0
        for i in range(0, per_epoch, config.batch_size):
            idx = order[i:i + config.batch_size].numpy()
            x, y = to_input(images[idx]), torch.from_numpy(labels[idx]).long()
            if config.augment:
                x, y = augment(x, y, config, gen, ignore_index)
            loss = F.cross_entropy(network(x.to(device)), y.to(device), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        miou = score(network, *select, n_classes, ignore_index)
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, "loss": total / seen, "select_miou": miou,
               "images_per_s": seen / (time.perf_counter() - t0)}
        state.history.append(row)
        if miou > state.best_score:
            state.best_epoch, state.best_score = state.epoch, miou
            best = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        saved = {"network": network.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "epoch": state.epoch, "history": json.dumps(state.history), "best_epoch": state.best_epoch,
                 "best_score": state.best_score, "best": best, "config": json.loads(json.dumps(config.to_dict()))}
        write_atomic(ckpt, lambda p: torch.save(saved, p))
        log = "".join(json.dumps(r) + "\n" for r in state.history)
        write_atomic(folder / "train_log.jsonl", lambda p: p.write_text(log))
    if best is not None:
        network.load_state_dict(best)
    return network.eval(), state
