"""What artists see: the ComfyUI web page (headless Chromium) of the real server of tests/server_fixture.py opens every
workflow of workflows/ the way the Templates menu does, and nothing is missing or wrong.

For each workflow file:
* ComfyUI serves it as a template of the pack (``/api/workflow_templates/<pack folder>/<file>``), byte for byte;
* the frontend loads it (``app.loadGraphData``) with no missing node type (its own missing-node list, caught by a probe
  extension, and its error list), no error but the model files and the user's own media (an audio or control video
  for Load Audio / Load Video) a test server does not have (its Errors tab lists exactly the workflow's model and
  media files and flags only their loaders), no dialog or error toast, no uncaught exception
  or console error, and every node's widget values read back as tests/workflow_check.py says the frontend loads them
  (the file's values, then the defaults of widgets the file predates);
* the prompt the frontend builds from it (``app.graphToPrompt``, what the Run button queues) is the one
  tests/workflow_check.py builds, and passes ComfyUI's server-side validation except for the model and media files.

The frontend is the one tests/requirements.txt pins (ComfyUI 0.33's); its error lists are read from its stores.
A control workflow with an unknown node type must be caught by the same checks (so they can fail). One loaded
workflow is screenshotted; ``SVA_UPDATE_SCREENSHOT=1`` writes it to docs/workflow_screenshot.png for the README
(install a CJK font first, e.g. Debian's fonts-wqy-microhei: Wan's usual negative prompt is Chinese).

Needs Chromium (Debian: ``apt-get install chromium``; .ci/run installs it) and ComfyUI; skipped with the reason
otherwise, or failed in strict mode (conftest.py). The browser is driven over the DevTools protocol
(tests/headless_browser.py): no extra Python package.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from pathlib import Path

import pytest

import workflow_check as wc
from headless_browser import Browser, find_chromium
from pack import REPO_ROOT
from server_fixture import PACK_FOLDER

pytestmark = pytest.mark.comfyui  # skipped, loudly, without ComfyUI, or failed in strict mode (conftest.py)

WORKFLOWS_DIR = REPO_ROOT / "workflows"
WORKFLOWS = sorted(p.name for p in WORKFLOWS_DIR.glob("*.json"))
SCREENSHOT = REPO_ROOT / "docs" / "workflow_screenshot.png"
SCREENSHOT_WORKFLOWS = ("wan2.1_t2v_1.3b_radial.json", "wan2.1_t2v_radial.json")  # first present wins
SCREENSHOT_MAX_BYTES = 500_000
UPDATE_SCREENSHOT = "SVA_UPDATE_SCREENSHOT"
PAGE_TIMEOUT_S = 90
# A frontend that registered fewer node types than this has not finished reading /object_info.
MIN_NODE_TYPES = 100

READY_JS = f"""(() => {{
  const ok = window.app && app.graph && app.canvas && window.LiteGraph &&
             Object.keys(LiteGraph.registered_node_types).length >= {MIN_NODE_TYPES} &&
             LiteGraph.registered_node_types["SparseAttentionPatch"] !== undefined;
  return ok ? Object.keys(LiteGraph.registered_node_types).length : 0;
}})()"""

# A frontend extension that records the missing node types the frontend finds when it configures a graph (their
# names: the frontend lists each as a name or as an object with its type).
PROBE_JS = """(() => {
  window.__svaMissing = null;
  if (!window.__svaProbe) {
    window.__svaProbe = true;
    app.registerExtension({name: "SparseVideoAttention.TestProbe",
                           afterConfigureGraph(missing) { window.__svaMissing = missing.map((t) => t.type ?? t); }});
  }
  return true;
})()"""

LOAD_TEMPLATE_JS = """(async () => {
  const response = await fetch("api/workflow_templates/" + encodeURIComponent(%(folder)s) + "/" +
                               encodeURIComponent(%(name)s));
  if (!response.ok) throw new Error("GET workflow template: HTTP " + response.status);
  const text = await response.text();
  window.__svaMissing = null;
  await app.loadGraphData(JSON.parse(text), true, true, %(name)s);
  return text;
})()"""

LOAD_DATA_JS = """(async () => {
  window.__svaMissing = null;
  await app.loadGraphData(%(data)s, true, true, %(name)s);
  return true;
})()"""

# What the page shows after a load: the graph's nodes as the frontend holds them, dialogs, toasts, the error overlay,
# the frontend's error lists (what its Errors tab shows: its pinia stores, by id), the prompt.
STATE_JS = """(async () => {
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const stores = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia._s;
  const store = (id) => {
    if (!stores.has(id)) throw new Error("the frontend has no store " + id);
    return stores.get(id);
  };
  const errors = {
    count: store("executionError").totalErrorCount,
    missing_models: (store("missingModel").missingModelCandidates || []).map((m) => ({
      node: String(m.nodeId), widget: m.widgetName, name: m.name, url: m.url ?? null})),
    missing_nodes: (store("missingNodesError").missingNodesError?.nodeTypes || []).map((t) => t.type ?? t),
    missing_media: (store("missingMedia").missingMediaCandidates || []).map((m) => ({
      node: String(m.nodeId), widget: m.widgetName, name: m.name})),
  };
  const overlay = Array.from(document.querySelectorAll("[data-testid=error-overlay]")).filter(visible)
    .map((o) => o.innerText);
  const nodes = app.graph.nodes.map((n) => ({
    id: String(n.id), type: n.type, registered: LiteGraph.registered_node_types[n.type] !== undefined,
    has_errors: !!n.has_errors, widgets_values: n.serialize().widgets_values ?? null,
  }));
  const dialogs = Array.from(document.querySelectorAll(".p-dialog")).filter(visible).map((d) => ({
    key: d.getAttribute("aria-labelledby"), text: d.innerText.slice(0, 600)}));
  const toasts = Array.from(document.querySelectorAll(".p-toast-message")).filter(visible).map((t) => ({
    severity: (t.className.match(/p-toast-message-(\\w+)/) || [])[1], text: t.innerText.slice(0, 600)}));
  let prompt = null, promptError = null;
  try { prompt = (await app.graphToPrompt()).output; } catch (e) { promptError = String(e && e.stack || e); }
  return {missing: window.__svaMissing, nodes, dialogs, toasts, overlay, errors, prompt, promptError};
})()"""

# The README screenshot: the whole graph in view at full detail, no source badge on the pack's nodes (it would show
# this test's arbitrary folder name instead of the one a user cloned into).
SCREENSHOT_VIEW_JS = """(async () => {
  await app.extensionManager.setting.set("Comfy.NodeBadge.NodeSourceBadgeMode", "None");
  await app.extensionManager.setting.set("LiteGraph.Canvas.MinFontSizeForLOD", 0);  // full detail when zoomed out
  const canvas = app.canvas.canvas.getBoundingClientRect();
  const boxes = app.graph.nodes.map((n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
                                             n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]);
  for (const g of app.graph.groups || []) boxes.push([g.pos[0], g.pos[1], g.size[0], g.size[1]]);
  const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
  const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
  const left = 90 - canvas.left, top = 100 - canvas.top;  // clear of the side bar and the menu bar
  const width = canvas.width - left - 30, height = canvas.height - top - 40;
  const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1.0);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [(left + (width - (x1 - x0) * scale) / 2) / scale - x0,
                          (top + (height - (y1 - y0) * scale) / 2) / scale - y0];
  app.graph.setDirtyCanvas(true, true);
  return scale;
})()"""

CLOSE_DIALOGS_JS = """(() => {
  const buttons = document.querySelectorAll(".p-dialog .p-dialog-close-button, .p-dialog [aria-label='Close']," +
                                            " .p-toast-close-button, [data-testid=error-overlay-dismiss]");
  buttons.forEach((b) => b.click());
  return buttons.length;
})()"""


def fail_message(name: str, what: str, detail) -> str:
    return f"{name}: {what}:\n{json.dumps(detail, indent=1, default=str)[:6000]}"


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory, unavailable):
    """The ComfyUI page in headless Chromium, node definitions loaded, the probe extension registered."""
    chromium = find_chromium()
    if chromium is None:
        unavailable("needs Chromium for the browser test: apt-get install chromium (Debian), or put chromium on PATH")
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium") / "profile", width=1920, height=1080)
    try:
        browser.navigate(comfy_server.url + "/")
        try:
            browser.wait_for(READY_JS, timeout=PAGE_TIMEOUT_S, what="the ComfyUI page with the pack's nodes")
        except Exception as why:
            raise AssertionError(f"{why}\npage errors: {browser.errors()}\n{comfy_server.log_tail()}") from why
        browser.evaluate(PROBE_JS)
        browser.drain(0.5)
        browser.startup_events = len(browser.events)
        yield browser
    finally:
        browser.close()


def settle(page, seconds: float = 0.4) -> None:
    """Let the page render dialogs / toasts after a load and collect its console events."""
    page.drain(seconds)


def load_template(page, name: str) -> str:
    return page.evaluate(LOAD_TEMPLATE_JS % {"folder": json.dumps(PACK_FOLDER), "name": json.dumps(name)})


def validation_problems(comfy_server, prompt: dict, media_loaders: set) -> list:
    """POST the frontend's prompt as the Run button does; every validation error except model files not on this server
    and the media files its input folder lacks (of the nodes ``media_loaders``). A prompt that validates would be
    queued and run; none of the shipped workflows can (their models are absent)."""
    import requests
    response = requests.post(comfy_server.url + "/prompt", json={"prompt": prompt, "client_id": "sva-browser-test"},
                             timeout=30)
    if response.status_code == 200:
        return [f"the workflow was queued (prompt {response.json().get('prompt_id')}): it needs no model file?"]
    body = response.json()
    problems = []
    if body.get("error", {}).get("type") != "prompt_outputs_failed_validation":
        problems.append(body.get("error"))
    for node_id, node in body.get("node_errors", {}).items():
        for error in node.get("errors", []):
            value = error.get("extra_info", {}).get("received_value")
            model_file = (error.get("type") == "value_not_in_list" and isinstance(value, str)
                          and value.lower().endswith(wc.MODEL_FILE_EXTENSIONS))
            media_file = error.get("type") == "custom_validation_failed" and node_id in media_loaders
            if not (model_file or media_file):
                problems.append({"node": node_id, "class_type": node.get("class_type"), **error})
    return problems


# ------------------------------------------------------------------------------------------------------------------

def test_page_opens_with_the_pack(page, comfy_server):
    from pack import import_pack
    nodes = import_pack("nodes")
    registered = page.evaluate(
        "Object.fromEntries(Object.entries(LiteGraph.registered_node_types).map(([k, v]) => [k, v.title || k]))")
    for name in nodes.NODE_CLASS_MAPPINGS:
        assert name in registered, f"the frontend did not register {name}"
        assert registered[name] == nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name)
    state = page.evaluate(STATE_JS)
    assert not state["dialogs"], fail_message("start page", "dialogs shown", state["dialogs"])
    errors = [t for t in state["toasts"] if t["severity"] == "error"]
    assert not errors, fail_message("start page", "error toasts", errors)
    # The page's own start-up console noise (this frontend version logs a settings TypeError on every start) is not
    # the pack's business; anything naming the pack is.
    ours = [e for e in page.errors(0, page.startup_events)
            if PACK_FOLDER in e or "SparseAttention" in e or "RadialAttention" in e]
    assert not ours, fail_message("start page", "errors naming the pack", ours)

    templates = comfy_server.get("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(Path(w).stem for w in WORKFLOWS), (
        f"ComfyUI's template list for {PACK_FOLDER}: {templates.get(PACK_FOLDER)}")


def model_files(data: dict) -> list[tuple[str, str]]:
    """(node id, file name) of every model file the workflow's active nodes name (the frontend does not look for
    the files of bypassed or muted loaders: they do not run)."""
    return sorted((str(n["id"]), v) for n in data["nodes"] if n.get("mode", 0) == 0
                  for v in n.get("widgets_values") or []
                  if isinstance(v, str) and v.lower().endswith(wc.MODEL_FILE_EXTENSIONS))


def media_files(data: dict, input_dir: Path) -> list[tuple[str, str]]:
    """(node id, file name) of every file of the user's (an input-folder file: audio, control video) the workflow's
    active loaders name that the server's input folder does not hold."""
    loaders = {node_type for (node_type, _), folder in wc.MODEL_FILE_INPUTS.items() if folder == "input"}
    return sorted((str(n["id"]), n["widgets_values"][0]) for n in data["nodes"] if n.get("mode", 0) == 0
                  and n["type"] in loaders and not (input_dir / n["widgets_values"][0]).exists())


def loaded_widget_values(catalog, node: dict):
    """The widget values the frontend holds after loading ``node``, as tests/workflow_check.py models it."""
    d, values = catalog.get(node["type"]), node.get("widgets_values")
    return values if d is None or values is None else wc.loaded_values(d.widget_slots(values), values)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_in_the_page(page, comfy_server, catalog, name):
    page.evaluate(CLOSE_DIALOGS_JS)
    settle(page, 0.2)
    events = len(page.events)
    log_start = comfy_server.log_offset()

    served = load_template(page, name)
    settle(page)
    state = page.evaluate(STATE_JS)
    data = json.loads((WORKFLOWS_DIR / name).read_text())
    assert json.loads(served) == data, f"{name}: ComfyUI served a different file than workflows/{name}"

    assert state["missing"] == [], fail_message(name, "node types the frontend reports missing", state["missing"])
    assert not state["dialogs"], fail_message(name, "dialogs shown", state["dialogs"])
    errors = [t for t in state["toasts"] if t["severity"] in ("error", "warn")]
    assert not errors, fail_message(name, "error / warning toasts", errors)
    # The one kind of error expected: the model files, which a test server does not have. The frontend lists each one,
    # flags its loader and asks its download link for the file size (which fails: the page is kept offline).
    missing_models = state["errors"]["missing_models"]
    assert sorted((m["node"], m["name"]) for m in missing_models) == model_files(data), fail_message(
        name, "the frontend's missing models are not the workflow's model files", missing_models)
    # The user's own media (a speech to lip-sync, a control video), which no fresh ComfyUI has, are listed as models
    # are; the loader's preview asks the server for the file (which answers 404).
    missing_media = state["errors"]["missing_media"]
    media = media_files(data, comfy_server.base / "input")
    assert sorted((m["node"], m["name"]) for m in missing_media) == media, fail_message(
        name, "the frontend's missing media are not the workflow's own media files", missing_media)
    assert state["errors"]["count"] == len(missing_models) + len(missing_media), fail_message(
        name, "errors besides missing models and media", state["errors"])
    model_nodes = {m["node"] for m in missing_models + missing_media}
    bad = [n for n in state["nodes"] if not n["registered"] or n["has_errors"] != (n["id"] in model_nodes)]
    assert not bad, fail_message(name, "nodes unknown to the frontend, or in error for another reason", bad)
    size_requests = {f"log (network): Failed to load resource: net::ERR_NAME_NOT_RESOLVED {m['url']}"
                     for m in missing_models}
    previews = [f"filename={urllib.parse.quote(file)}" for _, file in media]
    page_errors = [e for e in page.errors(events) if e not in size_requests
                   and not ("404 (Not Found)" in e and "/api/view?" in e and any(p in e for p in previews))]
    assert not page_errors, fail_message(name, "page errors while loading", page_errors)

    want = {str(n["id"]): loaded_widget_values(catalog, n) for n in data["nodes"]}
    got = {n["id"]: n["widgets_values"] for n in state["nodes"]}
    assert sorted(got) == sorted(want), fail_message(name, "node ids after loading", {"file": sorted(want),
                                                                                     "page": sorted(got)})
    changed = {i: {"expected": want[i], "page": got[i]} for i in want if want[i] and got[i] != want[i]}
    assert not changed, fail_message(name, "widget values the frontend read differently", changed)

    assert state["prompt"], fail_message(name, "the frontend could not build a prompt", state["promptError"])
    frontend, checker = ({i: (v["class_type"], v["inputs"]) for i, v in prompt.items()}
                         for prompt in (state["prompt"], wc.to_api_prompt(data, catalog)))
    assert frontend == checker, fail_message(name, "the frontend's prompt differs from tests/workflow_check.py's",
                                             {"frontend": frontend, "checker": checker})
    types = sorted(n["class_type"] for n in state["prompt"].values())
    ours = [t for t in types if t in ("SparseAttentionPatch", "RadialAttentionMask")]
    assert "SparseAttentionPatch" in ours, fail_message(name, "prompt without Sparse Attention Patch", types)
    problems = validation_problems(comfy_server, state["prompt"], {node_id for node_id, _ in media})
    assert not problems, fail_message(name, "ComfyUI rejects the prompt for more than missing model and media files",
                                           problems)

    # ComfyUI logs why it rejects the prompt (ComfyUI 0.33 at ERROR level): the missing model and media files, nothing
    # else.
    class_types = {str(n["id"]): n["type"] for n in data["nodes"]}
    rejection = [r"^Failed to validate prompt for output \d+:$", r"^Output will be ignored$",
                 r"^invalid prompt: \{'type': 'prompt_outputs_failed_validation'"]
    for m in missing_models:
        rejection += [rf"^\* {class_types[m['node']]} {m['node']}:$",
                      rf"^  - Value not in list: {m['widget']}: {re.escape(repr(m['name']))} not in \["]
    for m in missing_media:
        rejection += [rf"^\* {class_types[m['node']]} {m['node']}:$", rf"^  - Custom validation failed for node: "
                      rf"{m['widget']} - Invalid \w+ file: {re.escape(m['name'])}$"]
    log = comfy_server.problems(since=log_start, allow=tuple(rejection))
    assert not log, f"{name}: server log problems:\n\n" + "\n\n".join(log)


def test_unknown_node_type_is_caught(page):
    """Control: the checks above see a missing node (else a frontend change could make them pass vacuously)."""
    page.evaluate(CLOSE_DIALOGS_JS)
    data = json.loads((WORKFLOWS_DIR / WORKFLOWS[0]).read_text())
    victim = next(n for n in data["nodes"] if n["type"] == "SparseAttentionPatch")
    victim["type"] = "SVANoSuchNodeType"
    page.evaluate(LOAD_DATA_JS % {"data": json.dumps(data), "name": json.dumps("control.json")})
    settle(page, 0.8)
    state = page.evaluate(STATE_JS)
    page.evaluate(CLOSE_DIALOGS_JS)
    assert state["missing"] == ["SVANoSuchNodeType"], state["missing"]
    assert state["errors"]["missing_nodes"] == ["SVANoSuchNodeType"], state["errors"]
    assert state["errors"]["count"] == len(state["errors"]["missing_models"]) + 1, state["errors"]
    assert state["overlay"], "the frontend showed no error overlay"
    assert [n for n in state["nodes"] if n["type"] == "SVANoSuchNodeType" and not n["registered"]], state["nodes"]


def test_screenshot_of_a_loaded_workflow(page, tmp_path):
    name = next((w for w in SCREENSHOT_WORKFLOWS if w in WORKFLOWS), None) or next(
        w for w in WORKFLOWS if "SparseAttentionPatch" in (WORKFLOWS_DIR / w).read_text())
    page.evaluate(CLOSE_DIALOGS_JS)
    load_template(page, name)
    settle(page, 0.3)
    state = page.evaluate(STATE_JS)
    assert state["missing"] == [] and not state["dialogs"], state
    page.evaluate(CLOSE_DIALOGS_JS)  # the overlay saying the models are missing (this server has none)
    scale = page.evaluate(SCREENSHOT_VIEW_JS)
    assert scale > 0.3, f"the graph would be drawn at {scale:.2f}x: unreadable"
    time.sleep(0.8)  # the canvas redraws on the next animation frames
    shot = tmp_path / "workflow_screenshot.png"
    size = page.screenshot(shot)
    size = shrink_png(shot) if size > SCREENSHOT_MAX_BYTES else size
    assert size <= SCREENSHOT_MAX_BYTES, f"screenshot is {size} bytes"
    from PIL import Image
    with Image.open(shot) as image:
        assert image.size[0] >= 1200, image.size
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, "the screenshot is (nearly) blank"
    if os.environ.get(UPDATE_SCREENSHOT):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(shot.read_bytes())


def shrink_png(path: Path) -> int:
    """Re-encode as a 256-colour palette PNG (UI screenshots barely change); the new size."""
    from PIL import Image
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path.stat().st_size
