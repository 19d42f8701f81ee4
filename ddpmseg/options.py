"""The choices and defaults of ddpmseg's settings, in one torch-free place.

The library validates against these and the CLI builds its options from
them (without importing torch, so ``ddpmseg --help`` stays instant).
"""

from __future__ import annotations

DEFAULT_STEPS: tuple[int, ...] = (50, 150, 250)
DEFAULT_BLOCKS: tuple[int, ...] = (5, 6, 7, 8, 12)
PREPROCESS_MODES: tuple[str, ...] = ("resize", "crop")
STORAGE_DTYPES: tuple[str, ...] = ("float16", "float32")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")  # the U-Net's arithmetic (extract, kmeans)
LAYER1_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")  # the fast recipe's layer-1 GEMMs
RECIPES: dict[str, str] = {  # fit recipe -> what it does (classify/training.py defines them)
    "reference": "the paper's: each member its own batches of 64",
    "fast": "members share batches of 1024, layer 1 as one (bf16) GEMM",
    "tiles": "members share batches of 64 small image tiles, layer 1 at the block maps' native resolution; "
             "16 epochs, at most 2,000 steps, sooner on a loss plateau (the default)",
}
DEFAULT_RECIPE = "tiles"  # what `ddpmseg fit` uses (the estimator's own default stays "reference")
IGNORE_INDEX = 255  # the label neither trained nor scored, unless a label set says otherwise
MIN_PIXELS = 20  # the reference: a class covering fewer pixels of an image is ignored there
DEFAULT_SEED = 0  # the seed of the shared noise (extract, kmeans, anomaly: the same draw)
EXTRACT_BATCH_SIZE = 0  # extract: timesteps per forward pass (0: all of an image's at once)
KMEANS_K = 5  # kmeans: clusters per cell of the grid
SUGGEST_STRATEGIES: tuple[str, ...] = ("uncertainty", "bald", "diversity")  # suggest --by (active/strategies.py)
SUGGEST_N = 5  # suggest: images suggested
ENGINES: tuple[str, ...] = ("local", "ray")  # extract / predict --engine: this process, or a Ray actor pool
# What marks a folder as ddpmseg's (torch-free, so backbones.runs can name folders without loading torch)
CACHE_FOLDER_MARKER = "ddpmseg-cache.json"  # a feature cache folder (features/cache.py)
MODEL_FILES: tuple[str, ...] = ("model.json", "tensors.pt")  # a model folder (model.py)
