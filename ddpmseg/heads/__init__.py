"""Other heads on the same frozen features and cache as the MLP ensemble.

    config   DDPConfig: the DDP head's settings (torch-free; saved in model.json)
    ddp      DDPHead: DDP's diffusion map decoder (denoises the label map), SegDiff's multiple generations
"""

from ddpmseg.heads.config import HEADS, DDPConfig

__all__ = ["HEADS", "DDPConfig"]
