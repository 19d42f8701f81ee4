"""train-ddpm: guided-diffusion's objective and file layout, the run folder as --ckpt, bad inputs,
exact resume after kill -9 (a real subprocess), and two gloo ranks under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmseg.backbones import AdmConfig, create_backbone
from ddpmseg.backbones.adm import build_diffusion, build_unet
from ddpmseg.train import TrainConfig, train_ddpm
from cli_helpers import fails, ok

pytestmark = pytest.mark.usefixtures("one_thread")
# the tiny ADM of conftest's tiny16_flags: 16 px, two levels, attention at 8, learned sigmas
QUICK = dict(batch_size=4, save_every=4, sample_every=0, log_every=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, eyes8, tiny16_json) -> Path:
    """Eight eyes, 8 steps of batch 4, checkpoints at 4 and 8, a sample grid at the end."""
    out = tmp_path_factory.mktemp("train") / "run"
    ok("train-ddpm", eyes8, "--out", out, "--model-flags", tiny16_json, "--steps", 8, "--batch-size", 4,
       "--save-every", 4, "--sample-every", 8, "--samples", 4, "--sample-steps", 4, "--log-every", 2, "--device", "cpu")
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_the_run_folder_has_guided_diffusions_files(run, tiny16_flags):
    names = sorted(p.name for p in run.iterdir())
    for step in ("000004", "000008"):
        assert {f"model{step}.pt", f"ema_0.9999_{step}.pt", f"opt{step}.pt"} <= set(names)
    assert {"flags.json", "train.json", "log.jsonl", "loss.png", "samples_000008.png"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    config = AdmConfig.from_json(run / "flags.json")
    assert config == AdmConfig.from_flags(tiny16_flags)
    # plain state dicts of guided-diffusion's own UNetModel: they load into it
    model = build_unet(config)
    model.load_state_dict(_state(run / "model000008.pt"))
    assert _state(run / "opt000008.pt").keys() == {"state", "param_groups"}
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and all(r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    grid = np.asarray(Image.open(run / "samples_000008.png"))
    # 4 samples of 16 px enlarged 8x (nearest) to a grid >= 256 px wide, 2 px apart, under a "step 8, EMA ..." header
    assert grid.shape[1] == 2 + 2 * (8 * 16 + 2) and grid.shape[0] > grid.shape[1]
    cell = grid[-2 - 128 : -2, 2 : 2 + 128]
    assert np.array_equal(cell, cell[::8, ::8].repeat(8, 0).repeat(8, 1))


def test_ckpt_run_folder_loads_the_newest_ema_on_every_command(run, tmp_path, eyes8):
    backbone = create_backbone(run, device="cpu")
    assert backbone.checkpoint.name == "ema_0.9999_000008.pt"
    ema = _state(run / "ema_0.9999_000008.pt")
    assert all(torch.equal(v, ema[k]) for k, v in backbone.model.state_dict().items())
    assert len(ok("blocks", "--ckpt", run).splitlines()) == 1 + 4  # two levels of 1 + 1 blocks
    out = ok("extract", eyes8 / "image_0.jpg", eyes8 / "image_1.jpg", "--ckpt", run, "--out", tmp_path / "f.h5")
    assert "2 new" in out
    from ddpmseg.features.cache import FeatureCache

    with FeatureCache(tmp_path / "f.h5") as cache:  # --blocks auto: the paper's depths of a 4-block decoder
        assert cache.blocks == [1, 2] and cache.record.checkpoint.name == "ema_0.9999_000008.pt"
    ok("fit", "--features", tmp_path / "f.h5", "--masks", eyes8, "--ensemble", 2, "--max-epochs", 1, "--out", tmp_path / "m")
    ok("predict", eyes8 / "image_2.jpg", "--model", tmp_path / "m", "--out", tmp_path / "p")
    ok("kmeans", eyes8 / "image_2.jpg", "--ckpt", run, "--k", 2, "--out", tmp_path / "k.png")
    assert (tmp_path / "p" / "image_2_labels.png").is_file() and (tmp_path / "k.png").is_file()


def test_training_lowers_guided_diffusions_loss(tmp_path, eyes8, tiny16_flags, tiny16_json):
    """The objective is GaussianDiffusion.training_losses: on fixed images, t and noise it drops."""
    config = AdmConfig.from_flags(tiny16_flags)
    diffusion = build_diffusion(config)
    from ddpmseg.train.data import TrainImages

    x0 = TrainImages(sorted(eyes8.glob("image_*.jpg"))[:4], 16, 4, seed=0, flip=False)[0]
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(x0.shape, generator=g)

    def loss_of(path: Path) -> float:
        model = build_unet(config)
        model.load_state_dict(_state(path))
        with torch.no_grad():
            return float(diffusion.training_losses(model, x0, t, noise=noise)["loss"].mean())

    train_ddpm([eyes8], tmp_path / "r", TrainConfig(steps=40, lr=2e-3, save_every=1, **{k: v for k, v in QUICK.items() if k != "save_every"}),
               model_flags=tiny16_json, device="cpu")
    assert loss_of(tmp_path / "r" / "model000040.pt") < 0.7 * loss_of(tmp_path / "r" / "model000001.pt")


def test_init_fine_tunes_the_given_weights(tmp_path, eyes8, run):
    train_ddpm([eyes8], tmp_path / "ft", TrainConfig(steps=1, lr=1e-9, **QUICK), init=run / "model000008.pt", device="cpu")
    before, after = _state(run / "model000008.pt"), _state(tmp_path / "ft" / "model000001.pt")
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)  # started there (and barely moved)
    assert json.loads((tmp_path / "ft" / "train.json").read_text())["init"] == str((run / "model000008.pt").resolve())


def test_a_fine_tune_killed_before_its_first_save_resumes_from_the_init_weights(tmp_path, eyes8, run):
    ft = tmp_path / "ft"
    train_ddpm([eyes8], ft, TrainConfig(steps=1, lr=1e-9, **QUICK), init=run / "model000008.pt", device="cpu")
    for f in ft.glob("*000001.pt"):  # as if killed before the first save: flags.json and train.json only
        f.unlink()
    train_ddpm([eyes8], ft, None, resume=True, device="cpu")
    before, after = _state(run / "model000008.pt"), _state(ft / "model000001.pt")
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)  # not from random weights


def test_bad_inputs_fail_before_training(tmp_path, eyes8, tiny16_json):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails("train-ddpm", empty, "--out", tmp_path / "a", "--image-size", 32, match=("no images found", str(empty)))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(eyes8 / "image_0.jpg", broken)
    (broken / "bad.png").write_bytes(b"not an image")
    fails("train-ddpm", broken, "--out", tmp_path / "b", "--image-size", 32, match=("bad.png",))
    fails("train-ddpm", eyes8, "--out", tmp_path / "c", match=("give the architecture", "--image-size S"))
    fails("train-ddpm", eyes8, "--out", tmp_path / "d", "--image-size", 48, match=("--image-size 48", "32, 64, 128, 256"))
    fails("train-ddpm", eyes8, "--out", tmp_path / "e", "--preset", "ddpm_cifar10_32", match=("diffusers",))
    assert not any((tmp_path / n).exists() for n in "abcde")
    fails("train-ddpm", eyes8, "--out", tmp_path / "f", "--resume", match=("--resume", "not a training run"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    fails("train-ddpm", eyes8, "--out", tmp_path / "g", "--model-flags", tiny16_json, match=("not empty",))
    assert (tmp_path / "g" / "notes.txt").read_text() == "mine"


def test_the_loss_aware_sampler_trains_and_resumes(tmp_path, eyes8, tiny16_json):
    config = TrainConfig(steps=6, schedule_sampler="loss-second-moment", **QUICK)
    train_ddpm([eyes8], tmp_path / "r", config, model_flags=tiny16_json, device="cpu")
    assert (tmp_path / "r" / "sampler000004.pt").is_file()
    train_ddpm([eyes8], tmp_path / "r", resume=True, steps=8, device="cpu")
    history = _state(tmp_path / "r" / "sampler000008.pt")["counts"]
    assert int(history.sum()) == 8 * 4  # every sample's loss went into its timestep's history


def test_resume_accepts_the_runs_own_settings_repeated(tmp_path, eyes8, tiny16_json):
    """Up-arrow and add --resume: the run's settings given again are fine, --steps raises the count."""
    out = tmp_path / "r"
    args = ["train-ddpm", eyes8, "--out", out, "--model-flags", tiny16_json, "--batch-size", 4, "--lr", "2e-4",
            "--no-flip", "--samples", 4, "--save-every", 2, "--sample-every", 0, "--log-every", 2, "--device", "cpu"]
    ok(*args, "--steps", 2)
    assert "resumed at step 2" in ok(*args, "--steps", 4, "--resume")
    assert "step 4" in ok(*args, "--steps", 4, "--resume")  # nothing left to train: fine as well
    assert "resumed at step 4" in ok(*args, "--steps", 6, "--save-every", 3, "--log-every", 1, "--resume")
    saved = TrainConfig.from_json(out / "train.json")
    assert (saved.steps, saved.save_every, saved.lr, saved.flip) == (6, 3, 2e-4, False)  # what may change, changed
    # the Python API: the same settings (a whole TrainConfig) and architecture again
    s = train_ddpm([eyes8], out, dataclasses.replace(saved, steps=8), model_flags=tiny16_json, resume=True, device="cpu")
    assert (s.resumed_from, s.step) == (6, 8)


def test_resume_refuses_settings_that_differ_naming_each(tmp_path, eyes8, tiny16_flags, tiny16_json):
    out = tmp_path / "r"
    args = ["train-ddpm", eyes8, "--out", out, "--batch-size", 4, "--save-every", 2, "--sample-every", 0, "--device", "cpu"]
    ok(*args, "--model-flags", tiny16_json, "--steps", 2, "--lr", "1e-4", "--samples", 4)
    before = sorted(p.name for p in out.iterdir())
    train_json = out / "train.json"
    err = fails(*args, "--model-flags", tiny16_json, "--steps", 4, "--lr", "2e-4", "--samples", 8, "--no-flip", "--resume",
                match=(f"--lr 0.0002 differs from the run's 0.0001 ({train_json})",
                       f"--samples 8 differs from the run's 4 ({train_json})",  # the option, not the field's name
                       "--no-flip differs from the run's --flip", "only --steps"))
    assert "--batch-size" not in err and "--model-flags" not in err and "--n-samples" not in err  # the same: not named
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**tiny16_flags, "num_channels": 64}))
    fails(*args, "--model-flags", other, "--resume",
          match=(f"--model-flags {other} differs from the run's architecture", "num_channels 64 (the run's 32)"))
    fails(*args, "--image-size", 32, "--resume", match=(f"--image-size 32 differs from the run's 16 ({out / 'flags.json'})",))
    fails(*args, "--init", tiny16_json, "--resume", match=("--init", "differs from the run's none (trained from scratch)"))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing trained, nothing written


def _cli(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpmseg.cli.main", "-q", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, eyes8, tiny16_json):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # bit-identical floats need the same thread count
    args = ["train-ddpm", eyes8, "--model-flags", tiny16_json, "--steps", 24, "--batch-size", 2, "--save-every", 4,
            "--sample-every", 0, "--dropout", 0.1, "--device", "cpu"]
    whole = _cli([*args, "--out", tmp_path / "whole"], env)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    killed = _cli([*args, "--out", tmp_path / "killed"], env)
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None and not (tmp_path / "killed" / "opt000012.pt").exists():
        time.sleep(0.01)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    from ddpmseg.backbones import runs

    done = runs.saved_steps(tmp_path / "killed")
    assert 12 <= done[-1] < 24
    resumed = _cli(["train-ddpm", eyes8, "--out", tmp_path / "killed", "--resume", "--device", "cpu"], env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed at step {done[-1]}" in out
    for name in ("model000024.pt", "ema_0.9999_000024.pt"):
        a, b = _state(tmp_path / "whole" / name), _state(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)) and rows[-1] == 24  # no step logged twice


def test_two_gloo_ranks_match_one_process_with_the_whole_batch(tmp_path, eyes8, tiny16_flags, tiny16_json):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    args = ["train-ddpm", eyes8, "--model-flags", tiny16_json, "--steps", 4, "--batch-size", 4, "--save-every", 4,
            "--sample-every", 0, "--device", "cpu"]
    one = _cli([*args, "--out", tmp_path / "one"], env)
    assert one.wait(timeout=300) == 0, one.stderr.read()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "ddpmseg.cli.main", "-q", *map(str, args), "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _state(tmp_path / "one" / "model000004.pt"), _state(tmp_path / "two" / "model000004.pt")
    torch.manual_seed(0)  # the run's seeded initialisation: training moved the weights away from it
    init = build_unet(AdmConfig.from_flags(tiny16_flags)).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4
    for k in a:  # the same samples, gradients averaged over the ranks: equal up to float summation order
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
