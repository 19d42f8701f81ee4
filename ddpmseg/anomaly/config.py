"""The defaults and file names of ``ddpmseg anomaly``, in one torch-free place.

:func:`~ddpmseg.anomaly.detect.anomaly_maps` defaults to these, the CLI
builds its options from them without importing torch, and
:mod:`ddpmseg.anomaly.metrics` (numpy-only) reads the maps ``anomaly`` saves.
"""

from __future__ import annotations

DEFAULT_START_STEPS: tuple[int, ...] = (100, 250, 400)  # noise to each, heal back, average the maps
DEFAULT_SAMPLE_STEPS = 50  # DDIM steps of each reverse process
DEFAULT_BATCH_SIZE = 4  # images per forward pass
DEFAULT_VMAX = 0.25  # the map value drawn brightest in the PNGs
TOP_FRACTION = 0.01  # an image's score: the mean of its map's top 1 %
OUTPUT_KINDS = ("anomaly", "healed")  # NAME_anomaly.png, NAME_healed.png
MAP_SUFFIX = "_anomaly.npy"  # NAME_anomaly.npy: the map itself (--save-maps), what evaluate-anomaly scores
