"""What a user hands to ddpmseg: images, label maps and label sets, and the model's view of them.

    images      list_images (ids = file stems, natural order), take_shard (I/N), load_rgb (any mode -> RGB)
    preprocess  Preprocess: resize / crop to the model's S x S grid, and back
    masks       find_mask (no_mask_found: why none was), load_mask (.npy, index or colour PNGs), check_labels, apply_min_pixels
    labelsets   LabelSet (names, colours, ignore label), load_label_set, list_label_sets
    palette     distinct_colors (the colours of classes without their own)

Only ``preprocess_image`` imports torch (when called): the rest is numpy-only.
"""

from ddpmseg.data.images import (
    SUPPORTED_IMAGE_SUFFIXES,
    list_images,
    load_rgb,
    natural_key,
    open_image,
    parse_shard,
    take_shard,
)
from ddpmseg.data.labelsets import CSV_HEADER, LabelSet, list_label_sets, load_label_set
from ddpmseg.data.masks import (
    COLOR_TOLERANCE,
    MASK_SUFFIXES,
    OFF_PALETTE_MAX_WIDTH,
    apply_min_pixels,
    check_labels,
    find_mask,
    load_mask,
    no_mask_found,
)
from ddpmseg.data.palette import distinct_colors
from ddpmseg.data.preprocess import (
    SPARSE_FRACTION,
    Preprocess,
    preprocess_image,
    prepare_mask,
    restore_labels,
    restore_map,
)

__all__ = [
    "COLOR_TOLERANCE",
    "CSV_HEADER",
    "LabelSet",
    "MASK_SUFFIXES",
    "OFF_PALETTE_MAX_WIDTH",
    "Preprocess",
    "SUPPORTED_IMAGE_SUFFIXES",
    "apply_min_pixels",
    "check_labels",
    "distinct_colors",
    "find_mask",
    "list_images",
    "list_label_sets",
    "load_label_set",
    "load_mask",
    "load_rgb",
    "natural_key",
    "no_mask_found",
    "open_image",
    "parse_shard",
    "take_shard",
    "prepare_mask",
    "SPARSE_FRACTION",
    "preprocess_image",
    "restore_labels",
    "restore_map",
]
