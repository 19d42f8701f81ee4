"""ddpmseg distill: pseudo-labels, the filter, the student's training and its model folder."""

from __future__ import annotations

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

from cli_helpers import fails, ok
from ddpmseg import data
from ddpmseg.distill.config import StudentTrainConfig
from ddpmseg.distill.pseudo import PseudoLabel, filter_uncertain
from ddpmseg.distill.train import augment, train_student

pytest.importorskip("monai")


def _tiny(**kw) -> list[str]:
    """CLI options of a student trained in a blink."""
    opts = {"--epochs": 2, "--epoch-images": 8, "--batch-size": 4, "--size": 32, **kw}
    return [str(v) for kv in opts.items() for v in kv]


@pytest.fixture(scope="module")
def world(tmp_path_factory, eyes_world, eyes8, one_thread):
    """The eyes teacher (3 labelled eyes), 3 unlabelled eyes, and a student distilled from them by the CLI."""
    d, imgs = eyes_world
    work = tmp_path_factory.mktemp("distill")
    unl = work / "unlabelled"
    unl.mkdir()
    for i in (3, 4, 5):
        shutil.copy(eyes8 / f"image_{i}.jpg", unl)
    out = work / "student"
    ok("distill", imgs, unl, "--model", d / "model", "--out", out, "--drop-uncertain", "0.34", *_tiny())
    return d, imgs, unl, out


def test_student_folder_records_teacher_sources_filter_and_training(world):
    d, imgs, unl, out = world
    rec = json.loads((out / "model.json").read_text())
    assert rec["format"] == "ddpmseg-student"
    assert rec["teacher"]["folder"] == str((d / "model").resolve())
    assert rec["sources"]["labelled"] == ["image_0", "image_1", "image_2"]  # the teacher's own training images
    assert rec["filter"]["pseudo_labelled"] == 3
    # 0.34 of 3 rounds to 1: the most uncertain of the three is dropped, by the recorded scores
    scores = {p.stem: json.loads(p.read_text())["uncertainty"] for p in (out / "pseudo").glob("*.json")}
    assert rec["filter"]["dropped_uncertain"] == [max(scores, key=scores.get)]
    assert rec["filter"]["kept"] == 2
    kept = sorted(set(scores) - set(rec["filter"]["dropped_uncertain"]))
    assert sorted(rec["training"]["images"]) == sorted(kept + ["image_0", "image_1", "image_2"])
    assert rec["training"]["n_training_pairs"] == 5
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    best = max(log, key=lambda r: r["select_miou"])
    assert rec["training"]["best_epoch"] == best["epoch"]
    assert (out / "filter.png").is_file()


def test_pseudo_label_score_is_the_references_top_10_percent_of_the_teachers_js_map(world):
    from ddpmseg.workers import Segmenter

    d, imgs, unl, out = world
    teacher = Segmenter(d / "model", device="cpu")
    for p in sorted(unl.glob("*.jpg")):
        js = teacher.analyse(p).grid.uncertainty.reshape(-1)
        top = np.sort(js)[::-1][: int(round(0.1 * js.size))]  # written out here, not ddpmseg.metrics.top_mean
        saved = json.loads((out / "pseudo" / f"{p.stem}.json").read_text())
        assert saved["uncertainty"] == pytest.approx(float(top.mean()), rel=1e-5)
        labels = data.load_mask(out / "pseudo" / f"{p.stem}_labels.png")
        np.testing.assert_array_equal(labels, teacher.analyse(p).grid.labels)  # the teacher's own vote


def test_student_predicts_evaluates_and_suggests_like_a_model_folder(world, tmp_path):
    from ddpmseg.model import StudentModel
    from ddpmseg.workers import load_image

    d, imgs, unl, out = world
    ok("predict", unl, "--model", out, "--out", tmp_path / "p")
    for p in unl.glob("*.jpg"):
        for kind in ("labels", "overlay", "uncertainty"):
            assert (tmp_path / "p" / f"{p.stem}_{kind}.png").is_file()
        # the labels PNG is the network's argmax mapped back to the image's size
        student = StudentModel.load(out)
        _, x0, pre = load_image(p, student.size, student.preprocess)
        with torch.no_grad():
            grid = student.network(x0).argmax(1)[0].numpy()
        np.testing.assert_array_equal(data.load_mask(tmp_path / "p" / f"{p.stem}_labels.png"),
                                      data.restore_labels(grid, pre, fill=255))
    text = ok("evaluate", imgs, "--model", out, "--masks", imgs)
    assert "mIoU" in text and "trained this model" in text
    text = ok("suggest", unl, imgs, "--model", out, "--out", tmp_path / "s", "--n", 2)
    assert len((tmp_path / "s" / "suggest.csv").read_text().splitlines()) == 3
    fails("suggest", unl, "--model", out, "--out", tmp_path / "s2", "--by", "diversity", match="no diffusion features")
    fails("predict", unl, "--model", out, "--out", tmp_path / "p2", "--ckpt", d / "x.pt", match="leave --ckpt out")


def test_filter_drops_the_most_uncertain_fraction_and_the_most_certain_count():
    scores = np.random.default_rng(0).random(200)
    items = [PseudoLabel(f"s{i}", Path(f"s{i}.png"), Path(f"s{i}_labels.png"), float(u), "", "sample")
             for i, u in enumerate(scores)]
    r = filter_uncertain(items, 0.1, skip_certain=5)
    order = np.argsort(scores)
    assert [p.id for p in r.dropped_certain] == [f"s{i}" for i in order[:5]]
    assert sorted(p.id for p in r.dropped_uncertain) == sorted(f"s{i}" for i in order[-20:])
    assert sorted(p.id for p in r.kept) == sorted(f"s{i}" for i in order[5:-20])
    assert r.threshold == pytest.approx(scores[order[-21]])
    assert len(filter_uncertain(items, 0.0).kept) == 200


def test_augment_moves_image_and_labels_together():
    # every pixel's colour encodes its label: after scale, crop, pad and flip they must still agree
    gen = torch.Generator().manual_seed(0)
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 4, (4, 4, 4)))
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8 px blocks: bilinear stays exact inside
    x = (labels.float() / 3.0 * 2 - 1)[:, None].repeat(1, 3, 1, 1)
    cfg = StudentTrainConfig(scale_range=(0.6, 1.6))
    for _ in range(5):
        xa, ya = augment(x, labels, cfg, gen, ignore_index=255)
        assert xa.shape == x.shape and ya.shape == labels.shape
        valid = ya != 255
        decoded = torch.round((xa[:, 0] + 1) / 2 * 3).long()
        agree = (decoded == ya)[valid].float().mean()
        assert agree > 0.85, agree  # only pixels on block borders blend (misaligned maps agree ~25 %)
        assert ((ya == 255) == False).any()  # noqa: E712


def test_resumed_training_equals_an_uninterrupted_one(tmp_path, one_thread):
    from ddpmseg.distill.students import build_student

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (6, 32, 32))
    cfg = StudentTrainConfig(epochs=2, batch_size=3, epoch_images=6)
    kw = dict(n_classes=3, ignore_index=255)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full, state = train_student(build_student("unet", 3, 32), images, labels, (images[:2], labels[:2]), tmp_path / "a", cfg, **kw)
    train_student(build_student("unet", 3, 32), images, labels, (images[:2], labels[:2]), tmp_path / "b",
                  StudentTrainConfig(epochs=1, batch_size=3, epoch_images=6), **kw)
    resumed, state_b = train_student(build_student("unet", 3, 32), images, labels, (images[:2], labels[:2]), tmp_path / "b",
                                     cfg, resume=True, **kw)
    same = lambda h: [{k: v for k, v in r.items() if k != "images_per_s"} for r in h]  # noqa: E731 (timings differ)
    assert same(state_b.history) == same(state.history) and state_b.best_epoch == state.best_epoch
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(Exception, match="other settings"):
        train_student(build_student("unet", 3, 32), images, labels, (images[:2], labels[:2]), tmp_path / "b",
                      StudentTrainConfig(epochs=3, batch_size=2, epoch_images=6), resume=True, **kw)


def test_kill_9_during_training_then_resume(world, tmp_path):
    d, imgs, unl, _ = world
    out = tmp_path / "student"
    args = [sys.executable, "-m", "ddpmseg.cli.main", "-q", "--threads", "1", "distill", str(imgs), str(unl),
            "--model", str(d / "model"), "--out", str(out), *_tiny(**{"--epochs": 30})]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "checkpoint.pt").is_file(), "no checkpoint written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model.json").exists()
    labelled_at = {p.name: p.stat().st_mtime_ns for p in (out / "pseudo").iterdir()}
    fails("distill", imgs, unl, "--model", d / "model", "--out", out, *_tiny(**{"--epochs": 30}), match="--resume")
    ok("distill", imgs, unl, "--model", d / "model", "--out", out, *_tiny(**{"--epochs": 30}), "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "pseudo").iterdir() if p.name in labelled_at} == labelled_at
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 31))
    assert json.loads((out / "model.json").read_text())["format"] == "ddpmseg-student"


def test_samples_are_pseudo_labelled_beside_their_pngs(world, tmp_path):
    d, imgs, unl, _ = world
    out = tmp_path / "s"
    ok("distill", imgs, "--samples", 2, "--sample-steps", 2, "--model", d / "model", "--out", out, "--drop-uncertain", 0,
       *_tiny(**{"--epochs": 1}))
    for i in range(2):
        assert (out / "samples" / f"sample_{i:05d}.png").is_file()
        assert (out / "samples" / f"sample_{i:05d}_labels.png").is_file()
    rec = json.loads((out / "model.json").read_text())
    assert rec["sources"]["samples"] == 2 and rec["sources"]["sampler"] == "ddim"
    assert rec["filter"]["kept"] == 2


def test_bad_input_is_one_line_before_any_work(world, tmp_path):
    d, imgs, unl, student = world
    model = d / "model"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "o"
    fails("distill", imgs, "--model", d, "--out", out, match="model folder")
    fails("distill", imgs, "--model", d / "feats.h5", "--out", out, match="file, not a model folder")
    fails("distill", empty, "--model", model, "--out", out, match="no image")
    fails("distill", "--model", model, "--out", out, match="nothing to pseudo-label")
    fails("distill", imgs, "--model", student, "--out", out, match="is a distilled student")
    fails("distill", imgs, "--model", model, "--out", out, "--size", 24, match="multiple of 16")
    fails("distill", unl, "--model", model, "--out", out, match="--labelled")
    fails("distill", imgs, "--model", model, "--out", student, match="holds a finished distillation")
    fails("distill", imgs, "--model", model, "--out", out, "--student-weights", imgs / "image_0.jpg",
          match="not a torch weights file")
    assert not out.exists()


def test_student_weights_load_into_a_student(tmp_path):
    from ddpmseg.distill.students import build_student, load_weights

    source = build_student("unet", 4, 32, seed=1)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    target = build_student("unet", 4, 32, seed=2)
    loaded, total = load_weights(target, tmp_path / "w.pt")
    assert loaded == total
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_missing_monai_names_the_extra(monkeypatch):
    from ddpmseg.distill.students import build_student
    from ddpmseg.errors import DdpmsegError

    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.networks", None)
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(DdpmsegError, match=r'pip install "ddpmseg\[distill\]"'):
        build_student("unet", 3, 32)


def test_ctrl_c_says_what_is_kept_and_resume_finishes(world, tmp_path, monkeypatch):
    from test_ctrl_c import interrupt_on_call, interrupted

    from ddpmseg.workers import Segmenter

    d, imgs, unl, _ = world
    out = tmp_path / "student"
    args = ["distill", imgs, unl, "--model", d / "model", "--out", out, *_tiny()]
    interrupt_on_call(monkeypatch, Segmenter, "analyse", 3)  # during pseudo-labelling: 2 images labelled
    err = interrupted(*args)
    assert err.endswith(f"2 pseudo-labels are kept in {out}; continue with the same command and --resume"), err
    monkeypatch.undo()
    ok(*args, "--resume")
    assert json.loads((out / "model.json").read_text())["filter"]["pseudo_labelled"] == 3
