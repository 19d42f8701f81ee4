"""Ctrl-C of every long command: exit 130 and ONE line that says what is true (what this run finished,
what is kept, the command that goes on), checked against the files left behind. Each command runs for
real in this process until a library call it makes raises KeyboardInterrupt (as Ctrl-C does), after
some of its output is written. Also: the messages that named options a command does not take (issue 23.3).
(tests/test_catalogue.py sends a real SIGINT to extract in a subprocess.)"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli, fails, ok
from ddpmseg.features.cache import FeatureCache, FeatureWriter, parts_dir

pytestmark = pytest.mark.usefixtures("one_thread")

FIT = ("--ensemble", "2", "--max-epochs", "1")


def interrupt_on_call(monkeypatch, owner, name: str, n: int) -> list:
    """Make ``owner.name`` raise KeyboardInterrupt on its n-th call (from 1); earlier calls run for real."""
    real = getattr(owner, name)
    calls: list = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) >= n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def interrupted(*args) -> str:
    """Run a command that Ctrl-C stops: exit 130 and one 'ddpmseg: interrupted; ...' line, no traceback."""
    r = cli(*args)
    err = r.stderr.strip()
    assert r.exit_code == 130, (r.exit_code, r.output)
    assert len(err.splitlines()) == 1 and err.startswith("ddpmseg: interrupted; "), err
    assert "Traceback" not in r.output
    return err


@pytest.fixture
def three(tmp_path, eyes8) -> Path:
    d = tmp_path / "three"
    d.mkdir()
    for i in range(3):
        shutil.copy(eyes8 / f"image_{i}.jpg", d)
    return d


# -- extract / merge ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["feats.h5", "cache_folder"])
def test_extract_says_how_many_images_this_run_kept(tmp_path, tiny_ckpt, three, monkeypatch, name):
    out = tmp_path / name
    args = ["extract", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--images", three, "--out", out]
    interrupt_on_call(monkeypatch, FeatureWriter, "add", 1)  # before the first image is written
    err = interrupted(*args)
    assert f"no image finished, so nothing was added to {out}; run the same command again" in err
    assert "kept" not in err  # 0.2 said "finished images are kept" here
    assert not out.exists() and not parts_dir(out).exists()
    monkeypatch.undo()
    interrupt_on_call(monkeypatch, FeatureWriter, "add", 3)  # two images written, the third interrupted
    err = interrupted(*args)
    assert f"the cache {out} keeps the 2 images this run finished (2 in all); run the same command again" in err
    with FeatureCache(out) as cache:
        assert len(cache) == 2
    monkeypatch.undo()
    interrupt_on_call(monkeypatch, FeatureWriter, "add", 1)  # the third again: nothing new, two from before
    err = interrupted(*args)
    assert f"no image finished, so nothing was added to {out} (it holds the 2 images cached before)" in err
    monkeypatch.undo()
    assert "1 new, 2 already cached, 3 in" in ok(*args)  # "the same command again" finishes it


def test_merge_says_how_many_images_it_merged(eyes_world, tmp_path, monkeypatch):
    d, _ = eyes_world
    out = tmp_path / "merged.h5"
    interrupt_on_call(monkeypatch, FeatureWriter, "add", 2)
    err = interrupted("merge", d / "feats.h5", "--out", out)
    assert f"the 1 image merged so far is kept in {out} (1 in all); run the same command again to merge the rest" in err
    with FeatureCache(out) as cache:
        assert len(cache) == 1
    monkeypatch.undo()
    assert "2 images added, 1 already in" in ok("merge", d / "feats.h5", "--out", out)


# -- predict / anomaly: --skip-done finishes the rest -----------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_points_to_skip_done(eyes_world, tmp_path, monkeypatch, overwrite):
    from ddpmseg.workers import Segmenter

    d, imgs = eyes_world
    out = tmp_path / "preds"
    args = ["predict", imgs, "--model", d / "model", "--out", out, *(["--overwrite"] if overwrite else [])]
    interrupt_on_call(monkeypatch, Segmenter, "write_outputs", 2)
    err = interrupted(*args)
    instead = " (in place of --overwrite)" if overwrite else ""
    assert err.endswith(f"the PNGs of the 1 image this run finished are kept in {out}; "
                        f"rerun with --skip-done to finish the rest{instead}"), err
    assert sorted(p.name for p in out.glob("*_labels.png")) == ["image_0_labels.png"]
    monkeypatch.undo()
    said = ok("predict", imgs, "--model", d / "model", "--out", out, "--skip-done")
    assert "predict: 2 images" in said and "1 image done before, left out" in said
    assert len(list(out.glob("*_labels.png"))) == 3


def test_predict_interrupted_before_any_image(eyes_world, tmp_path, monkeypatch):
    from ddpmseg.workers import Segmenter

    d, imgs = eyes_world
    interrupt_on_call(monkeypatch, Segmenter, "write_outputs", 1)
    err = interrupted("predict", imgs, "--model", d / "model", "--out", tmp_path / "p")
    assert err.endswith("no image finished; rerun with --skip-done to finish the rest"), err
    assert not list((tmp_path / "p").glob("*.png")) if (tmp_path / "p").exists() else True


def test_anomaly_skip_done_finishes_an_interrupted_run(tiny_ckpt, three, tmp_path, monkeypatch):
    from ddpmseg.anomaly import detect

    out = tmp_path / "maps"
    args = ["anomaly", three, "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--out", out, "--method", "heal",
            "--start-steps", 20, "--sample-steps", 2, "--batch-size", 1, "--device", "cpu"]
    interrupt_on_call(monkeypatch, detect, "_write_outputs", 2)
    err = interrupted(*args)
    assert err.endswith(f"the outputs and scores.csv rows of the 1 image this run finished are kept in {out}; "
                        "rerun with --skip-done to finish the rest"), err
    assert sorted(p.name for p in out.glob("*_healed.png")) == ["image_0_healed.png"]
    with (out / "scores.csv").open(newline="") as f:
        assert "image_0" in {r["image"] for r in csv.DictReader(f)}
    monkeypatch.undo()
    fails(*args, match="would replace")  # what the same command without --skip-done says
    said = ok(*args, "--skip-done")
    assert "anomaly: 2 images" in said and "1 image done before, left out" in said
    for i in range(3):
        assert (out / f"image_{i}_anomaly.png").is_file() and (out / f"image_{i}_healed.png").is_file()
    with (out / "scores.csv").open(newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["image_0", "image_1", "image_2"]
    assert "anomaly: 0 images" in ok(*args, "--skip-done")  # every image done: nothing to redo


def test_anomaly_knn_interrupted_counts_its_finished_images(tiny_ckpt, three, tmp_path, monkeypatch):
    """knn (the default) writes no healed picture: its finished images are counted by their maps."""
    from ddpmseg.anomaly import detect

    out = tmp_path / "maps"
    interrupt_on_call(monkeypatch, detect, "_write_outputs", 2)
    err = interrupted("anomaly", three, "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--out", out,
                      "--normal", three, "--batch-size", 1, "--device", "cpu")
    assert err.endswith(f"the outputs and scores.csv rows of the 1 image this run finished are kept in {out}; "
                        "rerun with --skip-done to finish the rest"), err


# -- train-ddpm --------------------------------------------------------------------------------------
def _train_args(eyes8, out, flags) -> list:
    return ["train-ddpm", eyes8, "--out", out, "--model-flags", flags, "--steps", 4, "--batch-size", 2,
            "--save-every", 2, "--sample-every", 0, "--log-every", 1, "--device", "cpu"]


def test_train_ddpm_with_a_checkpoint_says_resume(eyes8, tiny16_json, tmp_path, monkeypatch):
    from ddpmseg.train import loop

    out = tmp_path / "run"
    args = _train_args(eyes8, out, tiny16_json)
    interrupt_on_call(monkeypatch, loop._Trainer, "step", 4)  # steps 1-3 trained, step 2 saved
    err = interrupted(*args)
    assert err.endswith(f"the checkpoint of step 2 is kept in {out}; continue with the same command and --resume"), err
    monkeypatch.undo()
    said = ok(*args, "--resume")  # the advice works
    assert "step 4 (resumed at step 2)" in said


def test_train_ddpm_without_a_checkpoint_says_it_starts_over(eyes8, tiny16_json, tmp_path, monkeypatch):
    from ddpmseg.train import loop

    out = tmp_path / "run"
    args = _train_args(eyes8, out, tiny16_json)
    interrupt_on_call(monkeypatch, loop._Trainer, "step", 2)  # one step trained, nothing saved
    err = interrupted(*args)
    assert "kept" not in err.replace("nothing is kept", "")  # 0.2: "the checkpoints saved so far are kept"
    assert err.endswith("no checkpoint was saved yet (the first comes at step 2), so nothing is kept to continue "
                        "from; rerunning starts over from step 0: the same command with --resume (it reuses the "
                        "folder), or use a new --out"), err
    monkeypatch.undo()
    fails(*args, match="not empty")  # why the plain command is not the advice
    said = ok(*args, "--resume")
    assert "step 4," in said and "resumed" not in said  # it started over


def test_train_ddpm_messages_name_the_options_it_takes(eyes8, tiny16_json, tmp_path):
    out = tmp_path / "run"
    ok(*_train_args(eyes8, out, tiny16_json)[:-2], "--steps", 2)  # a finished run (its --samples: 16)
    err = fails("train-ddpm", eyes8, "--out", out, "--resume", "--samples", 3, "--device", "cpu", match="--samples 3")
    assert "--n-samples" not in err  # 0.2: "leave out --n-samples", an option train-ddpm does not have
    fails("train-ddpm", eyes8, "--out", tmp_path / "new", "--model-flags", tiny16_json, "--log-every", 0,
          match="--log-every must be at least 1, got 0")  # 0.2: "log_every must ..."


# -- download ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("written", [0, 1000])
def test_download_says_whether_a_partial_file_is_kept(tmp_path, monkeypatch, written):
    from ddpmseg.backbones import download as dl, get_preset

    def partial(url, dest, **kwargs):
        if written:
            Path(f"{dest}.part").write_bytes(b"x" * written)
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "download", partial)
    err = interrupted("download", "ffhq_256", "--dir", tmp_path, "--url", "http://127.0.0.1:9/ffhq.pt")
    part = tmp_path / f"{get_preset('ffhq_256').filename}.part"
    if written:
        assert err.endswith(f"the partial download is kept ({part}, 1,000 bytes); run the same command again "
                            "to resume"), err
    else:
        assert err.endswith("nothing was downloaded yet; run the same command again"), err  # 0.2: "... is kept"
        assert not part.exists()


# -- commands that write at their end ----------------------------------------------------------------
def test_fit_writes_no_model(eyes_world, tmp_path, monkeypatch):
    from ddpmseg.heads.mlp import PixelEnsemble

    d, imgs = eyes_world
    out = tmp_path / "model"
    calls = interrupt_on_call(monkeypatch, PixelEnsemble, "fit", 1)
    err = interrupted("fit", "--features", d / "feats.h5", "--masks", imgs, *FIT, "--out", out)
    assert calls and err.endswith("no model was written (fit does not resume); run it again to start over"), err
    assert not (out / "model.json").exists() and not (out / "tensors.pt").exists()


def test_evaluate_and_suggest_write_nothing(eyes_world, eyes8, tmp_path, monkeypatch):
    from ddpmseg.workers import Segmenter

    d, imgs = eyes_world
    interrupt_on_call(monkeypatch, Segmenter, "analyse", 2)
    err = interrupted("evaluate", imgs, "--model", d / "model", "--masks", imgs, "--out", tmp_path / "figs")
    assert err.endswith("nothing was written (the figures of --out come at the end); run it again"), err
    assert not (tmp_path / "figs").exists() or not list((tmp_path / "figs").iterdir())
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in (4, 5, 6):
        shutil.copy(eyes8 / f"image_{i}.jpg", pool)
    err = interrupted("suggest", "--model", d / "model", pool, "--out", tmp_path / "s", "--n", 2)
    assert err.endswith("nothing was written (suggest.csv and suggest.png come at the end); run it again"), err
    assert not (tmp_path / "s" / "suggest.csv").exists() and not (tmp_path / "s" / "suggest.png").exists()


def test_kmeans_leaves_an_older_grid_untouched(tiny_ckpt, eyes8, tmp_path, monkeypatch):
    from ddpmseg.backbones.adm import AdmBackbone

    out = tmp_path / "k.png"
    out.write_bytes(b"an older grid")
    interrupt_on_call(monkeypatch, AdmBackbone, "forward_intermediates", 1)
    err = interrupted("kmeans", eyes8 / "image_0.jpg", "--ckpt", tiny_ckpt[0], "--model-flags", tiny_ckpt[1],
                      "--k", 2, "--steps", 50, "--blocks", 6, "--out", out, "--overwrite")
    assert err.endswith("nothing was written (the grid PNG comes at the end); run it again"), err
    assert out.read_bytes() == b"an older grid"


def test_convert_and_demo(tmp_path, monkeypatch, tiny_ckpt):
    pytest.importorskip("diffusers")
    from ddpmseg import demo
    from ddpmseg.backbones import convert

    monkeypatch.setattr(convert, "convert_adm_to_diffusers", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    err = interrupted("convert", tiny_ckpt[0], "--model-flags", tiny_ckpt[1], "--out", tmp_path / "pipe")
    assert err.endswith("nothing was written (the folder appears only when complete); run it again"), err

    def half_a_demo(directory, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "feats.h5").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", half_a_demo)
    err = interrupted("demo", "--dir", tmp_path / "demo")
    assert err.endswith(f"{tmp_path / 'demo'} holds the demo's steps that finished; run it again (it rewrites the "
                        "folder)"), err


# -- messages that named options the command does not take ---------------------------------------
@pytest.mark.parametrize("args, option, hint", [
    (["predict", "x.jpg", "--threads", "1"], "--threads", "ddpmseg --threads 1 predict ..."),
    (["predict", "--threads=3", "x.jpg"], "--threads", "ddpmseg --threads 3 predict ..."),
    (["fit", "-q"], "-q", "ddpmseg -q fit ..."),
    (["extract", "--debug"], "--debug", "ddpmseg --debug extract ..."),
])
def test_a_global_option_after_the_command_says_where_it_goes(args, option, hint):
    from click.testing import CliRunner

    from ddpmseg.cli.main import main

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert f"No such option '{option}'; global options go before the command: {hint}" in r.output


def test_an_unknown_option_that_is_not_global_gets_no_such_hint():
    from click.testing import CliRunner

    from ddpmseg.cli.main import main

    r = CliRunner().invoke(main, ["predict", "x.jpg", "--thread", "1"])
    assert r.exit_code == 2 and "No such option '--thread'" in r.output and "global options" not in r.output


def test_evaluate_advises_what_evaluate_can_do_about_a_bad_mask(eyes_world, tmp_path):
    d, imgs = eyes_world
    test = tmp_path / "test"
    test.mkdir()
    shutil.copy(imgs / "image_0.jpg", test)
    mask = np.load(imgs / "image_mask0.npy")
    mask[:8, :8] = 7  # a label the model's 4 classes do not have
    np.save(test / "image_0.npy", mask)
    err = fails("evaluate", test, "--model", d / "model", "--masks", test, match=("7", "fitted with"))
    assert "use --classes" not in err  # 0.2 advised an option evaluate does not take
