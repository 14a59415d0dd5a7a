"""Make docs/inspector.png: notebook 01 run in JupyterLab, the token inspector screenshotted in Chromium.

    KDVIZ_CACHE_DIR=... .venv/bin/python docs/screenshot.py [--out docs/inspector.png] [--limit 8]

Runs kdviz/notebooks/01_token_inspector.ipynb with its defaults (the real pair on zoo:topics, so
`kdviz zoo fetch` must have run) in a temporary JupyterLab on 127.0.0.1, as tests/test_browser.py
does: Playwright drives Debian's Chromium at /usr/bin/chromium (`playwright install` is not used).
It pins one response token and saves the inspector's output area.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
ALL_RAN = """() => document.querySelector(".jp-OutputArea-output[data-mime-type*='error']")
  || [...document.querySelectorAll(".jp-CodeCell .jp-InputPrompt")].every((p) => /\\[\\d+\\]/.test(p.textContent))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, state: Path) -> tuple[subprocess.Popen, str, str]:
    (state / "config" / "labconfig").mkdir(parents=True)
    (state / "config" / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(state / "config"),
               JUPYTER_RUNTIME_DIR=str(state / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(state / "settings"))
    port, token = free_port(), os.urandom(12).hex()
    log = open(state / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"JupyterLab did not start:\n{(state / 'lab.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return server, url, token
        except OSError:
            time.sleep(0.3)


def shoot(url: str, token: str, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/lab/tree/01_token_inspector.ipynb?reset&token={token}")
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
        page.keyboard.press("Control+b")  # hide the file browser
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
        for _ in range(3):  # the first Run All right after the kernel starts is sometimes not taken up
            page.locator(".jp-Notebook .jp-Cell").first.click()
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            try:
                page.wait_for_function("p => p.textContent !== '[ ]:'", arg=prompts.first.element_handle(),
                                       timeout=10_000)
                break
            except Exception:
                continue
        page.wait_for_function(ALL_RAN, timeout=600_000)
        errors = page.locator(".jp-OutputArea-output[data-mime-type*='error']")
        if errors.count():
            raise SystemExit(errors.first.inner_text())
        strip = page.locator(".kdviz-strip").first
        strip.scroll_into_view_if_needed()
        spans = strip.locator("span[data-index]")
        titles = spans.evaluate_all("spans => spans.map((s) => s.title)")
        hard = [i for i, t in enumerate(titles) if t.endswith("hard")]
        spans.nth(hard[len(hard) // 3] if hard else 0).click()  # pin a hard response token
        page.mouse.move(1275, 450)
        page.wait_for_timeout(1500)
        area = page.locator(".jp-OutputArea-output", has=page.locator(".kdviz-strip")).first
        area.scroll_into_view_if_needed()
        area.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "inspector.png"))
    parser.add_argument("--limit", type=int, default=8, help="the notebook's `limit` parameter (default 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdviz-shot-") as scratch:
        root, state = Path(scratch) / "root", Path(scratch) / "state"
        root.mkdir()
        notebook = load_notebook_node(str(ROOT / "kdviz" / "notebooks" / "01_token_inspector.ipynb"))
        notebook = parameterize_notebook(notebook, {"limit": args.limit, "out_dir": str(Path(scratch) / "out")})
        nbformat.write(notebook, root / "01_token_inspector.ipynb")
        server, url, token = start_lab(root, state)
        try:
            shoot(url, token, Path(args.out))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(20)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
