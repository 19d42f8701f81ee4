"""Pixel sources: feature rows of pixels by index, without materialising the upsampled tensors.

A :class:`PixelSource` is what the classifier trains and predicts on:
``ArrayPixels`` over an in-memory (N, D) array, ``CachePixels`` over cached
native-resolution block maps. The paper's pixel feature at (y, x) is, for each block map, the bilinear
(align_corners=False) blend of four native-resolution neighbours. ``CachePixels``
keeps only the native maps in RAM (channel-last, float16: ~50 MB per 256x256
image for the paper's setting instead of 2.2 GB) and builds the feature rows
of any batch of pixels exactly as ``F.interpolate`` would.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ddpmseg.errors import DdpmsegError


@runtime_checkable
class PixelSource(Protocol):
    """Anything that hands out float32 feature rows of pixels by index."""

    n_features: int

    def __len__(self) -> int: ...

    def gather(self, index: torch.Tensor) -> torch.Tensor: ...


class ArrayPixels:
    """A :class:`PixelSource` over an in-memory (N, D) array or tensor (kept as is, no copy)."""

    def __init__(self, array: np.ndarray | torch.Tensor) -> None:
        data = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
        if data.ndim != 2:
            raise DdpmsegError(
                f"pixel features must be a 2-D (n_pixels, n_features) array, got shape {tuple(data.shape)}; reshape them"
            )
        if data.dtype == torch.bool or data.is_complex():
            raise DdpmsegError(f"pixel features must be real numbers, got dtype {data.dtype}; pass a float array")
        self._data = data
        self.n_features = int(data.shape[1])

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 rows (B, D) of the pixels ``index`` (int64, B)."""
        return self._data[torch.as_tensor(index, dtype=torch.long)].to(torch.float32)


def as_pixel_source(X: Any) -> PixelSource:
    """``X`` itself if it implements the PixelSource protocol, else ``ArrayPixels(X)``."""
    if isinstance(X, (np.ndarray, torch.Tensor, list, tuple)):
        return ArrayPixels(X)
    if hasattr(X, "gather") and hasattr(X, "n_features") and hasattr(X, "__len__"):
        return X
    return ArrayPixels(X)


def bilinear_taps(dst: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 for output coordinates ``dst``.

    Same arithmetic as PyTorch's upsample_bilinear2d with align_corners=False.
    """
    scale = in_size / out_size
    src = ((dst.to(torch.float32) + 0.5) * scale - 0.5).clamp_(min=0.0)
    i0 = src.to(torch.long)  # floor, src >= 0
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    return i0, i1, src - i0


def resolution_groups(shapes: Sequence[tuple[int, int, int]]) -> dict[tuple[int, int], tuple[list[int], torch.Tensor]]:
    """Maps of (C, h, w) ``shapes`` grouped by native resolution: {(h, w): (their indices, the feature
    rows of a (D, out) layer-1 weight their channels use)}, in order of first appearance.

    Layer 1 is linear and bilinear upsampling is linear with weights summing to
    one, so W·up(F) + b = up(W·F) + b: layer 1 can run on each group's native
    maps and only its outputs be upsampled (training on tiles and prediction both do).
    """
    offsets = np.cumsum([0] + [c for c, _, _ in shapes])
    groups: dict[tuple[int, int], tuple[list[int], torch.Tensor]] = {}
    for i, (_, h, w) in enumerate(shapes):
        members, _ = groups.get((h, w), ([], None))
        members.append(i)
        groups[(h, w)] = (members, torch.cat([torch.arange(offsets[j], offsets[j + 1]) for j in members]))
    return groups


def layer1_by_resolution(maps: Mapping[tuple[int, int], Any], keys: Sequence[tuple[int, int]],
                         weight: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """``W·F`` of one image's block maps at their native resolutions: {(h, w): (out, h * w)} float32,
    the maps of one resolution summed (see :func:`resolution_groups`). ``weight``: (D, out), its rows
    in the (t, block) order of ``keys``."""
    feats = [torch.as_tensor(maps[k]).to(device=weight.device, dtype=torch.float32) for k in keys]
    d = sum(f.shape[0] for f in feats)
    if d != weight.shape[0]:
        raise DdpmsegError(f"features have {d} channels but the classifier expects {weight.shape[0]}; refit the model")
    offsets = np.cumsum([0] + [f.shape[0] for f in feats])
    out: dict[tuple[int, int], torch.Tensor] = {}
    for (h, w), (members, _) in resolution_groups([tuple(f.shape) for f in feats]).items():
        for j in members:  # one GEMM per map, summed in key order
            z = torch.mm(weight[offsets[j] : offsets[j + 1]].T, feats[j].reshape(-1, h * w))
            out[(h, w)] = out[(h, w)] + z if (h, w) in out else z
    return out


class CachePixels:
    """A ``PixelSource`` over images' native block maps.

    ``maps_per_image`` is a list (one per image) of {(t, block): (C, h, w)} maps;
    pixel index p addresses image p // (S*S), row (p % (S*S)) // S, column p % S.
    """

    def __init__(
        self,
        maps_per_image: Sequence[Mapping[tuple[int, int], np.ndarray | torch.Tensor]],
        keys: Sequence[tuple[int, int]],
        size: int,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        self.keys = list(keys)
        self.size = size
        self.n_images = len(maps_per_image)
        # One (N*h*w, C) channel-last table per (t, block): a pixel's channels are contiguous.
        self._tables: list[torch.Tensor] = []
        self._res: list[tuple[int, int]] = []
        for k in self.keys:
            stacked = torch.stack([torch.as_tensor(m[k]).to(dtype) for m in maps_per_image])  # (N,C,h,w)
            n, c, h, w = stacked.shape
            self._tables.append(stacked.permute(0, 2, 3, 1).reshape(n * h * w, c).contiguous())
            self._res.append((h, w))
        self.n_features = sum(t.shape[1] for t in self._tables)
        # per native resolution: its tables and the rows of a (D, out) layer-1 weight their channels use
        self._groups = resolution_groups([(t.shape[1], h, w) for t, (h, w) in zip(self._tables, self._res)])

    def __len__(self) -> int:
        return self.n_images * self.size * self.size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tables)

    def layer1_rows(self) -> list[torch.Tensor]:
        """The feature indices of each native resolution's channels (what :meth:`tiles_layer1`'s weights cover)."""
        return [rows for _, rows in self._groups.values()]

    def tiles_layer1(self, images: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, tile: int,
                     weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features @ W`` (float32, (n, tile * tile, out)) of the pixels of ``n`` tiles (image index,
        top row and left column of each), computed at the native resolution.

        ``weights[g]`` holds the rows ``layer1_rows()[g]`` of ``W`` (D, out): it multiplies only the
        native positions under each tile, and the products are upsampled bilinearly to the tile's
        pixels (what upsampling the features first gives, since both maps are linear).
        Differentiable in the weights; all tiles in one batched computation.
        """
        s, n = self.size, len(images)
        coords = torch.arange(tile)
        out = None
        for ((h, w), (members, _)), weight in zip(self._groups.items(), weights):
            # the native rows (cols) a tile's pixels read: a window of fixed size from the first one's floor
            ry0, ry1, wy = bilinear_taps(y0[:, None] + coords, h, s)  # (n, tile)
            rx0, rx1, wx = bilinear_taps(x0[:, None] + coords, w, s)
            rh, rw = min(h, -(-tile * h // s) + 2), min(w, -(-tile * w // s) + 2)
            r_lo = torch.clamp(ry0[:, 0], max=h - rh)
            c_lo = torch.clamp(rx0[:, 0], max=w - rw)
            rr = r_lo[:, None] + torch.arange(rh)  # (n, rh)
            cc = c_lo[:, None] + torch.arange(rw)
            pos = images[:, None, None] * (h * w) + rr[:, :, None] * w + cc[:, None, :]  # (n, rh, rw)
            flat = pos.reshape(-1)
            feats = torch.cat([self._tables[j][flat] for j in members], dim=1)  # gathered where the maps live
            z = (feats.to(device=weight.device, dtype=weight.dtype, non_blocking=True) @ weight).float().view(n, rh, rw, -1)
            ay = torch.zeros(n, tile, rh)
            ay.scatter_add_(2, (ry0 - r_lo[:, None])[..., None], (1 - wy)[..., None])
            ay.scatter_add_(2, (ry1 - r_lo[:, None])[..., None], wy[..., None])
            ax = torch.zeros(n, tile, rw)
            ax.scatter_add_(2, (rx0 - c_lo[:, None])[..., None], (1 - wx)[..., None])
            ax.scatter_add_(2, (rx1 - c_lo[:, None])[..., None], wx[..., None])
            ay, ax = ay.to(z.device), ax.to(z.device)
            up = torch.einsum("nbj,najc->nabc", ax, torch.einsum("nai,nijc->najc", ay, z))  # (n, tile, tile, out)
            out = up if out is None else out + up
        return out.reshape(n, tile * tile, -1)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 features (B, C) of the pixels ``index`` (int64, B)."""
        index = torch.as_tensor(index, dtype=torch.long)
        s = self.size
        img, rem = index // (s * s), index % (s * s)
        y, x = rem // s, rem % s
        out = torch.empty((len(index), self.n_features), dtype=torch.float32)
        taps: dict[tuple[int, int], tuple] = {}
        col = 0
        for table, (h, w) in zip(self._tables, self._res):
            if (h, w) not in taps:
                y0, y1, wy = bilinear_taps(y, h, s)
                x0, x1, wx = bilinear_taps(x, w, s)
                base = img * (h * w)
                taps[(h, w)] = (
                    (base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1),
                    ((1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx),
                )
            idx, wts = taps[(h, w)]
            c = table.shape[1]
            acc = out[:, col : col + c]
            acc.copy_(table[idx[0]]).mul_(wts[0][:, None])
            for i, wt in zip(idx[1:], wts[1:]):
                acc.addcmul_(table[i].float(), wt[:, None])
            col += c
        return out
