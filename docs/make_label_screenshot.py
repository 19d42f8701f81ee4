"""Regenerate docs/label.png, the screenshot of `ddpmseg label` in docs/label.md.

    python docs/make_label_screenshot.py [--out docs/label.png]

Offline and reproducible: the vendored eyes8 crops (MIT), their 4-class label set, features of the
demo's random-weight 64 px ADM, synthetic scribbles (ddpmseg.label.strokes) inside the true masks of
two crops, one Predict; headless Chromium (Debian's chromium + chromium-driver, through selenium, as
tests/test_label_browser.py) photographs the page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from label_helpers import chromium, served  # noqa: E402

EYES8 = ROOT / "tests" / "fixtures" / "eyes8"
CLASSES = "index,name,r,g,b\n0,background,90,90,90\n1,iris,235,190,60\n2,pupil,60,150,255\n3,sclera,235,80,80\n"  # eyes8 masks: 1 is the iris, 2 the pupil, 3 the sclera


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "label.png")
    args = ap.parse_args()
    import torch

    from ddpmseg.demo import make_tiny_checkpoint
    from ddpmseg.label import open_session
    from ddpmseg.label.strokes import replay, scribbles
    from ddpmseg.pipeline import extract_features

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ddpmseg-label-shot-") as tmp:
        work = Path(tmp)
        (work / "classes.csv").write_text(CLASSES)
        images = [EYES8 / f"image_{i}.jpg" for i in range(6)]
        ckpt, flags = make_tiny_checkpoint(work)
        extract_features(ckpt, images, work / "feats.h5", model_flags=flags)
        s = open_session(images, work / "classes.csv", work / "labels", features=work / "feats.h5")
        for i in (0, 1):
            mask = np.load(EYES8 / f"image_mask{i}.npy")
            ops = scribbles(mask, per_class=2, radius=2.5, steps=10, step=9, seed=i, min_area=30)
            doc = {"ops": ops, "cursor": len(ops), "done": False, "width": 256, "height": 256}
            s.store.save(f"image_{i}", doc, replay(doc))
        driver = chromium(1280, 720)
        try:
            with served(s) as url:
                driver.get(url)
                end = time.time() + 60
                while not driver.execute_script("return document.body.dataset.ready === '1'"):
                    if time.time() > end:
                        raise SystemExit("the page did not load")
                    time.sleep(0.1)
                driver.find_element("id", "predict").click()
                end = time.time() + 300
                while driver.execute_script("return document.body.dataset.predicted") != "image_0":
                    if time.time() > end:
                        raise SystemExit("Predict did not finish")
                    time.sleep(0.1)
                time.sleep(1.5)  # suggest's ranks come from a background pass after the prediction
                driver.execute_script("return refreshList()")
                driver.execute_script("const a = window.ddpmsegLabel; a.opacity = 0.5; "
                                      "document.getElementById('opacity').value = 50; pickClass(3); "
                                      "a.hover = [150, 120]; setRadius(6);")
                time.sleep(0.3)
                driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
