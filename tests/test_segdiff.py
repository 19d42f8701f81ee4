"""The SegDiff head: its schedule and sampler against plain formulas, that it learns, persistence, the
images' path through fit and predict, and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ddpmseg.errors import DdpmsegError
from ddpmseg.heads import ImageMaps, get_head
from ddpmseg.heads.segdiff import Schedule, SegDiffHead, linear_betas, one_hot

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(width=8, levels=2, rrdb_blocks=1, rrdb_features=8, batch_size=4, lr=3e-3, ema=0.99)


def _toy(n: int = 4, size: int = 16, seed: int = 0):
    """Images whose first two channels mark classes 1 and 2 (plus noise), and their label maps."""
    g = np.random.RandomState(seed)
    images, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.int64)
        r, c = g.randint(3, size - 3, 2)
        lab[max(0, r - 3): r + 3, max(0, c - 3): c + 3] = 1
        lab[: size // 4] = 2
        img = np.stack([lab == 1, lab == 2, np.zeros_like(lab, bool)]).astype(np.float32) * 2 - 1
        images.append(img + 0.2 * g.randn(3, size, size).astype(np.float32))
        labels.append(lab)
    return images, labels


def _fit(images, labels, **settings) -> SegDiffHead:
    size = labels[0].shape[-1]
    return SegDiffHead(3, **{**SMALL, **settings}).fit(ImageMaps([{}] * len(images), (), size, images), labels)


def test_the_schedule_is_the_linear_one_rescaled_by_1000_over_t():
    for T in (100, 1000, 10):
        scale = 1000 / T
        plain = [scale * 0.0001 + i * (scale * 0.02 - scale * 0.0001) / (T - 1) for i in range(T)]
        np.testing.assert_allclose(linear_betas(T).numpy(), plain, rtol=1e-12)
        prod, cum = 1.0, []
        for b in plain:
            prod *= 1 - b
            cum.append(prod)
        np.testing.assert_allclose(Schedule(T).alphas_cumprod.numpy(), cum, rtol=1e-10)
    assert linear_betas(100)[0].item() == pytest.approx(0.001) and linear_betas(100)[-1].item() == pytest.approx(0.2)


class _Oracle(torch.nn.Module):
    """The noise that takes x0 to x_t exactly, from alpha-bar computed here by a plain loop."""

    def __init__(self, x0: torch.Tensor, T: int) -> None:
        super().__init__()
        self.x0, ab, p = x0, [], 1.0
        for i in range(T):
            p *= 1 - (1000 / T) * (0.0001 + i * (0.02 - 0.0001) / (T - 1))
            ab.append(p)
        self.ab = torch.tensor(ab)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, cond: torch.Tensor) -> torch.Tensor:
        return cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ab = self.ab[t][:, None, None, None]
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler, steps", [("ancestral", 100), ("ddim", 10), ("ddim", 1)])
def test_both_samplers_end_at_x0_when_the_noise_is_known_exactly(sampler, steps):
    labels = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2], [2, 0, 0, 1], [0, 0, 0, 0]])
    x0 = one_hot(labels[None], 3)
    head = SegDiffHead(3, sampler=sampler, steps=steps, generations=3)
    head.module_ = _Oracle(x0, 100)
    out = head.sample(torch.zeros(3, 4, 4))
    assert out.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(out.numpy(), x0.expand(3, -1, -1, -1).numpy(), atol=1e-4)
    assert len(head.timesteps_used()) == steps and head.timesteps_used()[0] == 99 and head.timesteps_used()[-1] == (0 if steps > 1 else 99)


def test_one_hot_masks_are_in_minus_one_one_and_ignored_pixels_are_no_class():
    x = one_hot(torch.tensor([[[0, 2], [3, 1]]]), 3)  # 3 = ignore (k)
    assert x.shape == (1, 3, 2, 2) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert x[0, :, 1, 0].tolist() == [-1, -1, -1] and x[0, :, 0, 1].tolist() == [-1, -1, 1]


@pytest.mark.parametrize("settings", [{"iterations": 200}, {"diffusion": False, "iterations": 60}])
def test_the_denoiser_learns_a_toy_case_far_beyond_the_majority_class(settings):
    images, labels = _toy(6)
    head = _fit(images[:4], labels[:4], width=16, crop=16, lr=2e-3, batch_size=8, generations=9, steps=10, **settings)
    assert head.loss_curve_[-1] < head.loss_curve_[0] / 2
    acc = np.mean([(head.predict_block_maps({}, (), 16, image=im).labels == lab).mean()
                   for im, lab in zip(images[4:], labels[4:])])
    majority = np.mean([(lab == 0).mean() for lab in labels[4:]])
    assert acc > 0.9 and acc > majority + 0.2, (acc, majority)


def test_generations_disagree_where_the_uncertainty_is_and_one_generation_has_the_entropy():
    images, labels = _toy(4)
    head = _fit(images, labels, iterations=3, generations=4, steps=3)  # barely trained: generations differ
    seg = head.predict_block_maps({}, (), 16, image=images[0])
    masks = head.sample(torch.as_tensor(images[0]))
    votes = torch.nn.functional.one_hot(masks.argmax(1), 3).float().mean(0)
    plain = -(votes * torch.log(votes.clamp_min(1e-30))).sum(-1)
    np.testing.assert_allclose(seg.uncertainty, plain.numpy(), atol=1e-5)
    agree = (masks.argmax(1) == masks.argmax(1)[0]).all(0).numpy()
    assert (seg.uncertainty[agree] == 0).all() and (seg.uncertainty[~agree] > 0).all() and (~agree).any()
    np.testing.assert_allclose(seg.proba.sum(0), 1, rtol=1e-5)
    head.generations = 1
    one = head.predict_block_maps({}, (), 16, image=images[0])
    np.testing.assert_allclose(one.uncertainty, -(one.proba * np.log(one.proba)).sum(0), atol=1e-5)


def test_state_dict_round_trip_predicts_the_same_and_fit_is_seeded(tmp_path):
    images, labels = _toy(3)
    head = _fit(images, labels, iterations=4, generations=2, steps=2)
    spec = get_head("segdiff")
    torch.save(head.state_dict(), tmp_path / "t.pt")  # as tensors.pt holds it, loaded as model.py does
    config = spec.make_config(json.loads(json.dumps(dataclasses.asdict(spec.fitted_config(head)))))
    again = spec.load(torch.load(tmp_path / "t.pt", weights_only=True), config, n_classes=3, ignore_index=255,
                      random_state=0)
    a = head.predict_block_maps({}, (), 16, image=images[1])
    b = again.predict_block_maps({}, (), 16, image=images[1])
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.uncertainty, b.uncertainty)
    twin = _fit(images, labels, iterations=4, generations=2, steps=2)
    assert twin.loss_curve_ == head.loss_curve_


def test_the_frozen_encoder_reads_the_block_maps():
    images, labels = _toy(3)
    maps = [{(5, 1): im[:2, ::2, ::2], (5, 2): im} for im in images]  # two blocks at two resolutions
    head = SegDiffHead(3, encoder="frozen", **{**SMALL, "iterations": 3, "generations": 2, "steps": 2})
    assert not head.needs_images
    head.fit(ImageMaps(maps, ((5, 1), (5, 2)), 16), labels)
    assert head.n_condition_channels_ == 5
    seg = head.predict_block_maps(maps[0], ((5, 1), (5, 2)), 16)
    assert seg.labels.shape == (16, 16)
    with pytest.raises(DdpmsegError, match=r"differ from the segdiff head's"):
        head.predict_block_maps(maps[0], ((5, 2), (5, 1)), 16)


@pytest.mark.parametrize("options, message", [
    ({"encoder": "pixels"}, r"^segdiff head: encoder 'pixels' is unknown: use one of rrdb, frozen$"),
    ({"sampler": "euler"}, r"^segdiff head: sampler 'euler' is unknown: use one of ancestral, ddim$"),
    ({"steps": "200"}, r"^segdiff head: steps 200 must be 1 to timesteps \(100\)$"),
    ({"ema": "1"}, r"^segdiff head: ema 1.0 must be in \[0, 1\)$"),
    ({"width": "12"}, r"^segdiff head: width 12 must be a multiple of 8$"),
    ({"generations": "many"}, r"^--head-option generations \(segdiff head\): 'many' is not a valid int$"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(DdpmsegError, match=message):
        get_head("segdiff").make_config(options)


def test_bad_inputs_are_one_line_errors():
    images, labels = _toy(2)
    with pytest.raises(DdpmsegError, match=r"^segdiff head: encoder=rrdb reads the images' pixels but X has no images"):
        SegDiffHead(3, **SMALL, iterations=1).fit(ImageMaps([{}, {}], (), 16), labels)
    with pytest.raises(DdpmsegError, match=r"^segdiff head: an image of X is \(3, 8, 8\), not \(3, 16, 16\)"):
        SegDiffHead(3, **SMALL, iterations=1).fit(ImageMaps([{}, {}], (), 16, [im[:, :8, :8] for im in images]), labels)
    with pytest.raises(DdpmsegError, match=r"^segdiff head: the model grid 18 does not divide by 2\^\(levels-1\) = 4; lower the head.s levels$"):
        SegDiffHead(3, iterations=1).fit(ImageMaps([{}], (), 18, [np.zeros((3, 18, 18))]), [np.zeros((18, 18), int)])
    head = _fit(images, labels, iterations=1, generations=1, steps=1)
    with pytest.raises(DdpmsegError, match=r"^segdiff head: encoder=rrdb reads the image's pixels; pass image="):
        head.predict_block_maps({}, (), 16)
    with pytest.raises(DdpmsegError, match="not a segdiff head's state"):
        SegDiffHead.from_state_dict({"format": "x"}, n_classes=3)


def test_a_moved_or_changed_source_image_is_a_one_line_error(tmp_path, eyes8):
    from ddpmseg._io import file_sha256
    from ddpmseg.workers import cached_image

    src = tmp_path / "a.jpg"
    src.write_bytes((eyes8 / "image_0.jpg").read_bytes())
    digest = file_sha256(src)
    assert cached_image("a", str(src), digest, 32, "resize").shape == (3, 32, 32)
    src.write_bytes(src.read_bytes() + b"\0")
    with pytest.raises(DdpmsegError, match=r"^image 'a': its source .*a.jpg has changed since extraction"):
        cached_image("a", str(src), digest, 32, "resize")
    src.unlink()
    with pytest.raises(DdpmsegError, match=r"^image 'a': its source .*a.jpg is gone, and this head reads the images' "
                                           r"pixels; put the file back or extract the features again$"):
        cached_image("a", str(src), digest, 32, "resize")


def test_fit_head_segdiff_then_predict_and_evaluate_on_eyes8(eyes_world, tmp_path):
    from cli_helpers import ok

    d, imgs = eyes_world
    base = ["fit", "--features", d / "feats.h5", "--masks", imgs, "--head", "segdiff"]
    tiny = [a for k, v in {**SMALL, "iterations": 3, "generations": 2, "steps": 2}.items()
            for a in ("--head-option", f"{k}={v}")]
    for name, extra in (("rrdb", []), ("frozen", ["--head-option", "encoder=frozen"]),
                        ("control", ["--head-option", "diffusion=false"])):
        model = tmp_path / name
        out = ok(*base, *tiny, *extra, "--out", model)
        assert "SegDiff head" in out and "3 steps of 4" in out, out
        hc = json.loads((model / "model.json").read_text())["fit"]["head_config"]
        assert hc["encoder"] == ("frozen" if name == "frozen" else "rrdb") and hc["diffusion"] == (name != "control")
        preds = tmp_path / f"preds_{name}"
        ok("predict", imgs / "image_0.jpg", "--model", model, "--out", preds)
        for kind in ("labels", "overlay", "uncertainty"):
            assert (preds / f"image_0_{kind}.png").is_file()
    result = json.loads(ok("evaluate", imgs, "--model", tmp_path / "rrdb", "--masks", imgs, "--json"))
    assert result["n_images"] == 3 and 0 <= result["miou"] <= 1


class _RecordingOracle(_Oracle):
    """The oracle that also keeps every x_t it is shown, by timestep."""

    def __init__(self, x0: torch.Tensor, T: int) -> None:
        super().__init__(x0, T)
        self.seen: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.seen[int(t[0])] = x.clone()
        return super().forward(x, t, g)


def test_each_ancestral_step_draws_from_the_posterior_written_out_plainly():
    """x_{t-1} = beta_t sqrt(ab_{t-1}) / (1 - ab_t) x0 + (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t) x_t + noise of
    variance beta_t, every step checked over many generations (not only where the chain ends)."""
    T, n = 100, 4000
    x0 = one_hot(torch.tensor([[[1]]]), 2)  # one pixel, two classes: x0 = (-1, 1)
    head = SegDiffHead(2, sampler="ancestral", generations=n)
    oracle = _RecordingOracle(x0, T)
    head.module_ = oracle
    head.sample(torch.zeros(2, 1, 1))
    ab = oracle.ab.double()
    for t in (90, 50, 10, 2):
        x_t, x_prev = oracle.seen[t].double(), oracle.seen[t - 1].double()
        beta = 1 - ab[t] / ab[t - 1]
        mean = beta * ab[t - 1].sqrt() / (1 - ab[t]) * x0.double() + (1 - ab[t - 1]) * (1 - beta).sqrt() / (1 - ab[t]) * x_t
        r = (x_prev - mean).flatten()
        assert abs(r.mean().item()) < 4 * beta.sqrt().item() / n**0.5, t
        assert r.var().item() == pytest.approx(beta.item(), rel=0.1), t
