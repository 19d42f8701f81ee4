"""The defaults and file names of ``ddpmseg anomaly``, in one torch-free place.

:func:`~ddpmseg.anomaly.detect.anomaly_maps` defaults to these, the CLI
builds its options from them without importing torch, and
:mod:`ddpmseg.anomaly.metrics` (numpy-only) reads the maps ``anomaly`` saves.
"""

from __future__ import annotations

# heal's defaults, from the real-defects benchmark (ELPV, docs/anomaly.md): one small start step beat larger
# ones and every combination, 10 DDIM steps equalled 50, and a top 20 % score beat the top 1 % and the maximum
DEFAULT_START_STEPS: tuple[int, ...] = (50,)  # noise to each, heal back, average the maps
DEFAULT_SAMPLE_STEPS = 10  # DDIM steps of each reverse process
DEFAULT_BATCH_SIZE = 4  # images per forward pass
DEFAULT_VMAX = 0.25  # heal: the map value drawn brightest in the PNGs (knn: the bank's radius, see knn.py)
TOP_FRACTION = 0.2  # heal: an image's score is the mean of its map's top 20 %
OUTPUT_KINDS = ("anomaly", "healed")  # heal: NAME_anomaly.png, NAME_healed.png (knn: NAME_anomaly.png)
METHODS = ("heal", "knn")  # reconstruction by partial diffusion; distance to normal patches (PatchCore-style)
DEFAULT_METHOD = "knn"  # ELPV (docs/anomaly.md): knn above heal at 64 px, level at 32 px with a third of the spread
OPTIONS_OF = {"heal": ("start_steps", "sample_steps", "ancestral", "smooth"),  # each method's own options
              "knn": ("normal", "coreset", "max_bank_mb", "grid")}
KNN_CORESET = 1.0  # knn: the fraction of the normal patches kept in the bank (greedy k-centre below 1; 1: all)
KNN_MAX_MB = 512.0  # knn: the bank's vectors at most this many MiB (a random sample of the patches beyond)
KNN_GRID = 0  # knn: patch grid cells a side; 0: half the model grid, at most KNN_MAX_GRID
KNN_MAX_GRID = 32  # PatchCore's density (28 x 28 at 224 px): a finer grid costs grid^2 x the bank per image
DISPLAY_SIDE = 256  # pictures of smaller images are enlarged (nearest) to this shorter side, so the map is legible
MAP_SUFFIX = "_anomaly.npy"  # NAME_anomaly.npy: the map itself (--save-maps), what evaluate-anomaly scores
