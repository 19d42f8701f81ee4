"""Prediction at native resolution (layer 1 before upsampling) equals the ensemble
run on the paper's upsampled pixel features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmseg.heads.mlp import PixelEnsemble
from ddpmseg.features.extractor import upsample_concat

SHAPES = {5: (24, 4), 6: (16, 4), 8: (12, 8), 12: (8, 16)}  # block -> (channels, native size); S = 16


def _paper_pixel_features(maps, keys, size: int) -> torch.Tensor:
    """The paper's pixel features written out with plain torch: every block map upsampled bilinearly
    (align_corners=False, as the reference's nn.Upsample) to (size, size), concatenated along channels."""
    return torch.cat([torch.nn.functional.interpolate(maps[k][None].float(), size=(size, size), mode="bilinear",
                                                      align_corners=False)[0] for k in keys], dim=0)


def test_upsample_concat_is_the_papers_pixel_features():
    g = torch.Generator().manual_seed(0)
    keys = [(50, b) for b in SHAPES] + [(150, 12)]
    maps = {k: torch.randn(SHAPES[k[1]][0], SHAPES[k[1]][1], SHAPES[k[1]][1], generator=g) for k in keys}
    feats = upsample_concat(maps, keys, 16)
    assert feats.shape == (sum(SHAPES[b][0] for _, b in keys), 16, 16)
    torch.testing.assert_close(feats, _paper_pixel_features(maps, keys, 16), rtol=0, atol=0)
    # the first block's 4x4 map: output pixel 2 samples input coordinate (2 + 0.5) / 4 - 0.5 = 0.125
    m = maps[keys[0]][0]
    assert feats[0, 0, 2].item() == pytest.approx(0.875 * m[0, 0].item() + 0.125 * m[0, 1].item(), abs=1e-6)


@pytest.mark.parametrize("n_classes", [4, 34])  # narrow and wide (>= 30 classes) members
@pytest.mark.parametrize("steps", [(50,), (50, 150, 250)])
def test_native_resolution_prediction_equals_upsampled_features(n_classes, steps):
    g = torch.Generator().manual_seed(n_classes + len(steps))
    keys = [(t, b) for t in steps for b in SHAPES]
    maps = {k: torch.randn(SHAPES[k[1]][0], SHAPES[k[1]][1], SHAPES[k[1]][1], generator=g) for k in keys}
    feats = _paper_pixel_features(maps, keys, 16)  # (D, 16, 16)
    X = feats.reshape(feats.shape[0], -1).T  # (256, D)
    y = torch.randint(0, n_classes, (len(X),), generator=g)
    est = PixelEnsemble(n_classes=n_classes, n_members=3, max_epochs=2, random_state=0).fit(X, y)
    seg = est.predict_block_maps(maps, keys, 16, chunk=100)
    expect_labels = est.predict(X).reshape(16, 16)
    expect_unc = est.uncertainty(X).reshape(16, 16)
    # the two paths sum in another order; no pixel of these seeds is a near-tie between labels
    np.testing.assert_array_equal(seg.labels, expect_labels)
    np.testing.assert_allclose(seg.uncertainty, expect_unc, rtol=1e-4, atol=1e-5)
