"""The DDP head: its schedule and sampler against DDP's formulas written out plainly, that it learns,
is seeded, saves and loads, and runs end to end through fit / predict / evaluate."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ddpmseg.errors import DdpmsegError
from ddpmseg.heads import DDPConfig
from ddpmseg.heads.ddp import DDPHead, alpha_sigma, log_snr, resized_features, time_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = DDPConfig(width=32, depth=2, iterations=150, batch_size=4, crop=16, lr=3e-3)


def test_cosine_log_snr_schedule_matches_ddp_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 0.999])
    # DDP: -log(clamp(cos((t + 0.0002) / 1.00025 * pi / 2) ** -2 - 1, 1e-5)), written with math per value
    expect = [-math.log(max(math.cos((v + 0.0002) / 1.00025 * math.pi / 2) ** -2 - 1, 1e-5)) for v in t.tolist()]
    torch.testing.assert_close(log_snr(t), torch.tensor(expect), rtol=1e-4, atol=1e-4)
    a, s = alpha_sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones(5))
    assert a[0] > 0.999 and a[-1] < 0.01  # almost clean at 0, almost pure noise at 0.999


def test_time_pairs_are_ddps_asymmetric_pairs():
    assert time_pairs(1) == [(1.0, 0.0)]
    got = time_pairs(3)
    expect = [(1.0, 1 / 3), (2 / 3, 0.0), (1 / 3, 0.0)]  # t_next = max(1 - (i + 2) / 3, 0)
    assert all(math.isclose(a, c) and math.isclose(b, d) for (a, b), (c, d) in zip(got, expect)), got
    assert [p[1] for p in time_pairs(4, 0.0)] == [0.75, 0.5, 0.25, 0.0]  # td = 0: plain DDIM


def _world(n: int = 6, size: int = 32, seed: int = 0):
    """Block maps at two native resolutions whose first channel marks each pixel's class (3 classes),
    plus noise channels: a case a conv head must learn far beyond the majority class."""
    g = torch.Generator().manual_seed(seed)
    maps, labels = [], []
    for _ in range(n):
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
        lab = torch.zeros(size, size, dtype=torch.long)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 1
        lab[(yy < 6) & (xx > size - 10)] = 2
        sig = torch.nn.functional.one_hot(lab, 3).permute(2, 0, 1).float()
        hi = torch.cat([sig, torch.randn(3, size, size, generator=g)])  # (6, 32, 32)
        lo = torch.nn.functional.avg_pool2d(hi[None], 2)[0] + 0.1 * torch.randn(6, size // 2, size // 2, generator=g)
        maps.append({(50, 1): lo.numpy().astype(np.float16), (50, 2): hi.numpy().astype(np.float16)})
        labels.append(lab.numpy())
    return maps, labels


@pytest.mark.parametrize("diffusion", [True, False])
def test_the_head_learns_a_case_far_beyond_the_majority_class(diffusion):
    maps, labels = _world(8)
    cfg = dataclasses.replace(SMALL, diffusion=diffusion)
    head = DDPHead(3, cfg, random_state=0).fit(maps[:6], labels[:6])
    keys = list(maps[0])
    acc, trivial = [], []
    for m, lab in zip(maps[6:], labels[6:]):
        seg = head.predict_block_maps(m, keys, 32)
        assert seg.labels.shape == (32, 32) and seg.uncertainty.shape == (32, 32)
        acc.append((seg.labels == lab).mean())
        trivial.append((lab == 0).mean())
    assert np.mean(trivial) < 0.9 and np.mean(acc) > np.mean(trivial) + 0.05, (acc, trivial)
    # per-class: both small classes are found on the held-out images
    pred = np.stack([head.predict_block_maps(m, keys, 32).labels for m in maps[6:]])
    truth = np.stack(labels[6:])
    for c in (1, 2):
        inter, union = ((pred == c) & (truth == c)).sum(), ((pred == c) | (truth == c)).sum()
        assert inter / union > 0.5, (c, inter / union)


def test_fit_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    maps, labels = _world(3)
    cfg = dataclasses.replace(SMALL, iterations=5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = DDPHead(3, cfg, random_state=7).fit(maps, labels)
    assert torch.equal(torch.rand(1), before)  # fit drew nothing from the global generator
    b = DDPHead(3, cfg, random_state=7).fit(maps, labels)
    c = DDPHead(3, cfg, random_state=8).fit(maps, labels)
    sa, sb, sc = a.module_.state_dict(), b.module_.state_dict(), c.module_.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["proj.weight"], sc["proj.weight"])


def _plain_ddim(head: DDPHead, maps, steps: int, gens: int, seed: int) -> list[torch.Tensor]:
    """DDP's ddim_sample written out step by step with scalar schedule values (no batching helpers)."""
    m = head.module_
    x = torch.cat([torch.nn.functional.interpolate(torch.as_tensor(maps[k]).float()[None], size=(head.resolution_,) * 2,
                                                   mode="bilinear", align_corners=False,
                                                   antialias=maps[k].shape[-1] > head.resolution_)[0]
                   for k in head.keys_])
    feat = m.features(x[None]).repeat(gens, 1, 1, 1)
    x_t = torch.randn(feat.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(steps):
        t_now, t_next = 1 - i / steps, max(1 - (i + 2) / steps, 0.0)

        def a_s(t):
            snr = -math.log(max(math.cos((t + 0.0002) / 1.00025 * math.pi / 2) ** -2 - 1, 1e-5))
            return math.sqrt(1 / (1 + math.exp(-snr))), math.sqrt(1 / (1 + math.exp(snr)))

        logits = m.decode(feat, x_t, torch.full((gens,), t_now))
        out.append(logits.softmax(1))
        emb = m.embed(logits.argmax(1)).permute(0, 3, 1, 2)
        x0 = (torch.sigmoid(emb) * 2 - 1) * head.config.bit_scale
        (a, s), (an, sn) = a_s(t_now), a_s(t_next)
        eps = (x_t - a * x0) / max(s, 1e-8)
        x_t = an * x0 + sn * eps
    return out


def test_sampling_equals_ddps_ddim_loop_written_plainly():
    maps, labels = _world(3)
    head = DDPHead(3, dataclasses.replace(SMALL, iterations=30), random_state=1).fit(maps, labels)
    for steps, gens in [(1, 1), (3, 2), (10, 1)]:
        got = head.sample(maps[0], steps=steps, generations=gens, seed=5)
        with torch.no_grad():
            expect = torch.stack(_plain_ddim(head, maps[0], steps, gens, 5))
        assert got.shape == (steps, gens, 3, 32, 32)
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_generations_differ_and_their_spread_is_the_uncertainty():
    maps, labels = _world(3)
    head = DDPHead(3, dataclasses.replace(SMALL, iterations=20, generations=4), random_state=1).fit(maps, labels)
    probs = head.sample(maps[0])
    assert not torch.equal(probs[:, 0], probs[:, 1])  # independent noise draws
    mean, unc = head.predict_proba_maps(maps[0], 32)
    torch.testing.assert_close(mean, probs[-1].mean(0))  # working resolution = model grid here
    flat = probs.flatten(0, 1)
    p = flat.mean(0)
    mi = -(p * p.clamp_min(1e-30).log()).sum(0) + (flat * flat.clamp_min(1e-30).log()).sum(1).mean(0)
    torch.testing.assert_close(unc, mi.clamp_min(0), rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_predicts_the_same():
    maps, labels = _world(3)
    head = DDPHead(3, dataclasses.replace(SMALL, iterations=10), random_state=2).fit(maps, labels)
    state = head.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = DDPHead.from_state_dict(torch.load(buf, weights_only=True))
    keys = list(maps[0])
    a, b = head.predict_block_maps(maps[1], keys, 32), again.predict_block_maps(maps[1], keys, 32)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.uncertainty, b.uncertainty)


def test_resized_features_downsample_with_antialias_and_keep_key_order():
    maps = {(1, 1): np.ones((2, 8, 8), np.float16), (1, 2): np.arange(64, dtype=np.float32).reshape(1, 8, 8)}
    x = resized_features(maps, [(1, 2), (1, 1)], 4)
    assert x.shape == (3, 4, 4)
    # a 2x antialiased bilinear shrink (triangle weights 1,3,3,1 over 4 inputs) of a linear ramp is the
    # mean of each 2x2 cell away from the border (plain bilinear would take one point: cell mean - 0.5 - 4)
    expect = np.arange(64, dtype=np.float32).reshape(4, 2, 4, 2).mean((1, 3))
    np.testing.assert_allclose(x[0, 1:3, 1:3].numpy(), expect[1:3, 1:3], rtol=1e-5)
    assert torch.equal(x[1:], torch.ones(2, 4, 4))


def test_bad_settings_and_inputs_are_one_line_errors():
    with pytest.raises(DdpmsegError, match=r"--head-steps 0 must be at least 1"):
        DDPConfig(steps=0)
    maps, labels = _world(2)
    with pytest.raises(DdpmsegError, match=r"working resolution 24 must divide the model grid 32"):
        DDPHead(3, dataclasses.replace(SMALL, resolution=24)).fit(maps, labels)
    with pytest.raises(DdpmsegError, match="not fitted yet"):
        DDPHead(3).predict_block_maps(maps[0], list(maps[0]), 32)
    head = DDPHead(3, dataclasses.replace(SMALL, iterations=2)).fit(maps, labels)
    with pytest.raises(DdpmsegError, match="differ from the DDP head's"):
        head.predict_block_maps(maps[0], list(maps[0])[::-1], 32)


def test_fit_head_ddp_then_predict_and_evaluate_on_eyes8(eyes_world, tmp_path):
    from cli_helpers import fails, ok

    d, imgs = eyes_world
    model = tmp_path / "ddp"
    out = ok("fit", "--features", d / "feats.h5", "--masks", imgs, "--head", "ddp", "--head-iterations", 6,
             "--head-batch", 2, "--generations", 2, "--out", model)
    assert "DDP head: 6 steps of 2 crops" in out, out
    record = json.loads((model / "model.json").read_text())["fit"]
    assert record["head"] == "ddp" and record["ddp"]["generations"] == 2 and record["ddp"]["iterations"] == 6
    assert record["n_iter"] == [6]
    preds = tmp_path / "preds"
    ok("predict", imgs / "image_0.jpg", "--model", model, "--out", preds)
    from PIL import Image

    labels = np.asarray(Image.open(preds / "image_0_labels.png"))
    assert labels.shape == np.asarray(Image.open(imgs / "image_0.jpg")).shape[:2]
    assert labels.max() < 4  # eyes8's 4 classes
    for kind in ("overlay", "uncertainty"):
        assert (preds / f"image_0_{kind}.png").is_file()
    result = json.loads(ok("evaluate", imgs, "--model", model, "--masks", imgs, "--json"))
    assert 0 <= result["miou"] <= 1 and result["n_images"] == 3
    # the control: the same decoder without diffusion
    ok("fit", "--features", d / "feats.h5", "--masks", imgs, "--head", "ddp", "--no-head-diffusion",
       "--head-iterations", 2, "--head-batch", 2, "--out", tmp_path / "ctl")
    assert json.loads((tmp_path / "ctl" / "model.json").read_text())["fit"]["ddp"]["diffusion"] is False
    (model / "tensors.pt").write_bytes(b"not a tensor file")
    fails("predict", imgs / "image_0.jpg", "--model", model, "--out", tmp_path / "p2", match="tensors.pt is damaged")
