"""Browser fixtures: headless Chromium (Debian's package) driven by Playwright against the live server.

Every test here is marked ``browser``. The browser is the system one at /usr/bin/chromium (override
with HEADSEG_CHROMIUM); Playwright never downloads a browser. Screenshots go to
``test-artifacts/screenshots/`` at the repository root. The tests' page helpers, JS snippets and test
pictures are in helpers.py beside this file.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

from headseg.tests.browser.helpers import LANDSCAPE, PORTRAIT, coded_picture
from headseg.tests.support.server import comfy_server  # noqa: F401  (the shared server fixture)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("HEADSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
PACK_SCRIPT = re.compile(r"/extensions/HeadSeg/.*\.js(\?.*)?$")


def pytest_report_header(config):
    root = os.environ.get("HEADSEG_FRONTEND_ROOT")
    return f"web frontend: {root} (HEADSEG_FRONTEND_ROOT)" if root else "web frontend: the one ComfyUI pins"


def pytest_collection_modifyitems(items):
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


def _chromium_problem() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HEADSEG_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (tests/requirements-test.txt)"
    return None


@pytest.fixture(scope="session")
def browser():
    problem = _chromium_problem()
    if problem:
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> pathlib.Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def pictures(comfy_server):  # noqa: F811
    """The coded test pictures, in the server's input folder (Load Image serves them from there)."""
    for name, w, h in (LANDSCAPE, PORTRAIT):
        coded_picture(w, h).save(comfy_server.input_dir / name)
    return {"landscape": LANDSCAPE, "portrait": PORTRAIT}


class ComfyPage:
    """One browser tab on the ComfyUI web app, recording console messages and failed requests."""

    def __init__(self, browser, url: str, stub_pack_scripts: bool = False):
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.url = url
        self.console: list[dict] = []  # {"type", "text", "url"}
        self.page_errors: list[str] = []
        self.pack_scripts: list[str] = []  # pack JS files the page requested
        # Nothing outside the test server exists here: refuse such requests at once.
        self.context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())
        # Keep screenshots to the canvas: no "try the new nodes" banner.
        self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.page_errors.append(getattr(e, "stack", None) or str(e)))
        self.page.on("request", self._on_request)
        if stub_pack_scripts:
            # Baseline: the same page with the pack's scripts replaced by empty modules.
            self.context.route(
                PACK_SCRIPT, lambda route: route.fulfill(status=200, content_type="text/javascript", body="export {};")
            )

    def _on_console(self, msg):
        self.console.append({"type": msg.type, "text": msg.text, "url": (msg.location or {}).get("url", "")})

    def _on_request(self, request):
        if PACK_SCRIPT.search(request.url):
            self.pack_scripts.append(request.url)

    def open(self, timeout_ms: int = 90_000) -> "ComfyPage":
        # The test server has a fresh user folder: without these, the first page ComfyUI serves
        # opens the template browser over a blank graph, and a minimap covers a canvas corner.
        self.context.request.post(self.url + "/api/settings", data=json.dumps(FIRST_RUN_SETTINGS))
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout_ms)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.canvas && window.app.extensionManager "
            "&& window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 50",
            timeout=timeout_ms,
        )
        # Let the first canvas frames and deferred extension set-up run.
        self.page.wait_for_timeout(1500)
        return self

    def problems(self) -> list[str]:
        """Console errors and warnings plus uncaught page errors, as text.

        Failed loads of resources outside the test server are left out: the test blocks them
        (no network here), whenever ComfyUI happens to ask for them.
        """
        out = []
        for m in self.console:
            if m["type"] not in ("error", "warning"):
                continue
            if m["text"].startswith("Failed to load resource") and not m["url"].startswith(self.url):
                continue
            out.append(f"{m['type']}: {m['text']} @ {m['url']}")
        return out + [f"pageerror: {e}" for e in self.page_errors]

    def pack_problems(self) -> list[str]:
        """Console errors/warnings and page errors raised from the pack's own scripts."""
        out = []
        for m in self.console:
            if m["type"] in ("error", "warning") and (PACK_SCRIPT.search(m["url"]) or "/extensions/HeadSeg/" in m["text"]):
                out.append(f"{m['type']}: {m['text']} @ {m['url']}")
        return out + [f"pageerror: {e}" for e in self.page_errors if "/extensions/HeadSeg/" in e or "headseg" in e.lower()]

    def close(self):
        self.context.close()


@pytest.fixture(scope="session")
def comfy_url(comfy_server):  # noqa: F811
    return comfy_server.url


@pytest.fixture(scope="session")
def _shared_tab(browser, comfy_url):
    tab = ComfyPage(browser, comfy_url).open()
    try:
        yield tab
    finally:
        tab.close()


@pytest.fixture
def comfy_page(_shared_tab):
    """The shared tab with the ComfyUI app, dialogs and toasts closed, an empty graph at 100 % zoom, no node
    outputs.

    One tab serves these tests (opening the app costs seconds on a small CPU); each test starts
    from a cleared graph, and the console messages it causes are the ones recorded from its start.
    """
    page = _shared_tab.page
    page.keyboard.press("Escape")
    page.evaluate(
        "() => { if (app.canvas.graph !== app.graph) app.canvas.setGraph(app.graph);"  # out of a subgraph
        " app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];"
        # outputs kept by an earlier test would be restored by a picker that gets the same node id
        " for (const id of Object.keys(app.nodeOutputs ?? {})) delete app.nodeOutputs[id];"
        # ... and those the open workflow's change tracker keeps of the real runs it queued: undo hands them back
        # as app.nodeOutputs, without the runs a test fed its nodes (whether an earlier test's real run got there
        # depends on timing: ComfyUI drops 'executed' messages that come before its /prompt answer)
        " const tracker = app.extensionManager.workflow?.activeWorkflow?.changeTracker; if (tracker) delete tracker.nodeOutputs;"
        # the toast ComfyUI keeps up once Nodes 2.0 was turned on (vue_nodes) covers the canvas's bottom centre
        " app.extensionManager.toast?.removeAll?.();"
        " app.canvas.setDirty(true, true); }"
    )
    _shared_tab.console.clear()
    _shared_tab.page_errors.clear()
    yield _shared_tab


@pytest.fixture(scope="module")
def tabs_without_and_with_pack(browser, comfy_url):
    """Two tabs opened on the app for the tests of one module -> (baseline, real): the baseline's pack scripts
    are empty modules, the real one loads them. Their console messages are recorded from their page loads."""
    tabs = [ComfyPage(browser, comfy_url, stub_pack_scripts=True).open()]
    try:
        tabs.append(ComfyPage(browser, comfy_url).open())
        yield tuple(tabs)
    finally:
        for tab in tabs:
            tab.close()


@pytest.fixture
def open_page(browser, comfy_url):
    """Factory: open_page(stub_pack_scripts=False) -> ComfyPage (closed after the test)."""
    tabs = []

    def make(stub_pack_scripts: bool = False) -> ComfyPage:
        tab = ComfyPage(browser, comfy_url, stub_pack_scripts=stub_pack_scripts).open()
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        tab.close()

