"""Instances: COCO mask AP against a hand-computed case, annotations in (COCO polygons / RLE, id PNGs)
and their one-line errors, the plain-torch box ops against straightforward versions, the components
baseline, the synthetic scenes, and fit --head diffinst -> predict (--coco) -> evaluate --instances."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, ok
from ddpmseg.errors import DdpmsegError
from ddpmseg.instances.annotations import encode_rle, load_annotations, to_coco
from ddpmseg.instances.baseline import components
from ddpmseg.instances.boxes import batched_nms, generalized_box_iou, nms, roi_align
from ddpmseg.instances.core import Instances, instances_from_semantic
from ddpmseg.instances.metrics import mask_ap

pytestmark = pytest.mark.usefixtures("one_thread")


def _box(r0, r1, c0, c1, size=20):
    m = np.zeros((size, size), bool)
    m[r0:r1, c0:c1] = True
    return m


# -- COCO mask AP ------------------------------------------------------------------------------------
def test_mask_ap_equals_a_hand_computed_two_image_case():
    """Class 1: three ground truths (A: g1, g2; B: g3), detections p1 = g1 (0.9), p2 in B with IoU 25/40 =
    0.625 with g3 (0.8), p3 a miss in A (0.7). At IoU 0.50, 0.55, 0.60 the ranking is TP TP FP: recall
    reaches 2/3 at precision 1, so 67 of the 101 recall points (0, 0.01, .., 0.66) have precision 1; at
    0.65..0.95 (7 thresholds) it is TP FP FP: 34 points (0..0.33). Class 2: one exact detection, AP 1."""
    a = Instances(np.stack([_box(0, 5, 0, 5), _box(10, 15, 10, 15)]), [1, 1], [1, 1])
    b = Instances(np.stack([_box(0, 8, 0, 5), _box(10, 15, 10, 15)]), [1, 2], [1, 1])
    pa = Instances(np.stack([_box(0, 5, 0, 5), _box(15, 20, 0, 5)]), [1, 1], [0.9, 0.7])
    pb = Instances(np.stack([_box(0, 5, 0, 5), _box(10, 15, 10, 15)]), [1, 2], [0.8, 0.5])
    r = mask_ap({"a": a, "b": b}, {"a": pa, "b": pb}, {1: "one", 2: "two"})
    ap1 = (3 * 67 + 7 * 34) / 10 / 101
    assert r["per_class"]["one"] == pytest.approx(ap1, abs=1e-9)
    assert r["per_class"]["two"] == pytest.approx(1.0)
    assert r["ap"] == pytest.approx((ap1 + 1) / 2, abs=1e-9)
    assert r["ap50"] == pytest.approx((67 / 101 + 1) / 2, abs=1e-9)
    assert r["ap75"] == pytest.approx((34 / 101 + 1) / 2, abs=1e-9)
    assert (r["n_images"], r["n_instances"], r["n_predictions"]) == (2, 4, 4)
    none = mask_ap({"a": a}, {}, {1: "one", 2: "two"})
    assert none["ap"] == 0.0 and none["per_class"] == {"one": 0.0, "two": None}


def test_a_missing_pycocotools_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(DdpmsegError, match=r'needs the pycocotools package; install it: pip install "ddpmseg\[instances\]"'):
        encode_rle(np.ones((2, 2), bool))


# -- annotations in -------------------------------------------------------------------------------------
def _coco(tmp_path, anns, cats=({"id": 1, "name": "disc"},)):
    d = {"images": [{"id": 7, "file_name": "sub/pic.png", "width": 20, "height": 20}], "categories": list(cats),
         "annotations": anns}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(d))
    return p


def test_coco_polygons_rle_and_uncompressed_rle_read_as_masks(tmp_path):
    from pycocotools import mask as cm

    square = _box(2, 6, 3, 9)
    raw = cm.encode(np.asfortranarray(square.astype(np.uint8)))
    counts = []  # uncompressed RLE: run lengths in column-major order, starting with zeros
    flat, cur, run = square.T.reshape(-1), False, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]]},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": {"size": [20, 20], "counts": raw["counts"].decode()}},
            {"id": 3, "image_id": 7, "category_id": 1, "segmentation": {"size": [20, 20], "counts": counts}},
            {"id": 4, "image_id": 7, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]], "iscrowd": 1}]
    ann = load_annotations(_coco(tmp_path, anns))
    inst = ann.images["pic"]
    assert ann.categories == {1: "disc"} and len(inst) == 3
    assert np.array_equal(inst.masks[1], square) and np.array_equal(inst.masks[2], square)
    assert abs(int(inst.masks[0].sum()) - 24) <= 10  # the polygon 6 x 4, rasterised by pycocotools
    # written out and read back: the same masks
    back = tmp_path / "back.json"
    back.write_text(json.dumps(to_coco([("pic.png", inst)], ann.categories, results=False)))
    assert np.array_equal(load_annotations(back).images["pic"].masks, inst.masks)


@pytest.mark.parametrize("ann, message", [
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": []}, "annotation 5 (image 'pic'): empty polygon list"),
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": [[1, 2, 3, 4]]}, "annotation 5 (image 'pic'): a polygon needs at least 3 points"),
    ({"id": 5, "image_id": 7, "category_id": 3, "segmentation": [[1, 1, 5, 1, 5, 5]]}, "annotation 5 (image 'pic') has category_id 3, which is not in categories"),
    ({"id": 5, "image_id": 8, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]}, "annotation 5 names image_id 8, which is not in images"),
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": {"size": [10, 10], "counts": "x"}}, "annotation 5 (image 'pic'): RLE size [10, 10] is not"),
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": {"size": 20, "counts": "x"}}, "annotation 5 (image 'pic'): RLE size 20 is not"),
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": {"size": [20, 20], "counts": ["a", 3]}}, "annotation 5 (image 'pic'): uncompressed RLE counts must be"),
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": {"size": [20, 20], "counts": [10, 5]}}, "annotation 5 (image 'pic'): uncompressed RLE counts must be"),
    ({"id": 5, "image_id": 7, "category_id": 1, "segmentation": {"size": [20, 20], "counts": 7}}, "annotation 5 (image 'pic'): RLE counts must be a string"),
])
def test_bad_coco_annotations_are_one_line_errors_naming_file_and_instance(tmp_path, ann, message):
    path = _coco(tmp_path, [ann])
    with pytest.raises(DdpmsegError) as e:
        load_annotations(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("height, width", [(0, 20), (20, -3)])
def test_a_coco_image_without_a_positive_size_is_a_one_line_error(tmp_path, height, width):
    d = {"images": [{"id": 7, "file_name": "pic.png", "width": width, "height": height}],
         "categories": [{"id": 1, "name": "disc"}], "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(d))
    with pytest.raises(DdpmsegError) as e:
        load_annotations(tmp_path / "ann.json")
    assert f"images[0] ('pic.png') has height {height} and width {width}" in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_instances_csv_is_a_one_line_error(tmp_path, monkeypatch):
    import ddpmseg.instances.annotations as annotations

    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "instances.csv").write_bytes(b"image,instance,class\na,1,\xff\xfe\n")
    with pytest.raises(DdpmsegError, match=r"instances.csv is not a readable CSV .*; give a text file"):
        load_annotations(tmp_path, names=["bg", "cat"])

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(annotations, "open", denied, raising=False)
    with pytest.raises(DdpmsegError, match=r"instances.csv: cannot read it \(Permission denied\)"):
        load_annotations(tmp_path, names=["bg", "cat"])


def test_id_pngs_take_classes_from_a_csv_or_a_semantic_mask_beside_them(tmp_path):
    ids = np.zeros((10, 12), np.uint16)
    ids[1:4, 1:4], ids[5:9, 5:11] = 1, 300  # 16-bit ids
    Image.fromarray(ids).save(tmp_path / "a.png")
    sem = np.zeros((10, 12), np.uint8)
    sem[1:4, 1:4], sem[5:9, 5:11] = 2, 1
    sem[5, 5] = 2  # the instance's class is its most common label
    Image.fromarray(sem).save(tmp_path / "a_semantic.png")
    ann = load_annotations(tmp_path, names=["bg", "cat", "dog"])
    assert ann.images["a"].classes.tolist() == [2, 1] and ann.categories == {2: "dog", 1: "cat"}
    assert np.array_equal(ann.images["a"].masks[1], ids == 300)
    (tmp_path / "instances.csv").write_text("image,instance,class\na,1,cat\na,300,2\n")
    assert load_annotations(tmp_path, names=["bg", "cat", "dog"]).images["a"].classes.tolist() == [1, 2]
    (tmp_path / "instances.csv").write_text("image,instance,class\na,1,cat\n")
    with pytest.raises(DdpmsegError, match=r"a.png: instance 300 has no class in .*instances.csv; add a row a,300,CLASS"):
        load_annotations(tmp_path, names=["bg", "cat", "dog"])
    (tmp_path / "instances.csv").unlink()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "a_semantic.png")
    with pytest.raises(DdpmsegError, match=r"a.png: instance 1 has class 0, which means no object"):
        load_annotations(tmp_path)


def test_instances_from_semantic_split_each_class_into_components():
    lab = np.zeros((12, 12), np.int64)
    lab[1:3, 1:3] = lab[1:3, 8:10] = 3  # two eyes
    lab[6:8, 4:7] = 4
    lab[11, 11] = 3  # under min_area
    inst = instances_from_semantic(lab, [3, 4, 5], min_area=2)
    assert inst.classes.tolist() == [3, 3, 4] and inst.areas().tolist() == [4, 4, 6]
    assert inst.boxes()[1].tolist() == [8, 1, 10, 3]


# -- boxes -----------------------------------------------------------------------------------------------
def _bilinear(f: np.ndarray, y: float, x: float) -> np.ndarray:
    """A straightforward bilinear sample at pixel-centre coordinates (zero outside)."""
    c, h, w = f.shape
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    out = np.zeros(c)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * f[:, yy, xx]
    return out


def test_roi_align_equals_a_loop_of_bilinear_samples():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 9, 11, generator=g)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.4, 0.3, 0.45, 0.5]])
    out = roi_align(f, boxes, 3, samples=2).numpy()
    fn = f.numpy()
    for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for i in range(3):
            for j in range(3):
                acc = np.zeros(3)
                for si in range(2):
                    for sj in range(2):
                        ty, tx = (2 * i + si + 0.5) / 6, (2 * j + sj + 0.5) / 6
                        y, x = (y0 + ty * (y1 - y0)) * 9 - 0.5, (x0 + tx * (x1 - x0)) * 11 - 0.5
                        acc += _bilinear(fn, y, x)
                np.testing.assert_allclose(out[n, :, i, j], acc / 4, atol=1e-5)


def test_giou_and_class_wise_nms_on_hand_made_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    # IoU 1/7, enclosing 9, union 7 -> 1/7 - 2/9; disjoint: 0 - (10 - 5) / 10
    np.testing.assert_allclose(generalized_box_iou(a, b).numpy(), [[1 / 7 - 2 / 9, -0.5]], atol=1e-6)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]
    assert batched_nms(boxes, scores, torch.tensor([1, 1, 2, 1]), 0.5).tolist() == [0, 2, 3]


# -- the baseline and the scenes ----------------------------------------------------------------------------
def test_components_baseline_scores_each_component_by_the_ensembles_agreement():
    lab = np.zeros((6, 6), np.int64)
    lab[0:2, 0:2] = 1
    lab[4:6, 4:6] = 1
    lab[0:2, 4:6] = 2
    proba = np.full((3, 6, 6), 0.1, np.float32)
    proba[1, 0:2, 0:2] = [[0.9, 0.7], [0.8, 0.6]]
    proba[1, 4:6, 4:6] = 0.5
    inst = components(lab, proba, [1, 2])
    assert inst.classes.tolist() == [1, 1, 2]
    np.testing.assert_allclose(inst.scores, [0.75, 0.5, 0.1], rtol=1e-6)


def test_synthetic_scenes_hold_touching_objects_of_every_class():
    from ddpmseg.instances.synthetic import make_scenes

    scenes = make_scenes(12, 48, seed=3)
    classes = np.concatenate([i.classes for _, i in scenes])
    assert set(classes.tolist()) == {1, 2, 3} and all(img.shape == (48, 48, 3) for img, _ in scenes)
    for _, inst in scenes:
        assert not (inst.masks.sum(0) > 1).any()  # visible parts: disjoint
    from scipy import ndimage

    touching = 0
    for _, inst in scenes:
        grown = [ndimage.binary_dilation(m) for m in inst.masks]
        touching += sum((grown[i] & inst.masks[j]).any() for i in range(len(inst)) for j in range(len(inst)) if i != j)
    assert touching > 0
    again = make_scenes(12, 48, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(scenes, again))


# -- the commands ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene_world(tmp_path_factory, tiny_ckpt):
    """Six synthetic scenes at 32 px with COCO annotations, and their features from the tiny ADM."""
    from ddpmseg.instances.synthetic import make_scenes, write_scenes

    d = tmp_path_factory.mktemp("scenes")
    paths, coco = write_scenes(d / "imgs", make_scenes(6, 32, seed=0, objects=(2, 3)))
    ckpt, flags = tiny_ckpt
    ok("extract", "--ckpt", ckpt, "--model-flags", flags, "--images", d / "imgs", "--out", d / "feats.h5")
    return d, paths, coco


TINY_OPTIONS = ["--head-option", "iterations=4", "--head-option", "proposals=6", "--head-option", "width=16",
                "--head-option", "pca=4", "--head-option", "stages=1", "--head-option", "threshold=0",
                "--head-option", "steps=2"]


@pytest.fixture(scope="module")
def instance_model(scene_world, tmp_path_factory):
    """An instance model fitted on the first 4 scenes, and what fit printed."""
    d, paths, coco = scene_world
    m = tmp_path_factory.mktemp("inst") / "m"
    out = ok("fit", "--features", d / "feats.h5", "--head", "diffinst", "--instances", coco, "--labels", 4,
             *TINY_OPTIONS, "--out", m)
    return m, out


def test_fit_predict_coco_and_evaluate_an_instance_model(scene_world, instance_model, tmp_path):
    d, paths, coco = scene_world
    model, out = instance_model
    assert "fit: 4 images," in out and "DiffusionInst head, 2 DDIM steps" in out
    record = json.loads((model / "model.json").read_text())
    assert record["fit"]["head"] == "diffinst" and record["fit"]["masks"] == str(coco.resolve())
    assert record["fit"]["head_config"]["resolution"] == 64 and record["classes"]["names"][:2] == ["no object", "disc"]
    ok("predict", *paths[4:], "--model", model, "--out", tmp_path / "p", "--coco", tmp_path / "p" / "results.json")
    ids = Image.open(tmp_path / "p" / f"{paths[4].stem}_instances.png")
    assert ids.mode.startswith("I;16") and ids.size == (32, 32)
    listed = json.loads((tmp_path / "p" / f"{paths[4].stem}_instances.json").read_text())
    assert [r["id"] for r in listed["instances"]] == list(range(1, len(listed["instances"]) + 1))
    assert set(np.unique(np.asarray(ids)).tolist()) <= {0, *(r["id"] for r in listed["instances"])}
    assert all(set(r) == {"id", "class", "class_index", "score", "box", "area"} for r in listed["instances"])
    assert (tmp_path / "p" / f"{paths[4].stem}_overlay.png").is_file()
    # the results file scores against the ground truth with pycocotools alone, matched by file name
    from pycocotools.coco import COCO

    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert [i["file_name"] for i in results["images"]] == [p.name for p in paths[4:]]
    assert {c["id"] for c in results["categories"]} == {1, 2, 3}
    gt = COCO(str(coco))
    by_name = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
    ours = {i["id"]: by_name[i["file_name"]] for i in results["images"]}
    dets = [{**a, "image_id": ours[a["image_id"]]} for a in results["annotations"]]
    if dets:
        gt.loadRes(dets)
    r = json.loads(ok("evaluate", *paths[4:], "--model", model, "--instances", coco, "--json"))
    assert r["n_images"] == 2 and set(r["per_class"]) == {"disc", "square", "triangle"}
    assert r["training_images"] == [] and 0 <= r["ap"] <= 1
    r2 = json.loads(ok("evaluate", *paths[:2], "--model", model, "--instances", coco, "--json"))
    assert r2["training_images"] == [p.stem for p in paths[:2]]
    text = ok("evaluate", *paths[4:], "--model", model, "--instances", coco)
    assert "evaluate: mask AP" in text and "AP50" in text


def test_instance_commands_refuse_mixed_inputs_in_one_line(scene_world, instance_model, tmp_path, eyes_world):
    d, paths, coco = scene_world
    model, _ = instance_model
    base = ["fit", "--features", d / "feats.h5", "--out", tmp_path / "x"]
    fails(*base, "--head", "diffinst", "--masks", d, match="--head diffinst trains on --instances ANN")
    fails(*base, "--instances", coco, match="--head mlp segments classes: give --masks DIR")
    fails(*base, "--head", "diffinst", "--instances", tmp_path / "none.json", match="does not exist")
    bad = json.loads(coco.read_text())
    bad["images"].append({"id": 99, "file_name": "elsewhere.png", "width": 32, "height": 32})
    (tmp_path / "more.json").write_text(json.dumps(bad))
    fails(*base, "--head", "diffinst", "--instances", tmp_path / "more.json",
          match=("image 'elsewhere' is annotated but the feature cache", "does not hold it"))
    eyes, imgs = eyes_world
    fails("predict", imgs / "image_0.jpg", "--model", eyes / "model", "--out", tmp_path / "p", "--coco",
          tmp_path / "r.json", match="--coco needs an instance model")
    fails("evaluate", paths[0], "--model", model, "--masks", d, match="is an instance model; score it with --instances ANN")
    fails("evaluate", paths[0], "--model", model, match="give --masks DIR (a class model) or --instances ANN")
    fails("predict", paths[0], "--model", model, "--out", tmp_path / "p", "--engine", "ray",
          match="is an instance model, which predicts in the plain loop only")
    fails("suggest", paths[5], "--model", model, "--out", tmp_path / "s", match="this is an instance model (the diffinst head)")
    renamed = json.loads(coco.read_text())  # the same id naming another class
    renamed["categories"] = [{**c, "name": "ball"} if c["id"] == 1 else c for c in renamed["categories"]]
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    fails("evaluate", *paths[4:], "--model", model, "--instances", tmp_path / "renamed.json",
          match="category 1 is 'ball' but the model's class 1 is 'disc'; give annotations with the model's category ids")
    assert not (tmp_path / "x").exists() and not (tmp_path / "p").exists()


def test_the_control_has_distinct_learned_proposals_and_loads_back(monkeypatch):
    """diffusion=false: Sparse R-CNN's learned boxes and proposal features (spread over the image, so the
    proposals differ, and trained: they move from where they started), t = 0, one step; its state loads
    back into the same predictions; fit leaves the global RNG alone."""
    from ddpmseg.heads import ImageMaps, diffinst, get_head
    from ddpmseg.instances.synthetic import make_scenes

    start = []
    init = diffinst.DiffInstNet.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        start.append(self.proposal_boxes.weight.detach().clone())

    monkeypatch.setattr(diffinst.DiffInstNet, "__init__", spy)

    scenes = make_scenes(4, 32, seed=1, objects=(2, 3))
    maps = [{(0, 1): torch.from_numpy(img).permute(2, 0, 1).float().numpy() / 255} for img, _ in scenes]
    spec = get_head("diffinst")
    config = spec.make_config({"diffusion": False, "proposals": 6, "stages": 1, "width": 16, "pca": 3, "pooler": 2,
                               "iterations": 3, "batch_size": 2, "threshold": 0.0, "resolution": 32})
    est = spec.build(config, n_classes=4, ignore_index=0, random_state=0, device="cpu", progress=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    est.fit(ImageMaps(maps, ((0, 1),), 32), [inst for _, inst in scenes])
    assert torch.equal(torch.rand(3), expected)  # the global RNG as fit found it
    boxes = est._learned_boxes(1)[0]
    assert len({tuple(b) for b in boxes.tolist()}) == 6  # six different boxes
    moved = (est.module_.proposal_boxes.weight.detach() - start[0]).abs()
    assert len(start) == 1 and (moved.amax(1) > 1e-5).sum() >= 3  # the boxes learned (most of them moved)
    assert "the control (learned boxes, one step)" in est.describe()
    inst = est.predict_instances(maps[0], ((0, 1),), 32)
    again = spec.load(est.state_dict(), spec.fitted_config(est), n_classes=4, ignore_index=0, random_state=0)
    inst2 = again.predict_instances(maps[0], ((0, 1),), 32)
    assert len(inst) >= 1 and np.array_equal(inst.masks, inst2.masks) and np.array_equal(inst.scores, inst2.scores)
