"""HeadSeg's web extension in the ComfyUI app: it loads without adding console errors or warnings,
leaves a graph without HeadSeg nodes unchanged, and its nodes, docs pages and templates are offered.
"""

from __future__ import annotations

import json
import re

import pytest

from headseg.tests.browser.helpers import NODE_IDS, PICKER, REPO_ROOT, WORKFLOWS_DIR, example_names, settle


def test_extension_loads_without_console_errors(tabs_without_and_with_pack):
    baseline, real = tabs_without_and_with_pack
    assert real.pack_scripts, "the page did not request the pack's scripts from /extensions/HeadSeg/"
    assert real.page.evaluate("() => app.extensions.some(e => e.name === 'HeadSeg.Frontend')")
    assert not baseline.page.evaluate("() => app.extensions.some(e => e.name === 'HeadSeg.Frontend')")
    # Let the default graph draw for a while with the extension active.
    real.page.mouse.move(700, 450)
    settle(real.page, 1000)
    known = set(baseline.problems())
    added = [p for p in real.problems() if p not in known]
    assert added == [], "console errors/warnings that appear only with HeadSeg's scripts:\n" + "\n".join(added)
    assert real.pack_problems() == []


def test_workflow_without_headseg_nodes_is_unchanged(tabs_without_and_with_pack):
    """The default graph (no HeadSeg node) loads and serialises exactly as without the extension."""
    js = "() => JSON.stringify(app.graph.serialize().nodes.map(n => [n.type, n.widgets_values, n.size, n.inputs?.length, n.outputs?.length]).sort())"
    baseline, real = tabs_without_and_with_pack
    base_nodes = json.loads(baseline.page.evaluate(js))
    assert len(base_nodes) > 3, "the default graph did not load"
    assert json.loads(real.page.evaluate(js)) == base_nodes


# The node search box's text field: PrimeVue's autocomplete in the frontend ComfyUI 0.3.75 pins (1.32.9),
# a combobox in a dialog of its own in newer ones (1.58).
NODE_SEARCH_INPUT = ".comfy-vue-node-search-box input, [role=dialog] input[role=combobox]"


def test_headseg_nodes_in_node_search(comfy_page, comfy_server, screenshots):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page = comfy_page.page
    info = comfy_server.object_info()
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"server does not list {missing}"
    registered = page.evaluate("(ids) => ids.filter(id => !LiteGraph.registered_node_types[id])", NODE_IDS)
    assert registered == []

    page.evaluate("() => app.graph.clear()")
    settle(page)
    search = None
    for _ in range(3):  # a double-click can land while the app is still busy after the page load
        page.mouse.dblclick(700, 500)
        try:
            search = page.wait_for_selector(NODE_SEARCH_INPUT, timeout=8_000)
            break
        except PlaywrightTimeoutError:
            page.keyboard.press("Escape")
            settle(page, 500)
    if search is None:
        page.screenshot(path=str(screenshots / "node-search-failed.png"))
    assert search is not None, "double-clicking the empty canvas did not open the node search box (3 tries)"
    search.type("HeadSeg")
    settle(page, 1200)
    shown = page.evaluate(
        "() => [...document.querySelectorAll('.p-autocomplete-option, .comfy-vue-node-search-container li,"
        " [role=dialog] [role=option]')]"
        ".map(e => e.textContent)"
    )
    page.screenshot(path=str(screenshots / "node-search.png"))
    text = "\n".join(shown)
    for node_id in NODE_IDS:
        title = info[node_id]["display_name"]
        assert title in text, f"{title!r} ({node_id}) not offered by the node search; offered:\n{text}"


DOCS_DIR = REPO_ROOT / "js" / "docs"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_docs_served_and_cover_inputs(comfy_server, node_id):
    """Each node has js/docs/<id>.md, served where ComfyUI's help panel looks, naming every input and output."""
    info = comfy_server.object_info()[node_id]
    assert info["python_module"].startswith("custom_nodes.HeadSeg"), info["python_module"]
    text = comfy_server.get_bytes(f"/extensions/HeadSeg/docs/{node_id}.md").decode()
    assert text == (DOCS_DIR / f"{node_id}.md").read_text()
    assert text.startswith("# ")
    inputs = [name for section in ("required", "optional") for name in info["input"].get(section, {})]
    missing = [name for name in inputs if f"`{name}`" not in text]
    assert missing == [], f"{node_id} docs do not mention inputs {missing}"
    outputs = info.get("output_name", [])
    missing = [name for name in outputs if f"`{name}`" not in text]
    assert missing == [], f"{node_id} docs do not mention outputs {missing}"


JS_OPEN_HELP = """
async (nodeId) => {
  // The node's help page, opened the way ComfyUI's own buttons do (its own stores): the node library's
  // (?) button in the frontend ComfyUI 0.3.75 pins (1.32.9); newer frontends (1.58) have no such store
  // and show the page in the right side panel's Info tab of the selected node.
  const host = [...document.querySelectorAll('body *')].find(e => e.__vue_app__);
  const stores = host.__vue_app__.config.globalProperties.$pinia._s;
  if (stores.has('nodeHelp')) {
    const def = stores.get('nodeDef').nodeDefsByName[nodeId];
    if (app.extensionManager.sidebarTab.activeSidebarTabId !== 'node-library')
      app.extensionManager.sidebarTab.toggleSidebarTab('node-library');
    await new Promise(r => setTimeout(r, 300));
    stores.get('nodeHelp').openHelp(def);
    return;
  }
  app.graph.clear();
  const node = LiteGraph.createNode(nodeId);
  node.pos = [100, 100];
  app.graph.add(node);
  app.canvas.selectNode(node);
  await new Promise(r => setTimeout(r, 300));
  stores.get('rightSidePanel').openPanel('info');
}
"""

JS_CLOSE_HELP = """
() => {
  const host = [...document.querySelectorAll('body *')].find(e => e.__vue_app__);
  const stores = host.__vue_app__.config.globalProperties.$pinia._s;
  if (stores.has('nodeHelp')) app.extensionManager.sidebarTab.toggleSidebarTab('node-library');
  else stores.get('rightSidePanel').closePanel();
}
"""


def test_node_docs_render_in_help_panel(comfy_page, comfy_server, screenshots):
    page = comfy_page.page
    for node_id in NODE_IDS:
        heading = (DOCS_DIR / f"{node_id}.md").read_text().splitlines()[0].lstrip("# ").strip()
        second = [ln for ln in (DOCS_DIR / f"{node_id}.md").read_text().splitlines()[1:] if ln.strip()][0]
        page.evaluate(JS_OPEN_HELP, node_id)
        page.get_by_role("heading", name=heading).first.wait_for(timeout=15_000)
        # the page's text too: on 1.58 the heading can be the panel's title (the node's), shown before the page
        text = re.sub(r"[`*]", "", second)[:40]
        page.wait_for_function("(text) => document.body.innerText.includes(text)", arg=text, timeout=15_000)
        if node_id == PICKER:
            page.screenshot(path=str(screenshots / "node-docs.png"))
    page.evaluate(JS_CLOSE_HELP)
    assert comfy_page.pack_problems() == []


def test_the_menu_path_readme_names_opens_the_templates(open_page):
    """README (Install) and tests/serve.sh tell a new user where the templates are: each step of that path
    exists in this ComfyUI's menu (its frontend has no Workflow menu) and leads to HeadSeg's templates."""
    readme = (REPO_ROOT / "README.md").read_text()
    path = re.search(r"templates dialog \(\*([^*]+)\*", readme).group(1).split(" → ")
    serve = re.search(r"->  (.+) > HeadSeg\"", (REPO_ROOT / "tests" / "serve.sh").read_text()).group(1)
    assert re.sub(r" \([^)]*\)", "", serve).split(" > ") == path, (serve, path)

    page = open_page().page  # a tab of its own: the templates dialog stays open at the end
    for step in path:
        if step == "ComfyUI menu":  # the menu the logo at the top left opens
            page.locator(".comfyui-logo").first.click()
            continue
        item = page.get_by_role("menuitem", name=step, exact=True).first
        try:
            item.wait_for(timeout=5_000)
        except Exception:
            labels = page.evaluate("() => Array.from(document.querySelectorAll('[role=menuitem]'), e => e.textContent.trim())")
            pytest.fail(f"README's menu path {' → '.join(path)!r}: no menu item {step!r} (the menu shows {labels})")
        item.click()
    page.wait_for_selector("[data-testid='template-workflows-content']", timeout=30_000)
    page.get_by_role("dialog").get_by_text("HeadSeg", exact=True).first.click()
    for name in example_names():
        page.wait_for_selector(f"[data-testid='template-workflow-{name}']", timeout=15_000)


JS_CLOSE_ISSUES = """
() => {
  const host = [...document.querySelectorAll('body *')].find(e => e.__vue_app__);
  host.__vue_app__.config.globalProperties.$pinia._s.get('rightSidePanel').closePanel();
  app.extensionManager.toast?.removeAll?.();
}
"""


def _check_missing_checkpoint_offered(page, screenshots, name):
    """The frontend ComfyUI 0.3.75 pins (1.32.9) lists a missing model in a Missing Models dialog; newer ones
    (1.58) raise a toast whose View details opens the right side panel's Issues tab, which lists it
    under Missing Models. Either way: the checkpoint's folder and name, and one Download button for it."""
    dialog = page.get_by_role("dialog").filter(has_text="Missing Models")
    details = page.get_by_role("button", name="View details")
    dialog.or_(details).first.wait_for(timeout=15_000)
    if dialog.count():
        assert "checkpoints / v2-1_512-ema-pruned.safetensors" in dialog.inner_text()
        assert dialog.get_by_role("button", name="Download").count() == 1
        page.keyboard.press("Escape")
        dialog.wait_for(state="detached", timeout=15_000)
        return
    details.first.click()
    download = page.get_by_role("button", name="Download v2-1_512-ema-pruned.safetensors", exact=True)
    download.first.wait_for(timeout=15_000)
    assert download.count() == 1
    assert page.get_by_text("Missing Models").first.is_visible()
    # the innermost element holding the download button and the folder: the checkpoint's entry
    entry = page.locator("div").filter(has=download).filter(has_text="checkpoints").last
    assert "v2-1_512-ema-pruned.safetensors" in entry.inner_text()
    page.screenshot(path=str(screenshots / f"template-{name}-missing-models.png"))
    page.evaluate(JS_CLOSE_ISSUES)
    download.wait_for(state="detached", timeout=15_000)


def test_example_workflows_are_templates_and_load(comfy_page, comfy_server, screenshots):
    """Every example is offered as a template and loads with its nodes; ComfyUI offers the download of
    the checkpoint it needs when it is missing."""
    names = example_names()
    assert names, "no example workflows in example_workflows/"
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed.get("HeadSeg", [])) == names

    page = comfy_page.page
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.wait_for_selector("[data-testid='template-workflows-content']", timeout=30_000)
    # The pack's templates are listed under its own entry in the dialog's side navigation.
    page.get_by_role("dialog").get_by_text("HeadSeg", exact=True).first.click()
    for name in names:
        page.wait_for_selector(f"[data-testid='template-workflow-{name}']", timeout=15_000)
    page.screenshot(path=str(screenshots / "templates.png"))

    for i, name in enumerate(names):
        if i:  # the dialog closes after loading a template
            page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.wait_for_selector("[data-testid='template-workflows-content']", timeout=30_000)
            page.get_by_role("dialog").get_by_text("HeadSeg", exact=True).first.click()
        page.click(f"[data-testid='template-workflow-{name}']")
        expected = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
        want = sorted(n["type"] for n in expected["nodes"])
        page.wait_for_function(
            "(want) => JSON.stringify(app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(want)",
            arg=want,
            timeout=30_000,
        )
        settle(page, 800)
        page.screenshot(path=str(screenshots / f"template-{name}.png"))
        # the test server has no SD2.1 checkpoint: ComfyUI names the one the template loads and offers
        # its download (the Load Checkpoint node's properties.models), then closes what it opened
        _check_missing_checkpoint_offered(page, screenshots, name)
    assert comfy_page.pack_problems() == []
