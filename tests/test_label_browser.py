"""`ddpmseg label` in a real headless Chromium (Debian's chromium + chromium-driver through selenium):
draw a stroke of each of two classes, check the label PNG on disk, reload the page (labels and undo
history come back), undo/redo, Predict, check the prediction, Accept it and undo that. Skips locally without a browser;
fails in CI (.ci/run sets DDPMSEG_REQUIRE_BROWSER=1 and installs the browser)."""

from __future__ import annotations

import io
import json
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from ddpmseg import data
from ddpmseg.label import open_session
from ddpmseg.label.store import UNLABELLED
from ddpmseg.label.strokes import replay
from label_helpers import chromium, need_browser, served, world  # noqa: F401 (world: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def wait_for(driver, script: str, timeout: float = 30.0, what: str = ""):
    """Poll ``return <script>`` in the page until it is truthy."""
    end = time.time() + timeout
    while time.time() < end:
        v = driver.execute_script(f"return {script}")
        if v:
            return v
        time.sleep(0.05)
    err = driver.execute_script("return document.getElementById('error').textContent")
    raise AssertionError(f"timed out waiting for {what or script}; page error: {err!r}")


SAVED = "window.ddpmsegLabel && !window.ddpmsegLabel.saving && !window.ddpmsegLabel.dirty"


def draw(driver, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through image-pixel ``points`` (mapped through the page's current view)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "canvas")
    v = driver.execute_script("return window.ddpmsegLabel.view")
    w, h = canvas.size["width"], canvas.size["height"]
    screen = [(v["tx"] + x * v["scale"] - w / 2, v["ty"] + y * v["scale"] - h / 2) for x, y in points]
    a = ActionChains(driver, duration=10).move_to_element_with_offset(canvas, int(screen[0][0]), int(screen[0][1]))
    a.click_and_hold()
    for (xa, ya), (xb, yb) in zip(screen, screen[1:]):
        a.move_by_offset(int(round(xb - xa)), int(round(yb - ya)))
    a.release().perform()


def test_strokes_save_reload_undo_and_predict_in_chromium(world, tmp_path):
    need_browser()
    out = tmp_path / "labels"
    s = open_session([world / "imgs"], world / "classes.csv", out, features=world / "feats.h5",
                     fit_options={"n_members": 2, "recipe": "fast", "max_epochs": 2})
    driver = chromium()
    try:
        with served(s) as url:
            driver.get(url)
            wait_for(driver, "document.body.dataset.ready === '1'", what="the page to load")
            assert driver.execute_script("return window.ddpmsegLabel.cur.name") == "image_0"
            assert "?token=" not in driver.current_url  # the token leaves the address bar (the cookie stays)

            # Predict before any stroke: the error is shown in the page
            driver.find_element("id", "predict").click()
            wait_for(driver, "!document.getElementById('error').hidden", what="the error banner")
            assert "nothing is labelled" in driver.find_element("id", "error").text

            driver.execute_script("window.ddpmsegLabel.tool.radius = 4")
            driver.find_element("css selector", "#classes button[data-cls='0']").click()
            draw(driver, [(30, 40), (90, 45), (150, 50)])
            driver.find_element("tag name", "body").send_keys("2")  # number key: class 1
            draw(driver, [(60, 180), (120, 190), (200, 200)])
            wait_for(driver, SAVED + " && window.ddpmsegLabel.cur.cursor === 2", what="both strokes saved")

            lab = data.load_mask(out / "image_0.png")
            hist = json.loads((out / "strokes" / "image_0.json").read_text())
            assert hist["cursor"] == 2 and [op["c"] for op in hist["ops"]] == [0, 1]
            assert np.array_equal(lab, replay(hist))  # the page's pixels are the history's, replayed in Python
            assert lab[42, 90] == 0 and lab[190, 120] == 1
            assert set(np.unique(lab)) == {0, 1, UNLABELLED} and (lab == UNLABELLED).mean() > 0.9

            driver.refresh()  # no ?token= any more: the cookie of the first visit lets the page in
            wait_for(driver, "document.body.dataset.ready === '1'", what="the page to reload")
            js = driver.execute_script("const c = window.ddpmsegLabel.cur; return [c.cursor, c.ops.length, "
                                       "Array.from(c.labels).filter(v => v !== 255).length]")
            assert js == [2, 2, int((lab != UNLABELLED).sum())]

            body = driver.find_element("tag name", "body")
            from selenium.webdriver.common.keys import Keys

            body.send_keys(Keys.CONTROL, "z")  # the undo history came back with the page
            wait_for(driver, SAVED + " && window.ddpmsegLabel.cur.cursor === 1", what="undo saved")
            assert set(np.unique(data.load_mask(out / "image_0.png"))) == {0, UNLABELLED}
            body.send_keys(Keys.CONTROL, "y")
            wait_for(driver, SAVED + " && window.ddpmsegLabel.cur.cursor === 2", what="redo saved")
            assert np.array_equal(data.load_mask(out / "image_0.png"), lab)

            driver.find_element("id", "predict").click()
            wait_for(driver, "document.body.dataset.predicted === 'image_0'", timeout=120, what="the prediction")
            assert driver.find_element("id", "error").is_displayed() is False
            assert "predicted in" in driver.find_element("id", "status-text").text
            assert driver.execute_script("return window.ddpmsegLabel.cur.pred !== null")
            pred = data.load_mask(out / ".ddpmseg-label" / "predictions" / "image_0_labels.png")
            req = urllib.request.Request(url.split("?")[0] + "api/prediction/image_0", headers={"X-Token": s.token})
            with urllib.request.urlopen(req) as r:
                served_pred = np.asarray(Image.open(io.BytesIO(r.read())))
            assert np.array_equal(served_pred, pred) and pred.shape == (256, 256)
            assert set(np.unique(pred)) <= {0, 1}
            # the strokes' own pixels: a fit on them predicts most of them back
            assert (pred[lab != UNLABELLED] == lab[lab != UNLABELLED]).mean() > 0.8
            # the list re-renders when a state or the suggested order changes: read it in one script, waiting
            wait_for(driver, "(document.querySelector('#images li[data-name=image_0] .state') || {}).textContent === 'predicted'",
                     what="the image list's state 'predicted'")

            driver.find_element("id", "accept").click()  # the prediction becomes labels, one undoable edit
            wait_for(driver, SAVED + " && window.ddpmsegLabel.cur.cursor === 3", what="Accept saved")
            assert np.array_equal(data.load_mask(out / "image_0.png"), pred)
            hist = json.loads((out / "strokes" / "image_0.json").read_text())
            assert [op["k"] for op in hist["ops"]] == ["s", "s", "set"]
            body.send_keys(Keys.CONTROL, "z")
            wait_for(driver, SAVED + " && window.ddpmsegLabel.cur.cursor === 2", what="undo of Accept saved")
            assert np.array_equal(data.load_mask(out / "image_0.png"), lab)
    finally:
        driver.quit()
