"""The DDP head: its schedule and sampler against DDP's formulas written out plainly, that it learns,
is seeded, saves and loads, and runs end to end through fit / predict / evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from ddpmseg.errors import DdpmsegError
from ddpmseg.heads import ImageMaps, NotFittedError
from ddpmseg.heads.ddp import DDPConfig, DDPHead, alpha_sigma, log_snr, resized_features, time_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(width=32, depth=2, iterations=150, batch_size=4, crop=16, lr=3e-3)


def _fit(maps, labels, random_state=0, **settings) -> DDPHead:
    return DDPHead(3, **{**SMALL, **settings}, random_state=random_state).fit(ImageMaps(maps, tuple(maps[0]), 32), labels)


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
    head = _fit(maps[:6], labels[:6], diffusion=diffusion)
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
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = _fit(maps, labels, 7, iterations=5)
    assert torch.equal(torch.rand(1), before)  # fit drew nothing from the global generator
    b = _fit(maps, labels, 7, iterations=5)
    c = _fit(maps, labels, 8, iterations=5)
    sa, sb, sc = a.module_.state_dict(), b.module_.state_dict(), c.module_.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["proj.weight"], sc["proj.weight"])


def _a_s(t: float) -> tuple[float, float]:
    """DDP's alpha and sigma at time t, from its cosine log-SNR, in plain floats."""
    snr = -math.log(max(math.cos((t + 0.0002) / 1.00025 * math.pi / 2) ** -2 - 1, 1e-5))
    return math.sqrt(1 / (1 + math.exp(-snr))), math.sqrt(1 / (1 + math.exp(snr)))


def _plain_decoder(m, feat: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """The decoder's forward written out from its parameters with torch.nn.functional (not its forward):
    1x1 fuse, learned-sinusoidal time MLP of the log-SNR, residual GN-SiLU-conv blocks with FiLM, GN-SiLU-1x1 out."""
    p = dict(m.named_parameters())
    groups = m.proj_norm.num_groups
    h = F.conv2d(torch.cat([feat, x_t], 1), p["fuse.weight"], p["fuse.bias"])
    # DDP's log-SNR in float32, as DDP computes it (near t = 1 the cosine's float32 rounding matters)
    tt = torch.tensor([t], dtype=torch.float32)
    snr = -torch.log((torch.cos((tt + 0.0002) / 1.00025 * math.pi * 0.5) ** -2 - 1).clamp(min=1e-5))
    freq = snr * p["time_mlp.0.weights"] * 2 * math.pi
    temb = torch.cat([snr, freq.sin(), freq.cos()])[None].expand(len(feat), -1)
    temb = F.linear(F.gelu(F.linear(temb, p["time_mlp.1.weight"], p["time_mlp.1.bias"])), p["time_mlp.3.weight"],
                    p["time_mlp.3.bias"])
    for i in range(len(m.blocks)):
        q = lambda name: p[f"blocks.{i}.{name}"]  # noqa: E731
        r = F.conv2d(F.silu(F.group_norm(h, groups, q("norm1.weight"), q("norm1.bias"))), q("conv1.weight"),
                     q("conv1.bias"), padding=1)
        scale, shift = F.linear(F.silu(temb), q("film.1.weight"), q("film.1.bias"))[:, :, None, None].chunk(2, 1)
        r = F.group_norm(r, groups, q("norm2.weight"), q("norm2.bias")) * (1 + scale) + shift
        h = h + F.conv2d(F.silu(r), q("conv2.weight"), q("conv2.bias"), padding=1)
    h = F.silu(F.group_norm(h, groups, p["out.0.weight"], p["out.0.bias"]))
    return F.conv2d(h, p["out.2.weight"], p["out.2.bias"])


def _plain_ddim(head: DDPHead, maps, steps: int, gens: int, seed: int) -> list[torch.Tensor]:
    """DDP's ddim_sample written out step by step with scalar schedule values, the decoder and the label
    embedding computed from the fitted parameters (none of the head's own methods)."""
    m = head.module_
    p = dict(m.named_parameters())
    r = head.resolution_
    x = torch.cat([F.interpolate(torch.as_tensor(maps[k]).float()[None], size=(r, r), mode="bilinear",
                                 align_corners=False, antialias=maps[k].shape[-1] > r)[0] for k in head.keys_])
    x = (x - m.mean[:, None, None]) / m.std[:, None, None]
    feat = F.silu(F.group_norm(F.conv2d(x[None], p["proj.weight"], p["proj.bias"]), m.proj_norm.num_groups,
                               p["proj_norm.weight"], p["proj_norm.bias"])).repeat(gens, 1, 1, 1)
    x_t = torch.randn(feat.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(steps):
        t_now, t_next = 1 - i / steps, max(1 - (i + 2) / steps, 0.0)
        logits = _plain_decoder(m, feat, x_t, t_now)
        out.append(logits.softmax(1))
        emb = p["embed.weight"][logits.argmax(1)].permute(0, 3, 1, 2)  # the label's row of the embedding table
        x0 = (torch.sigmoid(emb) * 2 - 1) * head.bit_scale
        (a, s), (an, sn) = _a_s(t_now), _a_s(t_next)
        eps = (x_t - a * x0) / max(s, 1e-8)
        x_t = an * x0 + sn * eps
    return out


def test_sampling_equals_ddps_ddim_loop_written_plainly():
    maps, labels = _world(3)
    head = _fit(maps, labels, 1, iterations=30)
    for steps, gens in [(1, 1), (3, 2), (10, 1)]:
        got = head.sample(maps[0], steps=steps, generations=gens, seed=5)
        with torch.no_grad():
            expect = torch.stack(_plain_ddim(head, maps[0], steps, gens, 5))
        assert got.shape == (steps, gens, 3, 32, 32)
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_generations_differ_and_their_spread_is_the_uncertainty():
    maps, labels = _world(3)
    head = _fit(maps, labels, 1, iterations=20, generations=4)
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
    head = _fit(maps, labels, 2, iterations=10, steps=2, generations=2)
    state = head.state_dict()
    assert "config" not in state and "steps" not in state  # the settings live in model.json only
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = DDPHead.from_state_dict(state, **head.get_params())
    keys = list(maps[0])
    a, b = head.predict_block_maps(maps[1], keys, 32), again.predict_block_maps(maps[1], keys, 32)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.uncertainty, b.uncertainty)
    # the inference settings come from the params given: one DDIM step is another prediction
    one = DDPHead.from_state_dict(state, **{**head.get_params(), "steps": 1}).sample(maps[1])
    assert one.shape[0] == 1 and head.sample(maps[1]).shape[0] == 2
    with pytest.raises(DdpmsegError, match="holds no settings"):
        DDPHead.from_state_dict(state)


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
    with pytest.raises(DdpmsegError, match=r"^ddp head: steps 0 must be at least 1$"):
        DDPConfig(steps=0)
    maps, labels = _world(2)
    with pytest.raises(DdpmsegError, match=r"working resolution 24 must divide the model grid 32"):
        _fit(maps, labels, resolution=24)
    with pytest.raises(DdpmsegError, match=r"steps 0 must be at least 1"):
        _fit(maps, labels, steps=0)  # fit validates the keywords (scikit-learn: __init__ only stores them)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        DDPHead(3).predict_block_maps(maps[0], list(maps[0]), 32)
    with pytest.raises(DdpmsegError, match="must be an ImageMaps"):
        DDPHead(3, **SMALL).fit(maps, labels)
    head = _fit(maps, labels, iterations=2)
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
    assert record["head"] == "ddp" and record["head_config"]["generations"] == 2
    assert record["head_config"]["iterations"] == 6 and record["n_iter"] == [6]
    preds = tmp_path / "preds"
    ok("predict", imgs / "image_0.jpg", "--model", model, "--out", preds)
    from PIL import Image

    labels = np.asarray(Image.open(preds / "image_0_labels.png"))
    assert labels.shape == np.asarray(Image.open(imgs / "image_0.jpg")).shape[:2]
    assert labels.max() < 4  # eyes8's 4 classes
    for kind in ("overlay", "uncertainty"):
        assert (preds / f"image_0_{kind}.png").is_file()
    result = json.loads(ok("evaluate", imgs, "--model", model, "--masks", imgs, "--json"))
    assert result["n_images"] == 3 and list(result["per_class"]) == ["class_0", "class_1", "class_2", "class_3"]
    assert result["miou"] == pytest.approx(np.mean(list(result["per_class"].values())))
    # the control: the same decoder without diffusion
    ok("fit", "--features", d / "feats.h5", "--masks", imgs, "--head", "ddp", "--head-option", "diffusion=false",
       "--head-option", "iterations=2", "--head-option", "batch_size=2", "--out", tmp_path / "ctl")
    assert json.loads((tmp_path / "ctl" / "model.json").read_text())["fit"]["head_config"]["diffusion"] is False
    (model / "tensors.pt").write_bytes(b"not a tensor file")
    fails("predict", imgs / "image_0.jpg", "--model", model, "--out", tmp_path / "p2", match="tensors.pt is damaged")
