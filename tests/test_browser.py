"""The notebooks in a real browser: JupyterLab on 127.0.0.1, driven by Playwright in Debian's Chromium.

Each test opens a notebook (copied into a temporary root with small parameters injected), runs
all cells from the Run menu, then uses the widgets as a person would: click and hover tokens,
press Run, drag a slider. What it checks is measured in the page (box sizes, computed colours,
the text on screen), not read back from Python. Screenshots go to $KDVIZ_SCREENSHOTS, else to a
folder under pytest's temporary directory; the folder is printed.

Needs the `playwright` package (the `test` extra) and Debian's `chromium` at /usr/bin/chromium
(.ci/run installs it); `playwright install` is never used.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from kdviz.files import cache_root

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOKS = Path(__file__).resolve().parents[1] / "kdviz" / "notebooks"
SMALL = {
    "01_token_inspector": {"limit": 4},
    "03_distill": {"teachers": ["zoo:teacher-s"], "steps": 4, "limit": 24, "compare": []},
    "05_workshop": {},
    "07_rollouts": {"teacher": "zoo:teacher-s", "student": "zoo:student", "limit": 2, "max_new_tokens": 12},
    "08_cross_tokenizer": {"limit": 2, "metric": "kind"},
}
VIEWPORT = {"width": 1280, "height": 900}

# WCAG contrast of every token's text against the background it is drawn on (the nearest
# ancestor with a non-transparent background), and whether anything fades the token.
CONTRAST_JS = """box => {
  const rgb = (css) => css.match(/[\\d.]+/g).map(Number);
  const channel = (c) => (c /= 255) <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  return [...box.querySelectorAll("span[title]")].map((span) => {
    const [a, b] = [luminance(rgb(getComputedStyle(span).color)), luminance(background(span))];
    return { text: span.textContent, ratio: (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05),
             opacity: Number(getComputedStyle(span).opacity) };
  });
}"""

# Every span with a line break inside: the text after the break starts at the left edge of the box.
LINES_JS = """box => {
  const left = box.getBoundingClientRect().left + box.clientLeft + parseFloat(getComputedStyle(box).paddingLeft);
  return [...box.querySelectorAll("span[title]")].filter((s) => s.querySelector("br") && s.lastChild.nodeName !== "BR")
    .map((span) => { const rects = span.getClientRects();
                     return { lines: rects.length, startsAt: rects[rects.length - 1].left - left }; });
}"""

# Every code cell has run (a number in its prompt), or one failed.
DONE_OR_FAILED_JS = """() => document.querySelector(".jp-OutputArea-output[data-mime-type*='error']")
  || [...document.querySelectorAll(".jp-CodeCell .jp-InputPrompt")].every((p) => /\\[\\d+\\]/.test(p.textContent))"""
# Whether a token is inside the visible part of its strip.
IN_VIEW_JS = """span => { const box = span.closest(".kdviz-strip").getBoundingClientRect();
                          const rect = span.getBoundingClientRect();
                          return rect.top >= box.top && rect.bottom <= box.bottom; }"""


@dataclass
class Lab:
    url: str
    token: str
    root: Path


@pytest.fixture(scope="module")
def sync_api():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebooks(root: Path) -> None:
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    for name, parameters in SMALL.items():
        notebook = parameterize_notebook(load_notebook_node(str(NOTEBOOKS / f"{name}.ipynb")), parameters)
        nbformat.write(notebook, root / f"{name}.ipynb")


@pytest.fixture(scope="module")
def lab(sync_api, tmp_path_factory):
    """JupyterLab on 127.0.0.1 (free port, a token, a temporary root and config), stopped afterwards."""
    root = tmp_path_factory.mktemp("lab")
    write_notebooks(root)
    state = tmp_path_factory.mktemp("lab-state")
    (state / "config" / "labconfig").mkdir(parents=True)  # no "get Jupyter news?" toast over the page
    (state / "config" / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    cache = state / "cache"  # fresh for analyses; the converted models (the real teacher) are the session's
    cache.mkdir()
    for folder in ("zoo", "gguf"):
        if (cache_root() / folder).is_dir():
            (cache / folder).symlink_to(cache_root() / folder)
    env = dict(os.environ, KDVIZ_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1",
               JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_RUNTIME_DIR=str(state / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(state / "settings"))
    port, token = free_port(), os.urandom(12).hex()
    with open(state / "lab.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start; its log:\n{(state / 'lab.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        yield Lab(url, token, root)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(sync_api):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory, pytestconfig) -> Path:
    folder = Path(os.environ.get("KDVIZ_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    pytestconfig.pluginmanager.get_plugin("terminalreporter").write_line(f"browser test screenshots: {folder}")
    return folder


@pytest.fixture
def page(browser, shots, request):
    """A fresh page that collects uncaught JavaScript errors; its last view is saved as <test>-end.png."""
    page = browser.new_page(viewport=VIEWPORT)
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    page.screenshot(path=shots / f"{request.node.name}-end.png")
    page.close()


def run_notebook(page, lab: Lab, name: str) -> None:
    """Open the notebook, wait for its kernel, Run > Run All Cells, wait until every cell ran."""
    page.goto(f"{lab.url}/lab/tree/{name}.ipynb?reset&token={lab.token}")  # reset: only this notebook open
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=90_000)
    page.keyboard.press("Control+b")  # hide the file browser: the notebook gets the width a reader gives it
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
    for _ in range(3):  # right after the kernel starts, the first Run All is sometimes not taken up
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            page.wait_for_function("p => p.textContent !== '[ ]:'", arg=prompts.first.element_handle(),
                                   timeout=30_000)  # (a busy machine starts the first cell late)
            break
        except Exception:
            continue
    page.wait_for_function(DONE_OR_FAILED_JS, timeout=360_000)  # the real pair, on a shared 2-core machine
    errors = page.locator(".jp-OutputArea-output[data-mime-type*='error']")
    assert errors.count() == 0, errors.first.inner_text()


STRIP_PAGE_JS = """async ([esm, tokens]) => {
  const state = { tokens, selected: -1, hovered: -1, highlighted: [] };
  const handlers = {};
  const model = { get: (k) => state[k], set: (k, v) => { state[k] = v; }, save_changes: () => {},
                  on: (e, f) => { (handlers[e] ||= []).push(f); }, off: () => {} };
  window.strip = { state, fire: (k, v) => { state[k] = v; (handlers["change:" + k] || []).forEach((f) => f()); } };
  const url = URL.createObjectURL(new Blob([esm], { type: "text/javascript" }));
  (await import(url)).default.render({ model, el: document.getElementById("host") });
}"""


def layout_tokens() -> list[dict]:
    """A 750-character line, an indented line after a newline inside a token, one token wider
    than the box, then 60 short lines so that the box scrolls."""
    from kdviz.widgets.inspector import token_style

    texts = (["word·"] * 150 + ["end↵····", "indented", "·" + "a" * 150 + "↵"]
             + [f"line·{i}↵" for i in range(60)])
    style = token_style("rgb(253, 187, 132)", hard=False, prompt=False, dim=False)
    return [{"text": text, "style": style, "title": f"token {i}"} for i, text in enumerate(texts)]


def test_strip_wraps_breaks_and_scrolls_inside_its_box_in_chromium(page, shots):
    from kdviz.widgets.strip import TokenStrip

    tokens = layout_tokens()
    page.set_content('<div id="host" style="width: 500px"></div>')
    page.evaluate(STRIP_PAGE_JS, [TokenStrip._esm, tokens])
    box = page.locator(".kdviz-strip")
    spans = box.locator("span[title]")
    width = box.evaluate("b => ({scroll: b.scrollWidth, client: b.clientWidth})")
    assert width["scroll"] <= width["client"] < 500, width
    tops = spans.evaluate_all("spans => spans.slice(0, 150).map((s) => s.offsetTop)")
    assert len(set(tops)) >= 10  # 750 characters of one line wrap, between tokens
    assert box.evaluate(LINES_JS) == [{"lines": 2, "startsAt": 0}]  # "end↵····": the indent starts a line
    assert spans.nth(152).evaluate("s => s.getClientRects().length") >= 2  # a token wider than the box wraps
    page.evaluate(f"strip.fire('selected', {len(tokens) - 1})")  # pin the last token, far below the fold
    page.wait_for_function(IN_VIEW_JS, arg=spans.nth(len(tokens) - 1).element_handle(), timeout=5_000)
    spans.nth(len(tokens) - 2).click()
    assert page.evaluate("strip.state.selected") == len(tokens) - 2
    page.screenshot(path=shots / "strip_layout.png")

    page.set_content(f'<div style="width: 500px">{TokenStrip(tokens=tokens).static_html()}</div>')
    static = page.locator(".kdviz-strip").evaluate("b => ({scroll: b.scrollWidth, client: b.clientWidth})")
    assert static["scroll"] <= static["client"] < 500, static
    assert page.locator(".kdviz-strip").evaluate(LINES_JS) == [{"lines": 2, "startsAt": 0}]
    assert page.errors == []


def test_report_summary_fits_its_box_in_chromium(page, pair, tmp_path, shots):
    from kdviz import analyze
    from kdviz.report import write_report
    from test_train import RECORDS

    report = write_report(analyze(pair, RECORDS[:4], cache=False, progress=False), tmp_path / "report.html")
    page.set_viewport_size({"width": 900, "height": 900})
    page.goto(report.as_uri())
    summary = page.locator("pre").evaluate("p => ({scroll: p.scrollWidth, client: p.clientWidth})")
    assert summary["scroll"] <= summary["client"], summary
    page.screenshot(path=shots / "report.png")


def test_inspector_pins_the_clicked_token_and_its_text_fits_and_reads(page, lab, shots):
    from playwright.sync_api import expect

    run_notebook(page, lab, "01_token_inspector")
    live = page.locator(".kdviz-strip").first  # the widget; a static copy follows further down
    live.scroll_into_view_if_needed()
    expect(live.locator("span[data-index]").first).to_be_visible()
    page.screenshot(path=shots / "01_inspector.png")

    for box in page.locator(".kdviz-strip").all():  # the live strip and the static copy
        box.scroll_into_view_if_needed()
        width = box.evaluate("b => ({scroll: b.scrollWidth, client: b.clientWidth})")
        assert width["scroll"] <= width["client"], f"the strip overflows its box: {width}"
        tokens = box.evaluate(CONTRAST_JS)
        low = min(tokens, key=lambda t: t["ratio"])
        assert low["ratio"] >= 4.5, f"{len(tokens)} tokens, the least readable: {low}"
        assert all(t["opacity"] == 1 for t in tokens)
        assert all(b["lines"] >= 2 and abs(b["startsAt"]) < 1 for b in box.evaluate(LINES_JS))

    live.scroll_into_view_if_needed()
    spans = live.locator("span[data-index]")
    marks = spans.evaluate_all("spans => spans.map((s) => [s.title, s.dataset.mark])")
    worst = [mark for _, mark in marks].index("pinned")  # the notebook's jump_to_worst() pinned it
    clicked = next(i for i, (title, mark) in enumerate(marks) if not title.endswith("prompt") and i != worst)
    position = marks[clicked][0].split(":")[0]  # "position 17"
    detail, preview = page.locator(".kdviz-detail"), page.locator(".kdviz-strip-preview")
    spans.nth(clicked).click()
    expect(detail).to_contain_text(f"at {position} ")
    expect(detail).to_contain_text("KL = TKD + u · DKD")
    detail.hover()  # to the panel to read it ...
    spans.nth(clicked - 1).hover()  # ... crossing another token on the way
    expect(preview).to_contain_text(f"hover: {spans.nth(clicked - 1).text_content()}")
    page.screenshot(path=shots / "01_pinned_while_hovering.png")
    page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] // 2)  # off the strip
    expect(preview).to_contain_text("pinned: ")
    page.wait_for_timeout(1000)  # time for any hover to reach the kernel and come back
    expect(detail).to_contain_text(f"at {position} ")
    expect(detail).to_contain_text("KL = TKD + u · DKD")
    expect(spans.nth(clicked)).to_have_attribute("data-mark", "pinned")

    page.get_by_role("button", name="jump to the worst k").click()
    expect(spans.nth(worst)).to_have_attribute("data-mark", "pinned")
    expect(detail).to_contain_text(f"at {marks[worst][0].split(':')[0]} ")
    assert not marks[worst][0].endswith("prompt")
    page.wait_for_function(IN_VIEW_JS, arg=spans.nth(worst).element_handle(), timeout=5_000)  # scrolled into view
    colour_by = page.locator(".widget-dropdown", has=page.get_by_text("colour by")).locator("select")
    colour_by.select_option(label="kl: KL(p || q)")
    expect(page.locator(".kdviz-legend").first).to_contain_text("kl: KL(p || q)")
    expect(spans.nth(worst)).to_have_attribute("data-mark", "pinned")  # a new colouring keeps the pin
    expect(detail).to_contain_text(f"at {marks[worst][0].split(':')[0]} ")
    page.screenshot(path=shots / "01_worst_k.png")
    assert page.errors == []


def test_launcher_shows_progress_in_the_notebook_and_adds_a_row(page, lab, shots):
    from playwright.sync_api import expect

    run_notebook(page, lab, "03_distill")
    text = page.locator(".kdviz-progress-text")
    text.scroll_into_view_if_needed()
    page.evaluate("""() => {
      const bar = document.querySelector(".kdviz-progress .progress-bar");
      const text = document.querySelector(".kdviz-progress-text");
      window.kdvizSeen = [];
      const note = () => window.kdvizSeen.push([parseFloat(bar.style.width), text.innerText]);
      new MutationObserver(note).observe(bar, { attributes: true });
      new MutationObserver(note).observe(text, { childList: true, subtree: true, characterData: true });
    }""")
    page.locator("button.jupyter-button", has_text="Run").click()
    expect(text).to_contain_text(" left", timeout=120_000)
    page.screenshot(path=shots / "03_running.png")
    expect(text).to_contain_text("done", timeout=120_000)
    rows = page.locator(".kdviz-runs tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("atkd")
    page.screenshot(path=shots / "03_done.png")

    # what the run did to each probe token: a strip coloured by the change in KL; a click plots its trajectory
    tokens = page.locator(".kdviz-strip").last.locator("span[title]")
    expect(tokens.first).to_be_visible(timeout=30_000)
    assert re.search(r"KL [\d.]+ -> [\d.]+ \([+-][\d.]+, (learned|unchanged|worse)\)", tokens.nth(3).get_attribute("title"))
    tokens.nth(3).click()
    plot = page.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="at position"))
    expect(plot).to_have_count(1, timeout=30_000)
    expect(plot.locator(".scatterlayer .trace")).to_have_count(3, timeout=30_000)  # KL, TKD, DKD of the run
    plot.scroll_into_view_if_needed()
    page.screenshot(path=shots / "03_token_trajectory.png", full_page=True)

    seen = page.evaluate("window.kdvizSeen")
    widths = [width for width, _ in seen]
    assert any(0 < w < 100 for w in widths) and widths[-1] == 100, widths  # the bar moved, then filled
    assert any(re.fullmatch(r"step [1-3]/4 · loss \d+\.\d{3} · .+ left", t) for _, t in seen), seen
    log_console = page.locator(".jp-LogConsoleStatusItem")  # JupyterLab shows it once anything is logged
    assert log_console.count() == 0 or not log_console.is_visible()
    assert page.errors == []


def drag(page, slider, pixels: int) -> None:
    """Drag the slider's handle sideways with the mouse."""
    handle = slider.locator(".noUi-handle").bounding_box()
    x, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + pixels, y, steps=6)
    page.mouse.up()


def test_workshop_readout_follows_a_slider(page, lab, shots):
    from playwright.sync_api import expect

    run_notebook(page, lab, "05_workshop")
    readout = page.locator(".kdviz-readout")
    readout.scroll_into_view_if_needed()
    expect(readout).to_contain_text("at temperature T = 1.00")
    before = readout.inner_text()
    slider = page.locator(".widget-slider", has=page.get_by_text("student q(target)", exact=True))
    drag(page, slider, 90)
    expect(readout).not_to_have_text(before)
    value = float(slider.locator(".widget-readout").inner_text())
    assert value > 0.3
    expect(readout).to_contain_text(f"(slider {value:.2f})")
    temperature = page.locator(".widget-slider", has=page.get_by_text("temperature", exact=True))
    drag(page, temperature, 60)
    shown = float(temperature.locator(".widget-readout").inner_text())
    expect(readout).to_contain_text(f"at temperature T = {shown:.2f}")
    expect(readout).to_contain_text("softens both; the sliders set the probabilities at T = 1")
    page.screenshot(path=shots / "05_workshop.png")
    assert page.errors == []


def test_rollout_viewer_pins_a_token_of_a_student_sample(page, lab, shots):
    from playwright.sync_api import expect

    run_notebook(page, lab, "07_rollouts")
    responses = page.locator(".kdviz-rollouts").first  # the widget; a static copy follows further down
    responses.scroll_into_view_if_needed()
    expect(responses).to_contain_text("the data's response")
    expect(responses).to_contain_text("student sample 1")
    strips = responses.locator(".kdviz-strip")
    expect(strips).to_have_count(3)  # the data's response, then the student's two samples
    sample = strips.nth(2).locator("span[data-index]")
    expect(sample.first).to_be_visible()
    title = sample.nth(2).get_attribute("title")
    assert title.startswith("position ") and " rkl " in title  # coloured by reverse KL by default
    sample.nth(2).click()
    detail = page.locator(".kdviz-rollout-detail")
    expect(detail).to_contain_text("student sample 1")
    expect(detail).to_contain_text(f"at {title.split(':')[0]} ")
    expect(detail).to_contain_text("teacher top-k")
    expect(sample.nth(2)).to_have_attribute("data-mark", "pinned")
    page.screenshot(path=shots / "07_rollout_pinned.png")
    assert page.errors == []


def test_group_viewer_draws_a_merged_group_as_one_box_and_pins_both_sides(page, lab, shots):
    from playwright.sync_api import expect

    run_notebook(page, lab, "08_cross_tokenizer")
    strip = page.locator(".kdviz-groups .kdviz-strip").first  # the widget; a static copy follows further down
    strip.scroll_into_view_if_needed()
    merged = strip.locator("span[title*='(merged-one-side)']").first
    expect(merged).to_be_visible()
    text, title = merged.text_content(), merged.get_attribute("title")
    assert "¦" in text and text.replace("¦", "") in title  # its parts, in one box
    box = merged.evaluate("s => [getComputedStyle(s).boxShadow, getComputedStyle(s).backgroundColor]")
    assert "inset" in box[0] and box[1] == "rgb(158, 202, 225)"  # framed, and coloured by kind
    merged.click()
    detail = page.locator(".kdviz-group-detail")
    expect(detail).to_contain_text("merged-one-side")
    expect(detail).to_contain_text("teacher")
    for part in text.split("¦"):
        expect(detail).to_contain_text(part)
    expect(merged).to_have_attribute("data-mark", "pinned")
    page.screenshot(path=shots / "08_group_pinned.png")
    assert page.errors == []
