"""Training a DDPM (guided-diffusion's ADM) on unlabelled images: ``ddpmseg train-ddpm``.

    config     TrainConfig (RUN/train.json) and small default architectures by image size
    data       the training images, streamed, with one seeded draw per sample
    loop       train_ddpm: the objective, AdamW, EMA, checkpoints, resume, torchrun

The run folder's layout (guided-diffusion's checkpoint names) is
:mod:`ddpmseg.backbones.runs`; ``--ckpt RUN/`` loads its newest EMA weights.
"""

from ddpmseg._lazy import lazy_exports

_EXPORTS = {  # imported on first use: the CLI reads train.config's settings without loading torch
    "TrainConfig": "ddpmseg.train.config",
    "small_architecture": "ddpmseg.train.config",
    "TrainSummary": "ddpmseg.train.loop",
    "train_ddpm": "ddpmseg.train.loop",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
