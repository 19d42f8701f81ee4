"""The shared reverse process (ddpmseg.sampling) and the distill samples written with it: DDIM from pure
noise against a plain DDIM written here, per-sample seeding (batch size, samples already there, resume)
and the refusal of backbones that cannot sample. (Healing with it: test_anomaly.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmseg.backbones import AdmConfig, create_backbone
from ddpmseg.backbones.adm import random_unet
from ddpmseg.demo import make_tiny_checkpoint
from ddpmseg.distill.samples import write_samples
from ddpmseg.errors import DdpmsegError
from ddpmseg.sampling import ReverseProcess, check_can_sample, generate, resolve_ancestral, respaced_steps

pytestmark = pytest.mark.usefixtures("one_thread")
T = 10  # a 10-step cosine schedule (a linear one that short reaches beta 1): full ancestral sampling in seconds


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """The demo's tiny random ADM (64 px, learned sigmas) with a T-step diffusion."""
    ckpt, flags = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    flags.write_text(json.dumps(dict(json.loads(flags.read_text()), diffusion_steps=T, noise_schedule="cosine")))
    return create_backbone(ckpt, flags=flags, device="cpu")


def plain_ddim(backbone, x: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """DDIM, eta 0, from x at steps[0] down through ``steps``, in float64 from the betas and denoise()."""
    abar = torch.cumprod(1 - torch.from_numpy(backbone.betas()), 0)
    x = x.double()
    for k, t in enumerate(steps):
        a = abar[t]
        a_prev = abar[steps[k + 1]] if k + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        eps = backbone.denoise(x.float(), torch.full((len(x),), t))[:, :3].double()  # [:, 3:]: the learned sigmas
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # recomputed from the clipped x0, as guided-diffusion does
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-1, 1).float()


def test_ddim_generate_equals_a_plain_ddim(backbone):
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert respaced_steps(T - 1, 4) == [0, 3, 6, 9]
    state = torch.get_rng_state()
    got = generate(backbone, noise, sample_steps=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert got.shape == (2, 3, 64, 64) and got.abs().max() <= 1
    torch.testing.assert_close(got, plain_ddim(backbone, noise, [9, 6, 3, 0]), rtol=0, atol=1e-4)
    # sample_steps >= T: every step (DDIM unless asked for ancestral; None picks ancestral)
    assert ReverseProcess(backbone, sample_steps=50).timesteps(T - 1) == list(range(T - 1, -1, -1))
    assert resolve_ancestral(backbone, T, None) and not resolve_ancestral(backbone, T - 1, None)
    assert not resolve_ancestral(backbone, T, False)


def test_generate_refuses_bad_arguments(backbone):
    with pytest.raises(DdpmsegError, match=r"noise of shape \(2, 3, 32, 32\) for a 64x64 model"):
        generate(backbone, torch.zeros(2, 3, 32, 32), sample_steps=4)
    with pytest.raises(DdpmsegError, match="--sample-steps 0: give at least 1"):
        generate(backbone, torch.zeros(1, 3, 64, 64), sample_steps=0)
    with pytest.raises(DdpmsegError, match="fp16 is for CUDA"):
        generate(backbone, torch.zeros(1, 3, 64, 64), sample_steps=4, precision="fp16")


def _pixels(paths) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in paths]


def _fake_denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A network that treats each image on its own with the same arithmetic whatever the batch."""
    return torch.cat([torch.tanh(x) * 0.9 + 0.01 * t.view(-1, 1, 1, 1), torch.zeros_like(x)], 1)


def _three_ways(backbone, folder, steps: int) -> list[list[np.ndarray]]:
    """Samples 0..2 drawn in batches of 1, in one batch of 3, and as 1..2 after a run that drew sample 0."""
    alone = write_samples(backbone, folder / "alone", 3, sample_steps=steps, batch_size=1)
    assert [p.name for p in alone] == ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
    together = write_samples(backbone, folder / "together", 3, sample_steps=steps, batch_size=3)
    write_samples(backbone, folder / "later", 1, sample_steps=steps, batch_size=3)
    later = write_samples(backbone, folder / "later", 3, sample_steps=steps, batch_size=3)
    return [_pixels(alone), _pixels(together), _pixels(later)]


@pytest.mark.parametrize("ancestral", [False, True], ids=["ddim", "ancestral"])
def test_a_sample_depends_on_seed_and_index_alone(backbone, tmp_path, monkeypatch, ancestral):
    """Exactly, with a network whose arithmetic is per image (the real one's: the next test)."""
    monkeypatch.setattr(backbone, "denoise", _fake_denoise)
    steps = T if ancestral else 3  # ancestral=None: ancestral exactly when the steps cover all T
    first, *others = _three_ways(backbone, tmp_path, steps)
    assert first[0].shape == (64, 64, 3) and first[0].dtype == np.uint8
    assert not np.array_equal(first[0], first[1])
    for other in others:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)
    seed1 = write_samples(backbone, tmp_path / "seed1", 1, sample_steps=steps, seed=1)
    assert not np.array_equal(_pixels(seed1)[0], first[0])
    if ancestral:
        ddim = write_samples(backbone, tmp_path / "ddim", 1, sample_steps=steps, ancestral=False)
        assert not np.array_equal(_pixels(ddim)[0], first[0])


def test_real_network_samples_agree_across_batch_sizes_to_a_grey_level(backbone, tmp_path):
    """The real network's batched convolutions round differently with the batch size (CPU oneDNN)."""
    first, *others = _three_ways(backbone, tmp_path, 3)
    assert not np.array_equal(first[0], first[1])
    for other in others:
        for a, b in zip(first, other):
            diff = np.abs(a.astype(int) - b)
            assert diff.max() <= 1 and np.count_nonzero(diff) < 0.001 * diff.size


def test_resume_rewrites_only_what_is_missing(backbone, tmp_path):
    paths = write_samples(backbone, tmp_path, 3, sample_steps=2, batch_size=2)
    before = _pixels(paths)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    paths[1].unlink()
    stale = tmp_path / f".{paths[1].name}.abc123.tmp"  # what a writer killed mid-PNG leaves
    stale.write_bytes(b"partial")
    again = write_samples(backbone, tmp_path, 3, sample_steps=2, batch_size=2)
    assert again == paths and not stale.exists()
    assert [p.stat().st_mtime_ns for p in paths[::2]] == mtimes[::2]
    for a, b in zip(before, _pixels(paths)):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == [p.name for p in paths]


def test_write_samples_refuses_bad_arguments_before_any_work(backbone, tmp_path):
    for kwargs, match in ((dict(n=-1), "-1 samples asked for"), (dict(batch_size=0), "--batch-size 0"),
                          (dict(sample_steps=0), "--sample-steps 0"), (dict(seed=-2), "--seed -2")):
        args = dict(n=2, sample_steps=2, batch_size=2) | kwargs
        with pytest.raises(DdpmsegError, match=match):
            write_samples(backbone, tmp_path / "out", args.pop("n"), **args)
    assert not (tmp_path / "out").exists()
    assert write_samples(backbone, tmp_path / "none", 0, sample_steps=2) == []


def test_class_conditional_adm_cannot_sample(tmp_path):
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 num_head_channels=32, learn_sigma=True, class_cond=True)
    torch.save(random_unet(AdmConfig.from_flags(flags), seed=0).state_dict(), tmp_path / "m.pt")
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    b = create_backbone(tmp_path / "m.pt", flags=tmp_path / "flags.json", device="cpu")
    with pytest.raises(DdpmsegError, match="class-conditional, so ddpmseg cannot sample"):
        check_can_sample(b)
    with pytest.raises(DdpmsegError, match="class-conditional"):
        write_samples(b, tmp_path / "out", 2, sample_steps=2)
    assert not (tmp_path / "out").exists()


def test_v_prediction_diffusers_model_cannot_sample(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ddpmseg.backbones.diffusers_unet import random_unet2d

    unet = dict(sample_size=16, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    random_unet2d(unet, seed=0).save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(
        tmp_path / "pipe" / "scheduler")
    b = create_backbone(tmp_path / "pipe", device="cpu")
    with pytest.raises(DdpmsegError, match=r"^this model predicts 'v_prediction', not the noise.*epsilon"):
        check_can_sample(b)
