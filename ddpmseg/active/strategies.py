"""Scores of unlabelled images and rankings of them (pure numpy; ``suggest`` and the benchmark share them).

Per image, from the model's pixel map of mutual information between the
prediction and the model (entropy of the mean softmax minus the mean entropy
over the ensemble members, or over the DDP head's steps and generations):

    uncertainty  the reference's score: the mean of the map's top 10 %
    bald         BALD over the whole image: the map's mean (the expected information gain of
                 labelling every pixel, pixels taken as independent)

``diversity`` ranks by the uncertainty score but discounts images close to
ones already picked or already labelled (greedy: each pick maximises score x
distance to the nearest picked or labelled image, distances between
standardised image embeddings), so five near-identical images are not all
suggested, nor copies of what is labelled.
"""

from __future__ import annotations

import numpy as np

from ddpmseg.errors import DdpmsegError
from ddpmseg.metrics import image_uncertainty
from ddpmseg.options import SUGGEST_N as DEFAULT_N
from ddpmseg.options import SUGGEST_STRATEGIES as STRATEGIES

DEFAULT_STRATEGY = STRATEGIES[0]


def image_scores(mutual_information: np.ndarray) -> dict[str, float]:
    """Both scores of one image's (H, W) mutual-information map."""
    m = np.asarray(mutual_information, dtype=np.float64)
    return {"uncertainty": image_uncertainty(m), "bald": float(m.mean())}


def embedding(maps: dict) -> np.ndarray:
    """An image's descriptor: each block map's per-channel mean, concatenated (D floats)."""
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(len(v), -1).mean(1) for v in maps.values()])


def rank(scores: dict[str, np.ndarray], n: int, by: str = DEFAULT_STRATEGY, embeddings: np.ndarray | None = None,
         labelled: np.ndarray | None = None) -> list[tuple[int, float]]:
    """The ``n`` best images as (index, score): by ``scores[by]``, or greedily by diversity (``embeddings``
    of the candidates; ``labelled``: embeddings of images labelled already, if known)."""
    if by not in STRATEGIES:
        raise DdpmsegError(f"--by {by!r} is unknown: use one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise DdpmsegError(f"--n {n}: suggest at least 1 image")
    key = "uncertainty" if by == "diversity" else by
    s = np.asarray(scores[key], dtype=np.float64)
    n = min(n, len(s))
    if by != "diversity":
        order = np.argsort(-s, kind="stable")[:n]
        return [(int(i), float(s[i])) for i in order]
    if embeddings is None:
        raise DdpmsegError("diversity ranking needs the images' embeddings")
    cand = np.asarray(embeddings, dtype=np.float64)
    known = np.zeros((0, cand.shape[1])) if labelled is None else np.asarray(labelled, dtype=np.float64)
    both = np.concatenate([cand, known])
    both = (both - both.mean(0)) / np.maximum(both.std(0), 1e-12)
    e, known = both[: len(cand)], both[len(cand) :]
    weight = s / max(s.max(), 1e-12)
    if len(known):
        nearest = np.min(np.linalg.norm(e[:, None] - known[None], axis=2), axis=1)
        picked: list[int] = []
        out: list[tuple[int, float]] = []
    else:  # the first pick is the most uncertain image
        picked = [int(np.argmax(weight))]
        out = [(picked[0], float(weight[picked[0]]))]
        nearest = np.linalg.norm(e - e[picked[0]], axis=1)
    while len(picked) < n:
        value = weight * nearest / max(nearest.max(), 1e-12)
        value[picked] = -np.inf
        i = int(np.argmax(value))
        picked.append(i)
        out.append((i, float(value[i])))
        nearest = np.minimum(nearest, np.linalg.norm(e - e[i], axis=1))
    return out
