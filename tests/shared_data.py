"""Where the tests find their data.

eyes8 (8 eye crops with masks, MIT) is vendored in ``tests/fixtures/eyes8``: every test that
needs it runs on any machine. The FASSEG photos are for research only and never enter this
repository; the paper's label-set CSVs come from the project's shared folder too. Tests that
need them skip with a reason saying where they go: ``../shared`` beside the repository, or
the folder named by ``DDPMSEG_SHARED``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
EYES8 = TESTS / "fixtures" / "eyes8"

SHARED = Path(os.environ.get("DDPMSEG_SHARED") or TESTS.parents[1] / "shared")
FASSEG = SHARED / "data" / "fasseg-frontal02"
LABELSETS = SHARED / "labelsets"

needs_fasseg = pytest.mark.skipif(
    not (FASSEG / "train").is_dir(),
    reason=f"the FASSEG photos (research-only, never copied into the repository) are not at {FASSEG / 'train'}: "
           "put them in ../shared/data/fasseg-frontal02/train beside the repository (or set DDPMSEG_SHARED "
           "to the folder holding data/fasseg-frontal02)")
needs_labelsets = pytest.mark.skipif(
    not LABELSETS.is_dir(),
    reason=f"the paper's label-set CSVs are not at {LABELSETS}: put them in ../shared/labelsets beside the "
           "repository (or set DDPMSEG_SHARED to the folder holding labelsets/)")
