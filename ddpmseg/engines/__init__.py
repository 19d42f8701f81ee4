"""Engines that run ddpmseg over many images on more than one process (optional extras).

    ray_data   --engine ray: Ray Data actor pools for predict and extract
"""
