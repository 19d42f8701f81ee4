"""Anomaly segmentation with a DDPM of normal images: heal by partial diffusion, map |x - healed|.

    heal       Healer: noise to a start step, reverse process back (guided-diffusion's DDIM / ancestral sampler)
    detect     anomaly_maps: the `ddpmseg anomaly` command (maps, healed images, scores.csv)
    metrics    pixel AUROC, AUPRO, best Dice, image AUROC; evaluate_anomaly (`ddpmseg evaluate-anomaly`; numpy-only)
    config     the command's defaults and file names (torch-free: the CLI and metrics read them)
    synthetic  a made-up data set: normal textures and copies with known defects
"""
