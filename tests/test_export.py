"""ddpmseg export: a student as ONNX, checked with ONNX Runtime; its JSON; the README's code that runs it
without ddpmseg."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, ok

pytest.importorskip("monai")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def student(tmp_path_factory, eyes_world, one_thread) -> tuple[Path, Path, Path]:
    """(student folder, teacher folder, images): a 32 px student distilled from the eyes teacher in a blink."""
    from ddpmseg.distill.config import StudentTrainConfig
    from ddpmseg.distill.run import distill

    d, imgs = eyes_world
    out = tmp_path_factory.mktemp("export") / "student"
    distill(d / "model", out, images=[imgs], size=32, device="cpu",
            train=StudentTrainConfig(epochs=1, epoch_images=4, batch_size=4))
    return out, d / "model", imgs


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> tuple[Path, str]:
    """(the .onnx exported by the CLI with --image, the summary line)."""
    s, _, imgs = student
    onnx_path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    line = ok("export", s, "--onnx", onnx_path, "--image", imgs / "image_0.jpg")
    return onnx_path, line


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_matches_torch_on_a_batch_of_two_and_says_so(student, exported):
    from ddpmseg.model import StudentModel
    from ddpmseg.workers import load_image

    s, _, imgs = student
    onnx_path, line = exported
    assert line.startswith(f"export: {onnx_path} (32x32 input, 4 classes; student.json beside it); "
                           "ONNX Runtime vs torch on image_0.jpg: max |logit diff| "), line
    assert re.search(r"diff\| \d\.\de-0\d; [\d.]+ ms vs [\d.]+ ms per image \(1 thread\)$", line.strip()), line
    model = StudentModel.load(s)
    x = torch.cat([load_image(imgs / f"image_{i}.jpg", 32, "resize")[1] for i in (1, 2)])  # N = 2: the batch axis is dynamic
    with torch.inference_mode():
        expected = model.network(x).numpy()
    session = _session(onnx_path)
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32] and not isinstance(session.get_inputs()[0].shape[0], int)
    got = session.run(["logits"], {"image": x.numpy()})[0]
    assert got.shape == (2, 4, 32, 32)
    assert np.abs(got - expected).max() < 1e-4
    assert float(line.split("max |logit diff| ")[1].split(";")[0]) < 1e-4


def test_sidecar_json_says_how_to_run_it(student, exported):
    s, _, _ = student
    onnx_path, _ = exported
    info = json.loads(onnx_path.with_suffix(".json").read_text())
    rec = json.loads((s / "model.json").read_text())
    assert info["format"] == "ddpmseg-onnx" and info["onnx"] == "student.onnx"
    assert info["input_size"] == 32 and info["preprocess"] == "resize"
    assert info["input"] == {"name": "image", "shape": ["N", 3, 32, 32], "dtype": "float32", "range": [-1.0, 1.0]}
    assert info["output"]["name"] == "logits" and info["output"]["shape"] == ["N", 4, 32, 32]
    assert "x = pixel / 127.5 - 1 (float32 in [-1, 1])" in info["preprocessing"]
    assert any("32x32" in step and "bilinear" in step for step in info["preprocessing"])
    assert info["classes"] == {"names": rec["classes"]["names"], "colors": rec["classes"]["colors"],
                               "ignore_index": rec["classes"]["ignore_index"]}
    assert info["student"]["name"] == "unet"


def _readme_snippet() -> str:
    """The python block after the README line that says how to run it without ddpmseg."""
    match = re.search(r"run it\s+without\s+ddpmseg.*?\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README: no ```python block after 'run it without ddpmseg'"
    return match.group(1)


@pytest.mark.parametrize("size", [None, (97, 61)], ids=["eye-256px", "97x61"])
def test_readme_code_writes_predicts_labels(student, exported, tmp_path, monkeypatch, size):
    """The README's numpy + Pillow + onnxruntime code gives the labels PNG of `ddpmseg predict` with the student
    (the same preprocessing, the same argmax, the same map back to the image's size), so the docs cannot drift."""
    s, _, imgs = student
    onnx_path, _ = exported
    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(onnx_path, work / "student.onnx")
    shutil.copy(onnx_path.with_suffix(".json"), work / "student.json")
    image = Image.open(imgs / "image_0.jpg")
    if size is not None:  # an odd, non-square size: the resize to S and back are not whole multiples
        image = image.resize(size, Image.BILINEAR)
    image.save(work / "photo.jpg")
    ok("predict", work / "photo.jpg", "--model", s, "--out", tmp_path / "preds")
    monkeypatch.chdir(work)
    exec(compile(_readme_snippet(), "README.md", "exec"), {})
    mine = np.array(Image.open(work / "photo_labels.png"))
    theirs = np.array(Image.open(tmp_path / "preds" / "photo_labels.png"))
    assert mine.shape == theirs.shape == (image.size[1], image.size[0])
    np.testing.assert_array_equal(mine, theirs)
    assert len(np.unique(mine)) > 1  # a real comparison, not two constant maps


def test_errors_are_one_line_and_overwrite_nothing(student, exported, tmp_path):
    s, teacher, imgs = student
    onnx_path, _ = exported
    fails("export", teacher, "--onnx", tmp_path / "t.onnx", match=("teacher model folder", "only distilled students export"))
    fails("export", tmp_path / "missing", "--onnx", tmp_path / "m.onnx", match=("does not exist", "ddpmseg distill"))
    fails("export", s, "--onnx", tmp_path / "student.onx", match=("ending in .onnx",))
    fails("export", s, "--onnx", s / "model.onnx", "--overwrite", match=("the student's own",))  # NAME.json = model.json
    before = {p: p.read_bytes() for p in (onnx_path, onnx_path.with_suffix(".json"))}
    fails("export", s, "--onnx", onnx_path, match=("--overwrite", str(onnx_path)))
    assert {p: p.read_bytes() for p in before} == before
    assert not list(tmp_path.iterdir())  # nothing written by the refused exports (no temp file left either)
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["student.json", "student.onnx"]
    line = ok("export", s, "--onnx", onnx_path, "--overwrite")  # with --overwrite: replaced, on a random input
    assert "on a random input" in line
