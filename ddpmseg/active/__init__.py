"""Which image to label next: rank unlabelled images by how much a label on them is expected to help.

    strategies  the scores (the reference's uncertainty, BALD) and the rankings (by a score, or
                diversity-aware over image embeddings), on arrays: no I/O
    suggest     suggest_images: the `ddpmseg suggest` command (suggest.csv, a contact sheet)
"""
