"""The drawing page in a real browser: headless Chromium, driven by Playwright.

Mouse strokes draw digits on ``#pad``; the test sets ``#number`` and reads the
answers in ``#digit`` and ``#sum`` from the pretrained checkpoint, then checks
that ``#clear`` empties them, on a laptop's window with the mouse and on a
phone's with a finger.

The browser is Debian's ``chromium`` (Playwright's own download is not
needed). Without it or Playwright the test skips, naming the install line,
except under ``CI=true``, where it fails. ``ADDER_SCREENSHOT=PATH`` saves the
laptop screenshot there (``docs/figures/page.png`` is made so); otherwise it
goes to a temporary folder.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

from adder import predict
from adder import serve

INSTALL = "apt-get install -y chromium && pip install playwright"

# Digits as strokes on the 280x280 pad (y down), as a person draws them.
STROKES = {
    1: [[(150, 40), (140, 240)]],
    7: [[(75, 55), (205, 55), (125, 235)], [(110, 145), (185, 145)]],
    0: [[(140 + 62 * math.cos(t), 140 + 92 * math.sin(t))
         for t in np.linspace(-math.pi / 2, 1.55 * math.pi, 36)]],
    4: [[(170, 40), (70, 175), (215, 175)], [(170, 40), (170, 245)]],
}


@pytest.fixture(scope="module")
def browser():
  chromium = shutil.which("chromium")
  try:
    from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  except ImportError:
    sync_playwright = None
  if chromium is None or sync_playwright is None:
    missing = "chromium" if chromium is None else "playwright"
    if os.environ.get("CI") == "true":
      pytest.fail(f"{missing} is missing; install it: {INSTALL}")
    pytest.skip(f"{missing} is missing; install it: {INSTALL}")
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    yield b
    b.close()


@pytest.fixture(scope="module")
def url():
  predictor = predict.load(predict.PRETRAINED)
  with serve.running(serve.create_app(predictor, predict.PRETRAINED)) as u:
    yield u


def _draw(page, digit: int, touch=None) -> None:
  """Draw `digit`'s strokes on #pad, scaled to the pad's size on screen.

  With the mouse, or with a finger when `touch` is a CDP session (Playwright's
  touchscreen can only tap).
  """
  box = page.locator("#pad").bounding_box()
  scale = box["width"] / 280

  def at(x, y):
    return box["x"] + x * scale, box["y"] + y * scale

  for stroke in STROKES[digit]:
    if touch is None:
      page.mouse.move(*at(*stroke[0]))
      page.mouse.down()
      for x, y in stroke[1:]:
        page.mouse.move(*at(x, y), steps=6)
      page.mouse.up()
      continue
    for i, (x, y) in enumerate(stroke):
      kind = "touchStart" if i == 0 else "touchMove"
      px, py = at(x, y)
      touch.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": px, "y": py}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _expect_answer(page, digit: str, total: str) -> None:
  from playwright.sync_api import expect  # pylint: disable=g-import-not-at-top
  expect(page.locator("#digit")).to_have_text(digit, timeout=15_000)
  expect(page.locator("#sum")).to_have_text(total, timeout=15_000)


@pytest.mark.parametrize("screen", ["laptop", "phone"])
def test_draw_choose_read_clear(browser, url, screen, tmp_path):
  if screen == "laptop":
    context = browser.new_context(viewport={"width": 1200, "height": 900})
  else:
    context = browser.new_context(viewport={"width": 390, "height": 844},
                                  device_scale_factor=2, is_mobile=True, has_touch=True)
  page = context.new_page()
  touch = context.new_cdp_session(page) if screen == "phone" else None
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  page.goto(url)

  # The page fits the screen's width (nothing to scroll sideways) and the pad is whole.
  assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
  box = page.locator("#pad").bounding_box()
  assert box["x"] >= 0 and box["x"] + box["width"] <= page.viewport_size["width"]
  assert box["width"] >= 250  # big enough to draw on
  assert page.evaluate("window.scrollY") == 0

  for digit, number in [(1, 0), (7, 4), (0, 9), (4, 5)]:
    page.locator("#clear").click()
    _expect_answer(page, "", "")
    page.locator("#number").select_option(str(number))
    _draw(page, digit, touch)  # the stroke's end asks for an answer
    _expect_answer(page, str(digit), str(digit + number))

  # A new number asks again, with the same drawing.
  page.locator("#number").select_option("8")
  _expect_answer(page, "4", "12")
  preview = page.evaluate(
      "Array.from(document.getElementById('preview').getContext('2d')"
      ".getImageData(0, 0, 28, 28).data).filter((v, i) => i % 4 == 0)")
  assert max(preview) == 255 and sum(v > 0 for v in preview) > 40  # the prepared digit
  if screen == "laptop":
    page.locator("#clear").click()
    _expect_answer(page, "", "")
    page.locator("#number").select_option("5")
    _draw(page, 7)
    _expect_answer(page, "7", "12")
    shot = os.environ.get("ADDER_SCREENSHOT") or str(tmp_path / "page.png")
    page.screenshot(path=shot, full_page=True)

  page.locator("#clear").click()
  _expect_answer(page, "", "")
  assert page.locator("#digit").text_content() == "" and errors == []
  assert page.evaluate("window.scrollY") == 0  # a finger drew instead of scrolling
  context.close()
