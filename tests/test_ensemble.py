"""The pixel-classifier ensemble: the fused members equal the reference's loop run member by member,
the recipes' details, native-resolution prediction, and the estimator contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sklearn.base
import sklearn.exceptions
import torch
from torch import nn

from ddpmseg.classify import ArrayPixels
from ddpmseg.heads.mlp import PixelEnsemble
from ddpmseg.heads import mlp as ens
from ddpmseg.classify import members, training
from ddpmseg.heads.mlp import NotFittedError, vote
from ddpmseg.classify.members import StackedMLP, make_mlp
from ddpmseg.classify.training import EarlyStop
from ddpmseg.errors import DdpmsegError


def _random_problem(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n)


def _blobs(n_per: int, d: int = 16, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(scale=3.0, size=(k, d))
    y = np.repeat(np.arange(k), n_per)
    x = centres[y] + rng.normal(size=(len(y), d))
    return x.astype(np.float32), y


class RecordingPixels(ArrayPixels):
    """ArrayPixels that remembers every index batch it was asked for."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array)
        self.calls: list[torch.Tensor] = []

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        self.calls.append(index.clone())
        return super().gather(index)


@pytest.fixture(scope="module")
def fitted() -> tuple[PixelEnsemble, np.ndarray]:
    x, y = _random_problem(200, 6, 4, seed=1)
    return PixelEnsemble(n_members=4, max_epochs=3, random_state=3).fit(x, y), x


# -- the fusion is exact --------------------------------------------------------------
@pytest.mark.parametrize(
    "n, k, patience, min_epochs, max_epochs, expect_early",
    [
        (300, 3, 50, 4, 3, False),  # no early stop: every member runs 3 epochs of 5 batches (last one partial)
        (300, 3, 2, 0, 4, True),  # members stop at different steps
        (129, 5, 3, 1, 3, None),  # last batch of one pixel is skipped by both trainers
        (150, 30, 4, 1, 3, None),  # the wide (256/128) architecture
    ],
)
def test_fused_training_equals_the_reference_loop_member_by_member(n, k, patience, min_epochs, max_epochs, expect_early):
    x, y = _random_problem(n, 8, k)
    y[:k] = np.arange(k)  # every class present, so the reference loop sizes its output layer to k
    kw = dict(n_classes=k, n_members=3, patience=patience, min_epochs=min_epochs, max_epochs=max_epochs, random_state=7)
    fused = PixelEnsemble(**kw).fit(x, y)
    refs = [_reference_member(x, y, g, patience, min_epochs, max_epochs) for g in training.member_generators(7, 3)]

    steps_per_epoch = len(training.batch_bounds(n, 64))
    assert steps_per_epoch == {300: 5, 129: 2, 150: 3}[n]  # 129 = 64 + 64 + 1: a lone pixel cannot train BatchNorm
    assert fused.n_iter_ == [iters for _, iters in refs]
    assert all(1 <= it <= max_epochs * steps_per_epoch for it in fused.n_iter_)
    if expect_early is False:
        assert fused.n_iter_ == [max_epochs * steps_per_epoch] * 3
    elif expect_early:
        assert min(fused.n_iter_) < max_epochs * steps_per_epoch and len(set(fused.n_iter_)) > 1
    for m, (ref, _) in enumerate(refs):
        got = fused.module_.member_mlp(m).state_dict()
        for name, value in ref.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # the trained parameters actually moved away from the init (the test compares something)
    assert fused.module_.b1.abs().max() > 1e-4


def test_epoch_batches_match_a_dataloader_with_shuffle():
    x, y = _random_problem(300, 4, 3)
    src = RecordingPixels(x)
    est = PixelEnsemble(n_members=2, max_epochs=1, random_state=0).fit(src, y)
    # 300 pixels at batch 64 -> 4 full batches and one of 44; one gather per step for both members
    assert est.n_iter_ == [5, 5]
    assert len(src.calls) == 5
    seen = torch.cat(src.calls).unique()
    assert seen.tolist() == list(range(300))  # every pixel visited in the epoch
    gens = training.member_generators(0, 2)
    for g in gens:  # the members' shuffles come after their init draws
        members.draw_linear_weights(4, (128, 32), 3, g)
    perms = [torch.randperm(300, generator=g) for g in gens]
    for step, call in enumerate(src.calls):
        lo, hi = step * 64, min(300, step * 64 + 64)
        expected = torch.cat([p[lo:hi] for p in perms]).unique()
        assert torch.equal(call.sort().values, expected)  # each distinct pixel of the step gathered once


# -- the architecture and init --------------------------------------------------------
@pytest.mark.parametrize("k, widths", [(2, (128, 32)), (29, (128, 32)), (30, (256, 128)), (34, (256, 128))])
def test_widths_follow_class_count(k, widths):
    assert members.default_hidden(k) == widths
    mlp = make_mlp(10, widths, k)
    kinds = [type(layer) for layer in mlp]
    assert kinds == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear]
    assert [(mlp[i].in_features, mlp[i].out_features) for i in (0, 3, 6)] == [(10, widths[0]), widths, (widths[1], k)]
    x, y = _random_problem(70, 10, k)
    y[:k] = np.arange(k)
    est = PixelEnsemble(n_members=2, max_epochs=1).fit(x, y)
    assert est.hidden_ == widths and est.n_classes_ == k
    m = est.module_
    assert m.w1.shape == (2, 10, widths[0]) and m.w2.shape == (2, *widths) and m.w3.shape == (2, widths[1], k)
    assert m.bn1.num_features == 2 * widths[0] and m.bn2.num_features == 2 * widths[1]


def test_init_statistics_and_batchnorm_defaults():
    module = StackedMLP(4, 256, (128, 32), 5)
    for mbr, g in enumerate(training.member_generators(0, 4)):
        module.init_member_(mbr, g)
    w = torch.cat([module.w1.flatten(), module.w2.flatten(), module.w3.flatten()])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    for b in (module.b1, module.b2, module.b3):
        assert torch.count_nonzero(b) == 0
    for bn in (module.bn1, module.bn2):
        assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.affine and bn.track_running_stats
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    # members draw different weights; the same seed draws the same ones
    assert not torch.equal(module.w1[0], module.w1[1])
    again = StackedMLP(4, 256, (128, 32), 5)
    again.init_member_(2, training.member_generators(0, 4)[2])
    assert torch.equal(again.w1[2], module.w1[2])


@pytest.mark.parametrize("training", [True, False])
def test_stacked_batchnorm_is_per_member(training):
    torch.manual_seed(0)
    module = StackedMLP(3, 5, (6, 4), 3)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        for bn in (module.bn1, module.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    members = [module.member_mlp(i).train(training) for i in range(3)]
    module.train(training)
    x = torch.randn(3, 9, 5)
    out = module(x)
    for i, mlp in enumerate(members):
        torch.testing.assert_close(out[i], mlp(x[i]))
    if training:  # running statistics of each member's channel slice follow its own batch
        for i, mlp in enumerate(members):
            torch.testing.assert_close(module.bn1.running_mean[i * 6 : (i + 1) * 6], mlp[2].running_mean)
            torch.testing.assert_close(module.bn2.running_var[i * 4 : (i + 1) * 4], mlp[5].running_var)


# -- early stopping --------------------------------------------------------------------
def test_early_stop_rule_on_a_synthetic_loss_sequence():
    stop = EarlyStop(patience=2, min_epochs=1)
    # epoch 0 is never counted, however bad
    assert not stop.update(5.0, 0) and not stop.update(9.0, 0) and stop.count == 0
    # epoch 1: 3 (best, 0) 3.5 (1) 2 (best, 0) 2 (not strictly less, 1) 2.5 (2) 2.1 (3 > 2: stop)
    results = [stop.update(v, 1) for v in (3.0, 3.5, 2.0, 2.0, 2.5)]
    assert results == [False] * 5 and stop.best_loss == 2.0 and stop.count == 2
    assert stop.update(2.1, 1) and stop.stopped


def test_early_stop_reference_defaults():
    stop = EarlyStop()
    assert (stop.patience, stop.min_epochs, stop.best_loss) == (50, 4, 1e7)
    assert not any(stop.update(1.0, e) for e in range(4) for _ in range(100))  # epochs 0..3 are ignored
    flags = [stop.update(1.0, 4) for _ in range(52)]
    # first update sets best_loss, the next 50 bring the counter to 50, the 52nd makes it 51 > 50
    assert flags == [False] * 51 + [True]
    assert EarlyStop().update(1e8, 4) is False  # above the 1e7 start: counted, not best


def _reference_member(x, y, seed_gen, patience, min_epochs, max_epochs):
    """train_interpreter.py's loop for one member, written plainly (Adam 1e-3, batch 64, CE, its early stop).

    One deviation, ddpmseg's: a last batch of a single pixel is skipped (BatchNorm cannot train on one)."""
    d, k = x.shape[1], int(y.max()) + 1
    classifier = members.init_mlp_(make_mlp(d, members.default_hidden(k), k), seed_gen)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.001)
    criterion = nn.CrossEntropyLoss()
    classifier.train()
    iteration, break_count, best_loss, stop_sign = 0, 0, 10000000, 0
    for epoch in range(max_epochs):
        perm = torch.randperm(len(x), generator=seed_gen)
        for lo in range(0, len(x), 64):
            idx = perm[lo : lo + 64]
            if len(idx) < 2:
                continue
            optimizer.zero_grad()
            loss = criterion(classifier(torch.from_numpy(x)[idx]), torch.from_numpy(y)[idx])
            loss.backward()
            optimizer.step()
            iteration += 1
            if epoch > min_epochs - 1:
                if loss.item() < best_loss:
                    best_loss = loss.item()
                    break_count = 0
                else:
                    break_count += 1
                if break_count > patience:
                    stop_sign = 1
                    break
        if stop_sign == 1:
            break
    return classifier, iteration


# -- voting and uncertainty --------------------------------------------------------------
def test_vote_majority_and_ties_to_smallest_label():
    votes = torch.tensor([[2, 1, 2, 0], [2, 0, 1, 3], [1, 1, 2, 3], [0, 0, 1, 0]])  # (M=4, N=4)
    logits = torch.nn.functional.one_hot(votes, 4).float() * 3.0
    labels, unc = vote(logits)
    # pixel 0: 2,2,1,0 -> 2 ; pixel 1: 1,0,1,0 tie -> 0 ; pixel 2: 2,1,2,1 tie -> 1 ; pixel 3: 0,3,3,0 tie -> 0
    assert labels.tolist() == [2, 0, 1, 0]
    # each member puts a = e^3 / (e^3 + 3) on its vote and b = 1 / (e^3 + 3) on the 3 others:
    # mutual information = entropy of the mean softmax - the members' (equal) entropy
    a, b = math.exp(3) / (math.exp(3) + 3), 1 / (math.exp(3) + 3)
    member = -(a * math.log(a) + 3 * b * math.log(b))
    for pixel in range(4):
        assert unc[pixel].item() == pytest.approx(_entropy_of_the_mean(votes[:, pixel].tolist(), 4, a, b) - member,
                                                  abs=1e-6)
    # written out for pixel 1 (votes 1,0,1,0): the mean puts (a+b)/2 on two classes and b on the other two
    assert unc[1].item() == pytest.approx(
        -2 * (a + b) / 2 * math.log((a + b) / 2) - 2 * b * math.log(b) - member, abs=1e-6)


def _entropy_of_the_mean(votes: list[int], k: int, a: float, b: float) -> float:
    """Entropy of the mean of member softmaxes that put ``a`` on their vote and ``b`` elsewhere."""
    mean = [(votes.count(c) * a + (len(votes) - votes.count(c)) * b) / len(votes) for c in range(k)]
    return -sum(p * math.log(p) for p in mean)


def test_uncertainty_hand_value():
    logits = torch.tensor([[[60.0, -60.0]], [[-60.0, 60.0]]])  # two confident members that disagree
    _, unc = vote(logits)
    assert unc.item() == pytest.approx(math.log(2), abs=1e-6)
    same = torch.tensor([[[1.0, 2.0, 0.5]], [[1.0, 2.0, 0.5]]])
    assert vote(same)[1].item() == pytest.approx(0.0, abs=1e-6)


def test_predict_is_majority_of_member_argmax(fitted):
    est, x = fitted
    logits = est.predict_member_logits(x)
    assert logits.shape == (4, len(x), 4)
    top = logits.argmax(-1).numpy()  # (M, N)
    counts = np.stack([(top == c).sum(0) for c in range(4)], axis=1)
    np.testing.assert_array_equal(est.predict(x), counts.argmax(1))
    proba = est.predict_proba(x)
    assert proba.shape == (len(x), 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(proba, torch.softmax(logits, -1).mean(0).numpy(), atol=1e-6)
    unc = est.uncertainty(x)
    # mutual information of the members, written out in float64 from their logits
    lg = logits.double().numpy()
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mean = p.mean(0)
    expected = -(mean * np.log(mean)).sum(-1) + (p * np.log(p)).sum(-1).mean(0)
    assert unc.shape == (len(x),) and unc.max() > 1e-5  # members fitted from different seeds disagree a little
    np.testing.assert_allclose(unc, np.maximum(expected, 0.0), rtol=0.02, atol=1e-6)  # float32 differences of ~1.4


def test_identical_members_have_zero_uncertainty(fitted):
    est, x = fitted
    clone = PixelEnsemble.from_state_dict(est.state_dict())
    state = clone.module_.member_state(0)
    for m in range(1, 4):
        clone.module_.load_member_state(m, state)
    np.testing.assert_allclose(clone.uncertainty(x), 0.0, atol=1e-6)
    single = clone.predict_member_logits(x)[0]
    np.testing.assert_array_equal(clone.predict(x), single.argmax(-1).numpy())
    np.testing.assert_allclose(clone.predict_proba(x), torch.softmax(single, -1).numpy(), atol=1e-6)


def test_chunked_prediction_equals_one_pass(fitted, monkeypatch):
    est, x = fitted
    whole = est.predict_member_logits(x)
    monkeypatch.setattr(ens, "PREDICT_CHUNK", 7)
    src = RecordingPixels(x)
    torch.testing.assert_close(est.predict_member_logits(src), whole)
    assert max(len(c) for c in src.calls) == 7
    np.testing.assert_array_equal(est.predict(x), vote(whole)[0].numpy())


# -- learning and the estimator contract ----------------------------------------------------
def test_learns_separable_blobs_and_drops_ignore_pixels():
    x, y = _blobs(200)
    rng = np.random.default_rng(5)
    junk = rng.normal(loc=-40.0, size=(150, 16)).astype(np.float32)  # far away; would be learned if kept
    X = np.concatenate([x, junk])
    Y = np.concatenate([y, np.full(150, 255)])
    src = RecordingPixels(X)
    est = PixelEnsemble(n_members=3, max_epochs=8, random_state=0).fit(src, Y)
    assert est.n_classes_ == 3  # inferred from the labels, the 255s are not a class
    assert torch.cat(src.calls).max() < len(x)  # ignored pixels were never gathered
    xt, yt = _blobs(100, seed=1)
    assert (est.predict(xt) == yt).mean() > 0.95
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])


def test_ignore_label_zero_like_bedroom():
    x, y = _blobs(60, k=3)
    src = RecordingPixels(x)
    est = PixelEnsemble(n_members=2, max_epochs=1, ignore_index=0).fit(src, y)
    gathered = torch.cat(src.calls).unique().numpy()
    np.testing.assert_array_equal(np.sort(gathered), np.flatnonzero(y != 0))
    assert est.n_classes_ == 3


def test_not_fitted_error():
    est = PixelEnsemble()
    for call in (est.predict, est.predict_proba, est.uncertainty, est.predict_member_logits):
        with pytest.raises(NotFittedError) as info:
            call(np.zeros((2, 3), np.float32))
        assert str(info.value) == "This PixelEnsemble is not fitted yet: call fit(X, y) first."
        assert isinstance(info.value, DdpmsegError)
        assert isinstance(info.value, sklearn.exceptions.NotFittedError)
    with pytest.raises(NotFittedError):
        est.state_dict()


def test_wrong_feature_count_names_both(fitted):
    est, _ = fitted
    with pytest.raises(DdpmsegError, match=r"X has 5 features .* fitted on 6"):
        est.predict(np.zeros((3, 5), np.float32))


@pytest.mark.parametrize(
    "labels, kw, match",
    [
        ([0, 1, 2, 7, 255, 1], dict(n_classes=3), r"label 7 is out of range: labels must be in 0\.\.2"),
        ([0, 1, -1, 1, 0, 1], {}, r"label -1 is negative"),
        ([255] * 6, {}, r"labelled pixel"),
        ([0, 1, 1], {}, r"got 3 labels for 6 pixels"),
        ([0.5, 1, 1, 0, 0, 1], {}, r"whole numbers"),
    ],
)
def test_bad_labels(labels, kw, match):
    with pytest.raises(DdpmsegError, match=match):
        PixelEnsemble(n_members=1, max_epochs=1, **kw).fit(np.zeros((6, 3), np.float32), np.array(labels))


def test_bad_hyperparameters_and_features():
    with pytest.raises(DdpmsegError, match="n_members"):
        PixelEnsemble(n_members=0).fit(np.zeros((4, 2)), [0, 1, 0, 1])
    with pytest.raises(DdpmsegError, match="2-D"):
        PixelEnsemble().fit(np.zeros(4), [0, 1, 0, 1])


def test_get_params_and_clone():
    est = PixelEnsemble(n_classes=5, n_members=3, hidden=(16, 8), max_epochs=7, ignore_index=0)
    params = est.get_params()
    assert params == dict(
        n_classes=5, n_members=3, hidden=(16, 8), lr=None, batch_size=None, max_epochs=7, patience=50,
        min_epochs=4, ignore_index=0, random_state=0, device="cpu", progress=False,
        recipe="reference", pixel_fraction=1.0, precision="auto",
    )
    assert sklearn.base.clone(est).get_params() == params
    assert not hasattr(est, "n_classes_")
    x, y = _random_problem(100, 4, 5)
    y[y == 0] = 1
    fitted = est.fit(x, y)
    assert fitted is est and est.hidden_ == (16, 8) and est.module_.w2.shape == (3, 16, 8)
    assert (est.batch_size_, est.lr_, est.precision_) == (64, 1e-3, "fp32")  # the reference recipe's
    assert not est.module_.training


def test_state_dict_round_trip(fitted, tmp_path):
    est, x = fitted
    path = tmp_path / "ens.pt"
    torch.save(est.state_dict(), path)
    loaded = PixelEnsemble.from_state_dict(torch.load(path, weights_only=True))
    assert loaded.get_params() == est.get_params()
    assert loaded.n_iter_ == est.n_iter_ and loaded.hidden_ == est.hidden_
    assert (loaded.n_classes_, loaded.n_features_in_) == (est.n_classes_, est.n_features_in_)
    np.testing.assert_array_equal(loaded.predict(x), est.predict(x))
    np.testing.assert_array_equal(loaded.predict_proba(x), est.predict_proba(x))
    np.testing.assert_array_equal(loaded.uncertainty(x), est.uncertainty(x))
    with pytest.raises(DdpmsegError, match="state dict"):
        PixelEnsemble.from_state_dict({"module": {}})


def test_array_pixels_gather():
    data = np.arange(20, dtype=np.float64).reshape(5, 4)
    src = ArrayPixels(data)
    assert len(src) == 5 and src.n_features == 4
    rows = src.gather(torch.tensor([4, 0, 4]))
    assert rows.dtype == torch.float32
    np.testing.assert_array_equal(rows.numpy(), data[[4, 0, 4]])
    tsrc = ArrayPixels(torch.from_numpy(data).half())
    assert tsrc.gather(torch.tensor([1])).dtype == torch.float32
    with pytest.raises(DdpmsegError, match="2-D"):
        ArrayPixels(np.zeros(3))
    # tensors (which have a .gather of their own) are wrapped, not mistaken for a PixelSource
    x, y = _random_problem(80, 3, 2)
    a = PixelEnsemble(n_members=2, max_epochs=1).fit(torch.from_numpy(x), torch.from_numpy(y))
    b = PixelEnsemble(n_members=2, max_epochs=1).fit(x, y)
    np.testing.assert_array_equal(a.predict(torch.from_numpy(x)), b.predict(x))


def test_progress_bar_runs(capsys):
    x, y = _random_problem(100, 3, 2)
    est = PixelEnsemble(n_members=2, max_epochs=1, progress=True).fit(x, y)
    assert est.n_iter_ == [2, 2]
    assert "fit" in capsys.readouterr().err


# -- the fast recipe ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_recipe_learns_separable_blobs(precision):
    x, y = _blobs(300)
    src = RecordingPixels(x)
    est = PixelEnsemble(recipe="fast", precision=precision, n_members=3, max_epochs=6, random_state=0).fit(src, y)
    assert (est.batch_size_, est.lr_, est.precision_) == (1024, training.RECIPES["fast"].lr, precision)
    # one gather per step shared by every member: 900 pixels fit in one batch of 1024
    assert len(src.calls) == max(est.n_iter_) == 6 and all(len(c) == 900 for c in src.calls)
    xt, yt = _blobs(100, seed=1)
    assert (est.predict(xt) == yt).mean() > 0.95


def test_fast_recipe_is_deterministic_and_seeded():
    x, y = _random_problem(2500, 8, 4)
    kw = dict(recipe="fast", n_members=3, max_epochs=3, precision="fp32")
    a, b = PixelEnsemble(random_state=5, **kw).fit(x, y), PixelEnsemble(random_state=5, **kw).fit(x, y)
    c = PixelEnsemble(random_state=6, **kw).fit(x, y)
    sa, sb, sc = a.module_.state_dict(), b.module_.state_dict(), c.module_.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert not torch.equal(sa["w1"], sc["w1"])
    assert a.final_loss_ == b.final_loss_ and a.n_iter_ == b.n_iter_ == [9, 9, 9]  # 3 batches (1024, 1024, 452) x 3


def test_fast_members_start_from_the_reference_init_and_stay_distinct():
    x, y = _random_problem(200, 6, 3)
    est = PixelEnsemble(recipe="fast", n_members=3, max_epochs=1, precision="fp32", random_state=2).fit(x, y)
    init = StackedMLP(3, 6, (128, 32), 3)
    for m, g in enumerate(training.member_generators(2, 3)):
        init.init_member_(m, g)
    moved = (est.module_.w1 - init.w1).abs().amax(dim=(1, 2))
    assert torch.all(moved > 0) and torch.all(moved < 0.05)  # one Adam step of lr 4e-3 from each member's own init
    assert not torch.allclose(est.module_.w1[0], est.module_.w1[1])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_shared_first_layer_matches_autograd(dtype, tol):
    torch.manual_seed(0)
    x, w0, b0 = torch.randn(40, 12), torch.randn(12, 10) * 0.1, torch.randn(10)
    upstream = torch.randn(40, 10)
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    w.grad = torch.full_like(w, float("nan"))  # overwritten, never accumulated into
    low = None if dtype == torch.float32 else torch.empty_like(w, dtype=dtype)
    out = members.SharedFirstLayer.apply(x, w, b, low)
    (out * upstream).sum().backward()
    wr, br = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref = x @ wr + br
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad, wr.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(b.grad, br.grad)


@pytest.mark.parametrize("recipe, batch_size, steps", [
    ("fast", 1024, 1 + 4 + 1),  # patience 50 batches of 64 = 3200 pixels = 4 batches of 1024
    ("fast", 256, 1 + 13 + 1),  # ceil(3200 / 256) = 13
    ("fast", 64, 1 + 50 + 1),  # at the reference's batch size the two rules agree
    ("reference", 64, 1 + 50 + 1),
    ("reference", 1024, 1 + 50 + 1),  # the reference recipe counts batches, whatever their size
])  # fmt: skip
def test_fast_early_stopping_counts_patience_in_pixels(monkeypatch, recipe, batch_size, steps):
    assert training.fast_patience_steps(50, 1024) == 4 and training.fast_patience_steps(1, 1024) == 1
    calls = iter(range(10**6))
    real = training.member_losses

    def scripted(logits, targets):  # the first batch is the best; no later one improves on it
        return real(logits, targets) * 0 + (1.0 if next(calls) == 0 else 2.0)

    monkeypatch.setattr(training, "member_losses", scripted)
    x, y = _random_problem(4096, 5, 3)
    est = PixelEnsemble(recipe=recipe, n_members=2, batch_size=batch_size, patience=50, min_epochs=0, max_epochs=100,
                        precision="fp32").fit(x, y)
    assert est.n_iter_ == [steps, steps]  # first batch + patience steps without improvement + the one that stops


@pytest.mark.parametrize("recipe", ["reference", "fast"])
@pytest.mark.parametrize("fraction", [0.5, 0.1])
def test_pixel_fraction_visits_a_fresh_subset_each_epoch(recipe, fraction):
    x, y = _random_problem(1000, 4, 3)
    y[::10] = 255  # 900 labelled pixels
    src = RecordingPixels(x)
    est = PixelEnsemble(recipe=recipe, n_members=1, max_epochs=3, pixel_fraction=fraction, batch_size=1024).fit(src, y)
    per_epoch = round(fraction * 900)
    assert len(src.calls) == 3 and all(len(c) == per_epoch for c in src.calls)  # one batch per epoch
    assert all(np.all(y[c.numpy()] != 255) for c in src.calls)
    assert not torch.equal(src.calls[0].sort().values, src.calls[1].sort().values)
    assert est.n_iter_ == [3]


def test_fast_state_dict_round_trip_and_old_states_load_as_reference(tmp_path):
    x, y = _random_problem(300, 5, 3)
    est = PixelEnsemble(recipe="fast", pixel_fraction=0.5, n_members=2, max_epochs=2).fit(x, y)
    path = tmp_path / "fast.pt"
    torch.save(est.state_dict(), path)
    loaded = PixelEnsemble.from_state_dict(torch.load(path, weights_only=True))
    assert loaded.get_params() == est.get_params() and loaded.recipe == "fast" and loaded.pixel_fraction == 0.5
    assert (loaded.batch_size_, loaded.lr_, loaded.precision_) == (est.batch_size_, est.lr_, est.precision_)
    np.testing.assert_array_equal(loaded.predict_proba(x), est.predict_proba(x))
    old = est.state_dict()  # a state saved before the fast recipe existed: no recipe, fraction or precision
    for key in ("recipe", "pixel_fraction", "precision"):
        del old["params"][key]
    for key in ("batch_size_", "lr_", "precision_"):
        del old[key]
    old["params"].update(batch_size=64, lr=1e-3)
    legacy = PixelEnsemble.from_state_dict(old)
    assert legacy.recipe == "reference" and (legacy.batch_size_, legacy.lr_) == (64, 1e-3)
    np.testing.assert_array_equal(legacy.predict(x), est.predict(x))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(recipe="turbo"), r"recipe='turbo' is unknown: use one of reference, fast"),
        (dict(pixel_fraction=0.0), r"pixel_fraction=0.0 must be in \(0, 1\]"),
        (dict(pixel_fraction=1.5), r"pixel_fraction=1.5 must be in \(0, 1\]"),
        (dict(precision="fp16", recipe="fast"), r"precision='fp16' is unknown"),
        (dict(precision="bf16"), r"precision='bf16' applies to the shared-batch recipes \(fast, tiles\) only"),
        (dict(recipe="fast", batch_size=1), r"batch_size=1 must be at least 2"),
        (dict(lr=0.0), r"lr=0.0 must be positive"),
    ],
)
def test_bad_recipe_hyperparameters(kw, match):
    with pytest.raises(DdpmsegError, match=match) as info:
        PixelEnsemble(**kw).fit(np.zeros((4, 2), np.float32), [0, 1, 0, 1])
    assert "\n" not in str(info.value) and str(info.value).endswith("fix the PixelEnsemble argument")


def test_cli_recipe_reaches_the_estimator_and_model_json(tmp_path, tiny_ckpt, eyes8):
    from click.testing import CliRunner

    from ddpmseg.cli.main import main
    from ddpmseg.model import SegmentationModel

    ckpt, flags = tiny_ckpt
    images = [eyes8 / "image_0.jpg", eyes8 / "image_1.jpg"]
    runner = CliRunner()
    args = ["-q", "extract", "--ckpt", ckpt, "--model-flags", flags, "--out", tmp_path / "f.h5", "--device", "cpu"]
    for image in images:
        args += ["--images", image]
    assert runner.invoke(main, [str(a) for a in args]).exit_code == 0
    fit = ["-q", "fit", "--features", tmp_path / "f.h5", "--masks", eyes8, "--ensemble", 2, "--max-epochs", 1,
           "--recipe", "fast", "--pixel-fraction", 0.25, "--device", "cpu", "--out", tmp_path / "model"]
    result = runner.invoke(main, [str(a) for a in fit])
    assert result.exit_code == 0, result.output
    fit_record = json.loads((tmp_path / "model" / "model.json").read_text())["fit"]
    cfg = {**fit_record["head_config"], "n_pixels": fit_record["n_pixels"]}
    assert (cfg["recipe"], cfg["pixel_fraction"], cfg["batch_size"]) == ("fast", 0.25, 1024)
    est = SegmentationModel.load(tmp_path / "model").classifier
    assert (est.recipe, est.pixel_fraction, est.batch_size_) == ("fast", 0.25, 1024)
    assert est.n_iter_ == [len(training.batch_bounds(round(0.25 * cfg["n_pixels"]), 1024))] * 2  # one epoch
    bad = runner.invoke(main, [str(a) for a in fit[:12] + ["--pixel-fraction", 0, "--out", tmp_path / "m2"]])
    assert bad.exit_code != 0 and "pixel-fraction" in bad.output
