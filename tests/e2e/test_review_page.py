"""The instruction evaluation's review page for people, in a real browser: review.html (written by the
evaluation's write_outputs) loads in headless Chromium, shows every item with its instruction and two
videos, takes a click per item and saves the choices as JSON; review_key.json says which video was the
true-instruction one. The test installs Debian's chromium and chromium-driver when missing and fails
if it cannot."""

from __future__ import annotations

import json
import shutil
import subprocess
import types

import numpy as np
import pytest


def _browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0 and shutil.which("chromedriver"), \
            f"could not install chromium + chromium-driver with apt: {proc.stderr[-2000:]}"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_review_page_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from nemo_ext.eval.episodes import Episode
    from nemo_ext.tasks.instruction.evaluation import write_review_page

    rng = np.random.default_rng(0)
    frames = lambda: rng.integers(0, 255, size=(9, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    episodes = [Episode(key=f"sample_{i:06d}", index=i, frames=None, caption=f"move the red object {d}")
                for i, d in enumerate(["left", "up", "down"])]
    result = types.SimpleNamespace(videos={ep.index: {"gt": frames(), "pred": frames(), "control": frames()}
                                           for ep in episodes},
                                   conditioning={"control": ["swap 1", "swap 2", "swap 0"]})
    outputs = write_review_page(tmp_path, result, episodes, 8.0, types.SimpleNamespace(control_seed=0))
    assert outputs["review_items"] == 3
    key = {k["id"]: k for k in json.loads((tmp_path / "review_key.json").read_text())}
    page = (tmp_path / "review.html").read_text()
    assert "true_video" not in page and "swap 1" not in page  # the key stays out of the page

    driver = _browser()
    try:
        driver.get((tmp_path / "review.html").as_uri())
        items = driver.find_elements(By.CSS_SELECTOR, "div.item")
        assert len(items) == 3
        for item, ep in zip(items, episodes):
            assert ep.caption in item.text
            videos = item.find_elements(By.TAG_NAME, "video")
            assert len(videos) == 2 and all(v.get_attribute("src").endswith(".mp4") for v in videos)
        picks = {}
        for n, item in enumerate(items):  # choose the true video for the first two, the other for the last
            ident = item.get_attribute("id")[len("item-"):]
            slot = key[ident]["true_video"] if n < 2 else {"a": "b", "b": "a"}[key[ident]["true_video"]]
            item.find_element(By.CSS_SELECTOR, f"button.pick[data-slot='{slot}']").click()
            picks[ident] = slot
            chosen = item.find_elements(By.CSS_SELECTOR, "button.chosen")
            assert len(chosen) == 1 and chosen[0].get_attribute("data-slot") == slot
        driver.find_element(By.ID, "save").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "result").text.strip())
        saved = json.loads(driver.find_element(By.ID, "result").text)
    finally:
        driver.quit()
    assert saved["answered"] == saved["total"] == 3
    assert {c["id"]: c["chosen"] for c in saved["choices"]} == picks
    correct = sum(picks[i] == key[i]["true_video"] for i in picks)
    assert correct == 2
