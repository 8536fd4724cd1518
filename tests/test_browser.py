"""The templates as a new user meets them, in a real browser: Debian's headless Chromium, driven by
Playwright, on a real headless ComfyUI (COMFYUI_PATH) with this pack installed.

Each template is dropped onto the canvas (a synthesised drop event with a File: a native drag cannot
be scripted); then no node may be missing, no error dialog open, every widget must hold the file's value,
Load VAE must offer the file the template names (the Qwen-Image template's qwen_image_vae.safetensors is a
full-size random one in the server's models/vae), ``app.graphToPrompt()`` must equal the API example, and
no two nodes (title bars included) may overlap or hide a widget. The simple template is then run from the
page: short-run values typed into the widgets, Run pressed, the Save node must show where the file went,
and after a refresh (R) Load VAE must list it. Screenshots go to .artifacts/browser/ (or $VAEFT_ARTIFACTS);
with VAEFT_WRITE_THUMBNAILS=1 the run also rewrites the templates' .jpg thumbnails (the simple one's after
its run, the others' as loaded).

Skipped, with the reason, without ComfyUI, Playwright or Chromium (never Playwright's own browser download).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from comfy_server import TEMPLATES, Server, api_example, comfyui_path, messages, prepare_base, write_qwen_image_vae
from conftest import ROOT

pytestmark = pytest.mark.integration  # a real ComfyUI and a browser: -m "not integration" skips it
COMFYUI = comfyui_path()
if COMFYUI is None:
    pytest.skip("the browser test needs a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {os.environ.get('COMFYUI_PATH', '')!r})", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright for Python "
                               "(pip install playwright; it drives the system Chromium)")
CHROMIUM = os.environ.get("VAEFT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.isfile(CHROMIUM):
    pytest.skip(f"the browser test needs Chromium (apt-get install chromium); none at {CHROMIUM}",
                allow_module_level=True)

ARTIFACTS = os.environ.get("VAEFT_ARTIFACTS") or os.path.join(ROOT, ".artifacts", "browser")
APP = "window.comfyAPI.app.app"
TEMPLATE_NAMES = ("vae_finetune", "vae_finetune_advanced", "vae_finetune_qwen_image")
# The placeholder the generic templates' Load VAE holds until a user picks a file.
PLACEHOLDER_VAE = "FILL_IN_YOUR_VAE.safetensors"
# What a user types for a run that takes seconds on a CPU.
SHORT_RUN = {1: {"vae_name": "random_sd_vae.safetensors"}, 2: {"patch_size": 32, "foreground_threshold": 0.0},
             3: {"steps": 2, "batch_size": 1}, 4: {"name": "browser"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy-browser"))
    # A returning user: the first-run template gallery would otherwise cover the canvas.
    prepare_base(base, settings={"Comfy.TutorialCompleted": True})
    # the file the Qwen-Image template loads, so its Load VAE offers it as it would with the released VAE
    qwen = os.path.join(base, "models", "vae", "qwen_image_vae.safetensors")
    write_qwen_image_vae(qwen)
    srv = Server(base, COMFYUI)
    try:
        yield srv
    finally:
        srv.stop()
        os.unlink(qwen)  # ~250 MB: not kept in pytest's last three temp folders


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1920, "height": 1200})
    pg = context.new_page()
    pg.goto(server.url)
    # the app is set up, our node types are registered, and the page has stopped loading
    pg.wait_for_function(f"() => {APP}?.graph && window.LiteGraph?.registered_node_types?.VAEFTFineTune",
                         timeout=120_000)
    pg.wait_for_load_state("networkidle")
    try:
        yield pg
    finally:
        context.close()


def _template(name: str) -> dict:
    with open(os.path.join(TEMPLATES, name + ".json")) as f:
        return json.load(f)


def drop_workflow(pg, name: str, workflow: dict | None = None) -> None:
    """Drop example_workflows/<name>.json (or ``workflow``) on the canvas as a file, the way a drag from
    the desktop does."""
    workflow = workflow or _template(name)
    text = json.dumps(workflow)
    pg.evaluate("""([text, name]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: "application/json"}));
        const canvas = document.querySelector("#graph-canvas");
        for (const type of ["dragenter", "dragover", "drop"])
            canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
    }""", [text, name + ".json"])
    count = len(workflow["nodes"])
    pg.wait_for_function(f"() => {APP}.graph.nodes.length === {count} && "
                         f"{APP}.graph.nodes.some(n => n.type === 'VAEFTFineTune')", timeout=30_000)
    pg.wait_for_timeout(500)  # let the frontend lay out DOM widgets and draw


def graph_state(pg) -> list[dict]:
    """Per node: type, registered?, size, bounding box (title bar included), the size the frontend needs,
    its serialised widget values, and each visible widget's bottom edge."""
    return pg.evaluate(f"""() => {APP}.graph.nodes.map(n => ({{
        id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
        size: Array.from(n.size), box: Array.from(n.boundingRect), needs: Array.from(n.computeSize()),
        widgets_values: n.serialize().widgets_values ?? [],
        widget_names: (n.widgets ?? []).map(w => w.name),
        widget_bottoms: (n.widgets ?? []).filter(w => n.isWidgetVisible(w))
            .map(w => [w.name, (w.y ?? 0) + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT)]),
    }}))""")


def open_dialogs(pg) -> list[str]:
    """Texts of visible dialogs and error toasts (a missing-node or load error shows one of these)."""
    return [t.strip()[:300] for t in pg.locator(".p-dialog:visible, .p-toast-message-error:visible").all_inner_texts()]


def overlaps(state: list[dict]) -> list[tuple]:
    out = []
    for i, a in enumerate(state):
        for b in state[i + 1:]:
            ax, ay, aw, ah = a["box"]
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["id"], a["type"], b["id"], b["type"]))
    return out


def hidden_widgets(state: list[dict]) -> list[tuple]:
    """Nodes smaller than the frontend needs, or a widget drawn past the node's bottom."""
    out = []
    for n in state:
        if n["size"][0] + 0.5 < n["needs"][0] or n["size"][1] + 0.5 < n["needs"][1]:
            out.append((n["id"], n["type"], "size", n["size"], "needs", n["needs"]))
        out += [(n["id"], n["type"], name, bottom) for name, bottom in n["widget_bottoms"] if bottom > n["size"][1] + 0.5]
    return out


def grown(state: list[dict], workflow: dict) -> list[tuple]:
    """Nodes the frontend had to make larger than the file says (it grows a node too small for its
    widgets when loading it, which is how overlaps appeared in the first place)."""
    size = {n["id"]: n["size"] for n in workflow["nodes"]}
    return [(n["id"], n["type"], size[n["id"]], n["size"]) for n in state
            if n["size"][0] > size[n["id"]][0] + 0.5 or n["size"][1] > size[n["id"]][1] + 0.5]


def screenshot(pg, name: str) -> str:
    """Fit the whole graph in view and save a PNG under ARTIFACTS; returns its path."""
    pg.evaluate(f"""() => {{ const app = {APP};
        const boxes = app.graph.nodes.map(n => n.boundingRect);
        const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
        const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
        app.canvas.ds.fitToBounds([x0 - 20, y0 - 40, x1 - x0 + 40, y1 - y0 + 60], {{zoom: 0.95}});
        app.canvas.setDirty(true, true); }}""")
    pg.wait_for_timeout(500)
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name + ".png")
    pg.screenshot(path=path)
    return path


def write_thumbnail(pg, name: str) -> None:
    """example_workflows/<name>.jpg, as ComfyUI's template gallery shows beside each template: the graph
    as drawn, cropped to its nodes, without the minimap and canvas info."""
    from PIL import Image

    clip = pg.evaluate(f"""async () => {{ const app = {APP};
        await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
        app.canvas.show_info = false;
        app.canvas.setDirty(true, true);
        await new Promise(r => setTimeout(r, 500));
        const boxes = app.graph.nodes.map(n => n.boundingRect);
        const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([Math.min(...boxes.map(b => b[0])) - 10,
                                                              Math.min(...boxes.map(b => b[1])) - 25]);
        const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([Math.max(...boxes.map(b => b[0] + b[2])) + 10,
                                                              Math.max(...boxes.map(b => b[1] + b[3])) + 10]);
        const r = document.querySelector("#graph-canvas").getBoundingClientRect();
        return {{x: r.left + x0, y: r.top + y0, width: x1 - x0, height: y1 - y0}}; }}""")
    png = os.path.join(ARTIFACTS, name + "-thumbnail.png")
    pg.screenshot(path=png, clip=clip)
    with Image.open(png) as im:
        im = im.convert("RGB")
        im.thumbnail((800, 800))
        im.save(os.path.join(TEMPLATES, name + ".jpg"), "JPEG", quality=85)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_loads_clean_and_matches_the_api_example(page, name):
    drop_workflow(page, name)
    shot = screenshot(page, f"{name}-loaded")
    state = graph_state(page)
    template = _template(name)

    assert open_dialogs(page) == [], f"a dialog is open after loading {name} (see {shot})"
    assert all(n["registered"] for n in state), [n["type"] for n in state if not n["registered"]]
    # Load VAE offers the file the template names (the generic templates hold a placeholder to replace)
    for node in template["nodes"]:
        if node["type"] == "VAELoader" and node["widgets_values"][0] != PLACEHOLDER_VAE:
            offered = page.evaluate(f"() => {APP}.graph.getNodeById({node['id']}).widgets[0].options.values")
            assert node["widgets_values"][0] in offered, (name, offered)
    assert sorted(n["type"] for n in state) == sorted(n["type"] for n in template["nodes"])
    # every widget holds the file's value
    by_id = {n["id"]: n for n in template["nodes"]}
    for n in state:
        assert n["widgets_values"] == by_id[n["id"]]["widgets_values"], (n["id"], n["type"])
    # what Run would send is exactly the API example
    prompt = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output")
    api = api_example(name)
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in api.items()}
    assert {k: v["_meta"]["title"] for k, v in prompt.items()} == {k: v["_meta"]["title"] for k, v in api.items()}
    # a clean graph: nothing overlaps, nothing is cut off, the main node is short
    assert overlaps(state) == [], f"overlapping nodes (see {shot})"
    assert hidden_widgets(state) == [], f"widgets cut off (see {shot})"
    assert grown(state, template) == [], f"the template's sizes are too small (see {shot})"
    fine_tune = next(n for n in state if n["type"] == "VAEFTFineTune")
    assert len(fine_tune["widget_names"]) <= 10, fine_tune["widget_names"]
    if name != "vae_finetune" and os.environ.get("VAEFT_WRITE_THUMBNAILS") == "1":
        write_thumbnail(page, name)


def test_the_layout_checks_catch_an_overlap_and_a_too_small_node(page):
    """The checks above can fail: the same template with the previews moved onto VAE Fine-tune and the
    Save node squeezed shorter than its widgets (the frontend grows it back on load)."""
    bad = _template("vae_finetune")
    nodes = {n["id"]: n for n in bad["nodes"]}
    nodes[7]["pos"] = list(nodes[3]["pos"])
    nodes[4]["size"] = [nodes[4]["size"][0], 60]
    drop_workflow(page, "vae_finetune", bad)
    state = graph_state(page)
    assert (3, "VAEFTFineTune", 7, "PreviewImage") in overlaps(state)
    assert [g[0] for g in grown(state, bad)] == [4]


def test_run_from_the_page_shows_where_the_file_went_and_load_vae_lists_it(page, server):
    drop_workflow(page, "vae_finetune")
    loaded = {n["id"]: n["size"] for n in graph_state(page)}
    # type the short-run values into the widgets, as a user would
    page.evaluate(f"""(values) => {{ const app = {APP};
        for (const [id, kv] of Object.entries(values)) {{
            const node = app.graph.getNodeById(Number(id));
            for (const [name, v] of Object.entries(kv)) {{
                const w = node.widgets.find(w => w.name === name);
                w.value = v; w.callback?.(v, app.canvas, node);
            }}
        }}
        app.graph.setDirtyCanvas(true, true); }}""", {str(k): v for k, v in SHORT_RUN.items()})
    before = set(server.get("/history").json())
    page.get_by_role("button", name="Run", exact=True).click()
    deadline = time.time() + 600
    entry = None
    while time.time() < deadline:
        new = {k: v for k, v in server.get("/history").json().items() if k not in before}
        done = [v for v in new.values() if v.get("status", {}).get("completed") is not None]
        if done:
            entry = done[0]
            break
        time.sleep(1)
    assert entry is not None, f"no run finished:\n{server.read_log()[-3000:]}"
    assert entry["status"]["status_str"] == "success", messages(entry) + server.read_log()[-3000:]
    out_file = os.path.join(server.base, "output", "vae", "vae-ft-browser-2.safetensors")
    assert os.path.isfile(out_file)

    # the Save node shows where the file went, in a box the page draws
    page.wait_for_function(f"() => ({APP}.graph.getNodeById(4).widgets.find(w => w.name === 'result')?.value ?? '')"
                           f".includes({json.dumps(out_file)})", timeout=30_000)
    shown = [t for t in page.locator("textarea.comfy-multiline-input").all() if out_file in t.input_value()]
    assert shown and shown[0].is_visible()
    shot = screenshot(page, "vae_finetune-after-run")
    bb = shown[0].bounding_box()
    assert bb and bb["width"] > 50 and bb["height"] > 20, (bb, shot)
    # previews drawn after the run (live reconstructions on VAE Fine-tune, the loss curve, sampled
    # patches) fit the room the template left: no node grew, nothing overlaps
    state = graph_state(page)
    assert {n["id"]: n["size"] for n in state} == loaded, f"a node grew after the run (see {shot})"
    assert overlaps(state) == [] and hidden_widgets(state) == [], shot
    assert page.evaluate(f"() => [6, 7].map(id => ({APP}.graph.getNodeById(id).imgs ?? []).length)") == [1, 1]
    assert open_dialogs(page) == [], shot
    if os.environ.get("VAEFT_WRITE_THUMBNAILS") == "1":
        write_thumbnail(page, "vae_finetune")

    # Refresh (R): stock Load VAE lists the new file without a restart
    page.locator("#graph-canvas").click(position={"x": 5, "y": 500})
    page.keyboard.press("r")
    page.wait_for_function(f"() => {APP}.graph.getNodeById(1).widgets[0].options.values"
                           ".includes('vae-ft-browser-2.safetensors')", timeout=30_000)

