"""Confusion matrix, IoU and mIoU on hand-made cases with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpmseg.errors import DdpmsegError
from ddpmseg.metrics import (
    SegmentationScore,
    confusion_matrix,
    evaluate_masks,
    iou_from_confusion,
    mean_iou,
    predictions_on_ignored,
)

PRED = np.array([[0, 1, 1], [2, 2, 0]])
TRUTH = np.array([[0, 1, 2], [2, 2, 1]])


def test_confusion_matrix_rows_truth_cols_pred():
    cm = confusion_matrix(PRED, TRUTH, 3)
    # (t,p): (0,0) (1,1) (2,1) (2,2) (2,2) (1,0)
    expected = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 2]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_ignore_pixels_count_in_the_union_of_their_prediction_as_in_the_reference():
    truth = TRUTH.copy()
    truth[0, 2] = 255  # pred there is 1: the reference's (pred == 1) | (gt == 1) counts it
    cm = confusion_matrix(PRED, truth, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 1, 0], [0, 0, 2]])
    extra = predictions_on_ignored(PRED, truth, 3)
    np.testing.assert_array_equal(extra, [0, 1, 0])
    # class 1: inter 1, union = pred1 (1 + 1 on the ignored pixel) + truth1 (2) - 1 = 3
    assert iou_from_confusion(cm, ignored_pred=extra)[1] == pytest.approx(1 / 3)
    result = SegmentationScore(3).update(PRED, truth).result()
    assert result["per_class"][1] == pytest.approx(1 / 3)


def test_iou_and_miou_with_an_absent_class_counting_zero():
    cm = confusion_matrix(PRED, TRUTH, 4)  # class 3 appears nowhere
    iou = iou_from_confusion(cm)
    # class 0: inter 1, union 2+1-1=2 -> 1/2 ; class 1: inter 1, union 2+2-1=3 -> 1/3
    # class 2: inter 2, union 2+3-2=3 -> 2/3 ; class 3: 0/0 -> 0
    np.testing.assert_allclose(iou, [1 / 2, 1 / 3, 2 / 3, 0.0])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 1 / 3 + 2 / 3 + 0) / 4)


def test_ignore_label_zero_like_bedroom():
    pred = np.array([1, 1, 2, 0, 2, 1])
    truth = np.array([0, 1, 2, 2, 0, 1])  # truth 0 = ignore, yet pixels 0 and 4 enter the unions
    cm = confusion_matrix(pred, truth, 3, ignore_index=0)
    np.testing.assert_array_equal(cm, [[0, 1, 1], [0, 2, 0], [1, 0, 1]])
    # class 1: inter 2, union {0,1,5} -> 2/3 ; class 2: inter 1, union {2,3,4} -> 1/3 ; class 0 not scored
    assert mean_iou(cm, ignore_index=0) == pytest.approx((2 / 3 + 1 / 3) / 2)
    iou = iou_from_confusion(cm, ignore_index=0)
    assert math.isnan(iou[0]) and iou[1:] == pytest.approx([2 / 3, 1 / 3])
    # with ignore 255 (out of range) every class index is scored, background included
    cm255 = confusion_matrix(pred, truth, 3, ignore_index=255)
    # class 0: inter 0, union 1+2 = 3 -> 0 ; class 1: inter 2, union 3+2-2=3 -> 2/3 ; class 2: inter 1, union 2+2-1=3
    assert mean_iou(cm255, ignore_index=255) == pytest.approx((0 + 2 / 3 + 1 / 3) / 3)


def test_evaluate_masks_sums_over_images_before_dividing():
    preds = [np.array([[1, 1], [1, 1]]), np.array([[0, 0], [0, 1]])]
    truths = [np.array([[1, 1], [1, 0]]), np.array([[0, 0], [0, 0]])]
    out = evaluate_masks(preds, truths, 2, ignore_index=255)
    # summed: class 0 inter 0+3 = 3, pred0 = 0+3 = 3, truth0 = 1+4 = 5 -> union 3+5-3 = 5 -> 3/5
    #         class 1 inter 3+0 = 3, pred1 = 4+1 = 5, truth1 = 3+0 = 3 -> union 5+3-3 = 5 -> 3/5
    assert out["per_class"] == pytest.approx([3 / 5, 3 / 5])
    assert out["miou"] == pytest.approx(3 / 5)
    # averaging per-image mIoUs would give something else: image 1 (0 + 3/4)/2, image 2 (3/4 + 0)/2
    assert out["miou"] != pytest.approx(((0 + 3 / 4) / 2 + (3 / 4 + 0) / 2) / 2)
    assert out["n_images"] == 2
    np.testing.assert_array_equal(out["confusion"], [[3, 2], [0, 3]])


@pytest.mark.parametrize("k, ignore", [(6, 255), (29, 0)])  # ffhq-like, and Bedroom-28 (29 indices, 0 = ignore)
def test_matches_the_reference_counting(k, ignore):
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, k - 1, (16, 16)) for _ in range(3)]  # class k-1 never predicted
    truths = [rng.integers(0, k - 1, (16, 16)) for _ in range(3)]  # nor present: counts 0
    for t in truths:
        t[rng.random(t.shape) < 0.1] = ignore  # ignore pixels, scored as the reference does
    scored = [c for c in range(k) if c != ignore]  # the reference's compute_iou: range(number_class) but ignore_label
    inter, union = np.zeros(k), np.zeros(k)
    for p, t in zip(preds, truths):
        for c in scored:
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
    expected = np.where(union > 0, inter / np.maximum(union, 1), 0.0)[scored]
    out = evaluate_masks(iter(preds), iter(truths), k, ignore_index=ignore)
    np.testing.assert_allclose(np.asarray(out["per_class"])[scored], expected)
    assert len(scored) == (28 if k == 29 else 6) and out["per_class"][k - 1] == 0.0
    assert out["miou"] == pytest.approx(expected.mean())


def test_segmentation_score_accumulates():
    score = SegmentationScore(3).update(PRED, TRUTH).update(PRED, TRUTH)
    # (truth, pred) pairs of one image: (0,0) (1,1) (2,1) (2,2) (2,2) (1,0), counted twice
    np.testing.assert_array_equal(score.confusion, [[2, 0, 0], [2, 2, 0], [0, 2, 4]])
    # class 0: 2 / (2 + 4 - 2) ; class 1: 2 / (4 + 4 - 2) ; class 2: 4 / (6 + 4 - 4)
    assert score.result()["per_class"] == pytest.approx([1 / 2, 1 / 3, 2 / 3])
    assert score.result()["miou"] == pytest.approx(1 / 2) and score.result()["n_images"] == 2


@pytest.mark.parametrize(
    "pred, truth, match",
    [
        (np.array([0, 3]), np.array([0, 1]), r"prediction holds label 3 outside 0\.\.2"),
        (np.array([0, -1]), np.array([0, 1]), r"prediction holds label -1"),
        (np.array([0, 1]), np.array([0, 7]), r"truth holds label 7 outside 0\.\.2 or the ignore label 255"),
        (np.array([0, 1, 1]), np.array([0, 1]), r"shape"),
        (np.array([0.5, 1]), np.array([0, 1]), r"whole-number"),
    ],
)
def test_bad_inputs(pred, truth, match):
    with pytest.raises(DdpmsegError, match=match):
        confusion_matrix(pred, truth, 3)


def test_evaluate_masks_errors():
    with pytest.raises(DdpmsegError, match="different number"):
        evaluate_masks([PRED, PRED], [TRUTH], 3)
    with pytest.raises(DdpmsegError, match="image 1: prediction holds label 3"):
        evaluate_masks([PRED, PRED + 3], [TRUTH, TRUTH], 3)
    with pytest.raises(DdpmsegError, match="no image"):
        evaluate_masks([], [], 3)
    with pytest.raises(DdpmsegError, match="no class left"):
        mean_iou(np.zeros((1, 1)), ignore_index=0)
