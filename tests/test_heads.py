"""The head registry and the contract every head follows, checked on every registered head; the
generic ``fit --head-option`` / ``--head-config`` settings; and that a head is one file."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import numpy as np
import pytest
import sklearn.base
import sklearn.exceptions
import torch

from cli_helpers import cli, fails, ok
from ddpmseg.errors import DdpmsegError
from ddpmseg.heads import ImageMaps, NotFittedError, config_dict, get_head, head_names

pytestmark = pytest.mark.usefixtures("one_thread")

# Each head's options, written out here (not read from the code): what `ddpmseg heads` must list.
OPTIONS = {
    "mlp": ["n_members", "recipe", "max_epochs", "pixel_fraction", "batch_size", "lr", "precision"],
    "ddp": ["width", "depth", "resolution", "bit_scale", "aux_weight", "diffusion", "iterations", "batch_size", "crop",
            "lr", "weight_decay", "steps", "generations", "time_difference"],
    "segdiff": ["encoder", "diffusion", "width", "levels", "rrdb_blocks", "rrdb_features", "timesteps", "iterations",
                "batch_size", "crop", "lr", "weight_decay", "ema", "sampler", "steps", "generations"],
    "diffinst": ["proposals", "stages", "width", "pca", "pooler", "resolution", "diffusion", "scale", "iterations",
                 "batch_size", "lr", "weight_decay", "steps", "renewal", "threshold", "flip"],
}
TINY = {"mlp": {"n_members": 2, "max_epochs": 2, "recipe": "reference"},
        # segdiff's frozen encoder reads the block maps (the contract's X); its pixel one: tests/test_segdiff.py
        "segdiff": {"encoder": "frozen", "width": 8, "levels": 2, "rrdb_blocks": 1, "rrdb_features": 8,
                    "iterations": 3, "batch_size": 2, "steps": 2, "generations": 2},
        "ddp": {"width": 16, "depth": 1, "iterations": 4, "batch_size": 2, "crop": 8, "steps": 2},
        "diffinst": {"proposals": 4, "stages": 1, "width": 16, "pca": 4, "pooler": 2, "resolution": 16,
                     "iterations": 3, "batch_size": 2, "steps": 2, "threshold": 0.0}}


def _world(n: int = 3, size: int = 16):
    """Block maps at two resolutions whose first channels mark each pixel's class (3 classes)."""
    g = torch.Generator().manual_seed(0)
    maps, labels = [], []
    for _ in range(n):
        lab = torch.randint(0, 3, (size // 4, size // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
        hi = torch.cat([torch.nn.functional.one_hot(lab, 3).permute(2, 0, 1).float(), torch.randn(1, size, size, generator=g)])
        maps.append({(10, 1): torch.nn.functional.avg_pool2d(hi[None], 2)[0].numpy(), (10, 2): hi.numpy()})
        labels.append(lab.numpy())
    return ImageMaps(maps, ((10, 1), (10, 2)), size), labels


def test_the_registry_finds_the_heads_by_module():
    assert head_names() == ["ddp", "diffinst", "mlp", "segdiff"]
    assert [get_head(n).task for n in head_names()] == ["semantic", "instances", "semantic", "semantic"]
    assert [o.name for o in get_head("mlp").options()] == OPTIONS["mlp"]
    assert [o.name for o in get_head("ddp").options()] == OPTIONS["ddp"]
    assert [o.name for o in get_head("segdiff").options()] == OPTIONS["segdiff"]
    assert get_head("mlp").key == "ensemble" and get_head("ddp").key == "ddp"  # tensors.pt keys of 0.1.0 / 4f5f4df
    with pytest.raises(DdpmsegError, match=r"^head 'segdif' is unknown: use one of ddp, diffinst, mlp, segdiff \(see `ddpmseg heads`\)$"):
        get_head("segdif")


def test_listing_the_heads_imports_neither_torch_nor_sklearn():
    import subprocess

    code = "import sys; from ddpmseg.heads import head_names; head_names(); print('torch' in sys.modules, 'sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def _instance_world(n: int = 3, size: int = 16):
    """The same block maps, and each 4x4 cell of class 1 or 2 as one instance (classes are COCO ids: 0 is none)."""
    from ddpmseg.instances.core import Instances

    X, labels = _world(n, size)
    ys = []
    for lab in labels:
        masks = [np.kron(np.arange(16).reshape(4, 4) == k, np.ones((4, 4), bool)) for k in range(16)]
        keep = [(m, int(lab[m][0])) for m in masks if lab[m][0] > 0]
        ys.append(Instances(np.stack([m for m, _ in keep]), [c for _, c in keep], np.ones(len(keep))))
    return X, ys


def _instances_contract(spec, config, est, twin, params):
    X, y = _instance_world()
    with pytest.raises(NotFittedError, match="call fit\\(X, y\\) first"):
        est.predict_instances(X.maps[0], X.keys, X.size)
    assert est.fit(X, y) is est and not hasattr(twin, "module_")
    assert np.atleast_1d(est.n_iter_).min() >= 1 and np.isfinite(np.mean(est.final_loss_))
    inst = est.predict_instances(X.maps[0], X.keys, X.size)
    r = spec.fitted_config(est).working_resolution(X.size)
    assert inst.masks.shape[1:] == (r, r) and len(inst) >= 1  # threshold 0: every kept proposal is an instance
    assert set(inst.classes.tolist()) <= {1, 2} and np.all(np.diff(inst.scores) <= 0)
    assert isinstance(est.describe(), str) and "\n" not in est.describe()
    fitted = spec.fitted_config(est)
    again_config = spec.make_config(json.loads(json.dumps(config_dict(fitted))))
    assert again_config == fitted
    again = spec.load(est.state_dict(), again_config, device="cpu", n_classes=3, ignore_index=0, random_state=0)
    inst2 = again.predict_instances(X.maps[0], X.keys, X.size)
    assert np.array_equal(inst.masks, inst2.masks) and np.array_equal(inst.scores, inst2.scores)


@pytest.mark.parametrize("name", ["mlp", "ddp", "segdiff", "diffinst"])
def test_every_head_follows_the_estimator_contract(name):
    spec = get_head(name)
    config = spec.make_config(TINY[name])
    est = spec.build(config, n_classes=3, ignore_index=255, random_state=0, device="cpu", progress=False)
    params = est.get_params()
    assert {**params, **TINY[name]} == params  # every option is a keyword stored unchanged
    assert set(OPTIONS[name]) | {"n_classes", "ignore_index", "random_state", "device", "progress"} <= set(params)
    twin = sklearn.base.clone(est)
    assert twin is not est and twin.get_params() == params
    if spec.task == "instances":  # fit(X, instances), predict_instances
        return _instances_contract(spec, config, est, twin, params)
    X, y = _world()
    with pytest.raises(NotFittedError) as info:
        est.predict_block_maps(X.maps[0], X.keys, X.size)
    assert isinstance(info.value, sklearn.exceptions.NotFittedError) and "call fit(X, y) first" in str(info.value)
    assert est.fit(X, y) is est
    assert not hasattr(twin, "module_")  # clone is unfitted
    assert np.atleast_1d(est.n_iter_).min() >= 1 and np.isfinite(np.mean(est.final_loss_))
    seg = est.predict_block_maps(X.maps[0], X.keys, X.size)
    assert seg.labels.shape == seg.uncertainty.shape == (16, 16) and seg.proba.shape == (3, 16, 16)
    np.testing.assert_allclose(seg.proba.sum(0), 1, rtol=1e-5)
    assert set(np.unique(seg.labels)) <= {0, 1, 2}
    assert isinstance(est.describe(), str) and "\n" not in est.describe()
    # learned state + settings (as model.json stores them) give back the same predictions
    fitted = spec.fitted_config(est)
    again_config = spec.make_config(json.loads(json.dumps(config_dict(fitted))))
    assert again_config == fitted
    again = spec.load(est.state_dict(), again_config, device="cpu", n_classes=3, ignore_index=255, random_state=0)
    seg2 = again.predict_block_maps(X.maps[0], X.keys, X.size)
    assert np.array_equal(seg.labels, seg2.labels) and np.array_equal(seg.uncertainty, seg2.uncertainty)


def test_the_mlp_heads_fitted_config_resolves_the_recipes_values():
    spec = get_head("mlp")
    est = spec.build(spec.make_config({"n_members": 2, "max_epochs": 1, "recipe": "reference"}), n_classes=3,
                     ignore_index=255, random_state=0, device="cpu", progress=False)
    X, y = _world()
    est.fit(X, y)
    fitted = spec.fitted_config(est)
    assert (fitted.batch_size, fitted.lr, fitted.precision) == (64, 1e-3, "fp32")  # the reference recipe's


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_membres": "3"}, r"^--head-option n_membres: the mlp head has no option 'n_membres'; its options are "
                             r"n_members, recipe, max_epochs, pixel_fraction, batch_size, lr, precision \(see `ddpmseg heads`\)$"),
        ({"n_members": "three"}, r"^--head-option n_members \(mlp head\): 'three' is not a valid int$"),
        ({"n_members": "0"}, r"^mlp head: n_members 0 must be at least 1$"),
        ({"lr": "fast"}, r"^--head-option lr \(mlp head\): 'fast' is not a valid float \(or none\)$"),
        ({"recipe": "slow"}, r"^mlp head: recipe 'slow' is unknown: use one of reference, fast, tiles$"),
    ],
)
def test_bad_head_options_are_one_line_errors(options, message):
    with pytest.raises(DdpmsegError, match=message):
        get_head("mlp").make_config(options)


def test_option_strings_take_the_fields_types():
    c = get_head("ddp").make_config({"diffusion": "false", "steps": "10", "lr": "2e-3"})
    assert (c.diffusion, c.steps, c.lr) == (False, 10, 2e-3)
    c = get_head("mlp").make_config({"batch_size": "none", "lr": 0.01})  # JSON values pass as they are
    assert (c.batch_size, c.lr) == (None, 0.01)


def test_fit_takes_head_options_a_config_file_and_the_old_flags(eyes_world, tmp_path):
    d, imgs = eyes_world
    base = ["fit", "--features", d / "feats.h5", "--masks", imgs]
    conf = tmp_path / "ddp.json"
    conf.write_text(json.dumps({"width": 16, "depth": 1, "iterations": 3, "steps": 2}))
    out = ok(*base, "--head", "ddp", "--head-config", conf, "--head-option", "batch_size=2", "--generations", 2,
             "--out", tmp_path / "m")
    assert "DDP head: 3 steps of 2 crops" in out
    hc = json.loads((tmp_path / "m" / "model.json").read_text())["fit"]["head_config"]
    assert (hc["width"], hc["depth"], hc["iterations"], hc["steps"], hc["batch_size"], hc["generations"]) == (16, 1, 3, 2, 2, 2)
    fails(*base, "--head", "ddp", "--head-option", "steps", "--out", tmp_path / "x",
          match="--head-option 'steps': write KEY=VALUE, e.g. --head-option steps=3")
    fails(*base, "--head", "ddp", "--head-option", "steps=2", "--head-steps", 3, "--out", tmp_path / "x",
          match="--head-steps sets steps to 3 but --head-option steps=2 set it to 2; give it once")
    fails(*base, "--head", "ddp", "--head-config", conf, "--head-option", "steps=null", "--out", tmp_path / "x",
          match="--head-option steps=null steps (ddp head): 'null' is not a valid int")
    (tmp_path / "bad.json").write_text(json.dumps({"lr": {}}))
    fails(*base, "--head", "ddp", "--head-config", tmp_path / "bad.json", "--out", tmp_path / "x",
          match=f"--head-config {tmp_path / 'bad.json'} lr (ddp head): {{}} is not a valid float")
    # one value spelt two ways is no conflict
    out = ok(*base, "--head", "ddp", "--head-config", conf, "--no-head-diffusion", "--head-option", "diffusion=false",
             "--head-lr", 0.001, "--head-option", "lr=1e-3", "--out", tmp_path / "same")
    assert json.loads((tmp_path / "same" / "model.json").read_text())["fit"]["head_config"]["diffusion"] is False
    fails(*base, "--head", "ddp", "--ensemble", 3, "--out", tmp_path / "x",
          match="--ensemble is an option of --head mlp, not of --head ddp")
    fails(*base, "--head", "ddp", "--head-option", "n_members=3", "--out", tmp_path / "x",
          match="the ddp head has no option 'n_members'; its options are width, depth,")
    (tmp_path / "list.json").write_text("[1, 2]")
    fails(*base, "--head-config", tmp_path / "list.json", "--out", tmp_path / "x", match="holds a list; write one JSON object")
    assert not (tmp_path / "x").exists()  # every setting is checked before anything is written


def test_heads_command_lists_every_head_with_its_options_and_defaults():
    out = ok("heads")
    lines = out.splitlines()
    for name, options in OPTIONS.items():
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        listed = [line.split()[0] for line in lines[start + 1 : start + 1 + len(options)]]
        assert listed == options, (name, listed)
    assert any(line.split()[:3] == ["n_members", "int", "10"] for line in lines)
    assert any(line.split()[:3] == ["steps", "int", "3"] for line in lines)
    assert any(line.split()[:5] == ["batch_size", "int", "or", "none", "none"] for line in lines)


TOY_HEAD = '''
"""A toy head: each pixel takes the class whose mean feature vector (at the block maps' first key) is nearest."""
from dataclasses import dataclass, field

import numpy as np
import torch.nn.functional as F
import torch
from sklearn.base import BaseEstimator

from ddpmseg.heads import HeadSpec, NotFittedError, Segmentation


@dataclass(frozen=True)
class ToyConfig:
    scale: float = field(default=1.0, metadata={"help": "a multiplier"})


class Toy(BaseEstimator):
    def __init__(self, n_classes=None, scale=1.0, ignore_index=255, random_state=0, device="cpu", progress=False):
        self.n_classes, self.scale, self.ignore_index = n_classes, scale, ignore_index
        self.random_state, self.device, self.progress = random_state, device, progress

    def _feats(self, maps, keys, size):
        x = torch.as_tensor(np.asarray(maps[keys[-1]], np.float32))[None]
        return F.interpolate(x, size=(size, size), mode="nearest")[0].flatten(1).T.numpy()

    def fit(self, X, y):
        f = np.concatenate([self._feats(m, X.keys, X.size) for m in X.maps])
        t = np.concatenate([np.asarray(a).reshape(-1) for a in y])
        self.means_ = np.stack([f[t == c].mean(0) for c in range(self.n_classes)])
        self.n_iter_, self.final_loss_ = 1, 0.0
        return self

    def predict_block_maps(self, maps, keys, size):
        if not hasattr(self, "means_"):
            raise NotFittedError("This Toy is not fitted yet: call fit(X, y) first.")
        d = ((self._feats(maps, keys, size)[:, None] - self.means_[None]) ** 2).sum(-1)
        p = np.exp(-d * self.scale)
        p /= p.sum(1, keepdims=True)
        return Segmentation(d.argmin(1).reshape(size, size), np.zeros((size, size), np.float32),
                            p.T.reshape(-1, size, size).astype(np.float32))

    def describe(self):
        return f"toy head: {len(self.means_)} class means"

    def state_dict(self):
        return {"means": torch.as_tensor(self.means_)}

    @classmethod
    def from_state_dict(cls, state, device="cpu", **params):
        est = cls(**params)
        est.means_, est.n_iter_, est.final_loss_ = state["means"].numpy(), 1, 0.0
        return est


HEAD = HeadSpec("toy", "nearest class mean (a test's head)", ToyConfig, Toy)
'''


def test_a_new_head_is_one_file(eyes_world, tmp_path, monkeypatch):
    """A module dropped into the heads package is a head of fit, predict, evaluate and `ddpmseg heads`."""
    import ddpmseg.heads

    folder = tmp_path / "more_heads"
    folder.mkdir()
    (folder / "toy.py").write_text(textwrap.dedent(TOY_HEAD))
    monkeypatch.setattr(ddpmseg.heads, "__path__", [*ddpmseg.heads.__path__, str(folder)])
    monkeypatch.delitem(sys.modules, "ddpmseg.heads.toy", raising=False)
    assert "toy" in head_names()
    assert "toy: nearest class mean (a test's head)" in ok("heads")
    d, imgs = eyes_world
    from ddpmseg.pipeline import evaluate_model, fit_model, predict_images

    s = fit_model(d / "feats.h5", imgs, tmp_path / "model", head="toy", options={"scale": "2"}, device="cpu")
    assert s.description == "toy head: 4 class means"
    assert json.loads((tmp_path / "model" / "model.json").read_text())["fit"]["head_config"] == {"scale": 2.0}
    predict_images([imgs / "image_0.jpg"], tmp_path / "model", tmp_path / "preds", device="cpu")
    assert (tmp_path / "preds" / "image_0_labels.png").is_file()
    r = evaluate_model(tmp_path / "model", [imgs], imgs, device="cpu")
    assert r["n_images"] == 3
    monkeypatch.delitem(sys.modules, "ddpmseg.heads.toy", raising=False)


def test_an_unknown_head_in_model_json_says_to_upgrade(eyes_world, tmp_path):
    import shutil

    d, imgs = eyes_world
    shutil.copytree(d / "model", tmp_path / "model")
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    record["fit"]["head"] = "segdif"
    (tmp_path / "model" / "model.json").write_text(json.dumps(record))
    fails("predict", imgs / "image_0.jpg", "--model", tmp_path / "model", "--out", tmp_path / "p",
          match="was fitted with the head 'segdif', which this ddpmseg does not have (its heads: ddp, diffinst, mlp, segdiff); upgrade")


def test_config_dataclasses_are_frozen_and_typed():
    for name in head_names():
        spec = get_head(name)
        c = spec.config()
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(c, dataclasses.fields(c)[0].name, None)
        assert all(f.metadata.get("help") for f in dataclasses.fields(c)), name


def test_the_ddp_heads_keyword_defaults_are_its_configs():
    from ddpmseg.heads.ddp import DDPConfig, DDPHead

    params = DDPHead().get_params()
    assert {k: params[k] for k in OPTIONS["ddp"]} == dataclasses.asdict(DDPConfig())
