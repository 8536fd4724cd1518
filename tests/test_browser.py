"""The templates as a new user meets them, in a real browser: Debian's headless Chromium, driven by
Playwright, on a real headless ComfyUI (COMFYUI_PATH) with this pack installed.

Each template is dropped onto the canvas (a synthesised drop event with a File: a native drag cannot
be scripted); then no node may be missing or flagged, no error dialog open, every widget must hold the file's
value, each Load VAE must offer the file the template names and carry its models entry (the server's models/vae has
a random VAE under each name: vae-ft-mse-840000-ema-pruned.safetensors, and full-size random
qwen_image_vae.safetensors and flux2-vae.safetensors; the compare template's tuned file, which the pack's Save
writes, has none, and its Load Latent's file is in input/), ``app.graphToPrompt()`` must equal the API example, and
no two nodes (title bars included) may overlap or hide a widget. A template naming a VAE the server lacks must
make the page name the file and its folder. The simple template is then run from the page: short-run values
typed into the widgets, Run pressed, VAE Fine-tune's status box must show the status text while it trains and
all of the last one after the run (no line cut off or scrolled out of view), the Save node must show where
the file went, and after a refresh (R) Load VAE must list it. Screenshots go to .artifacts/browser/ (or $VAEFT_ARTIFACTS);
with VAEFT_WRITE_THUMBNAILS=1 the run also rewrites the templates' .jpg thumbnails from the pinned frontend (the simple one's after
its run, the others' as loaded).

Every test runs on two frontends: the one the ComfyUI checkout pins ("pinned"), and the one whose static
folder $VAEFT_NEWEST_FRONTEND names ("newest": .ci/run installs the newest comfyui-frontend-package there,
outside the repository; ComfyUI serves it with --front-end-root). Without that variable the newest
frontend's tests are skipped, with the reason. On both, the page's console warnings and errors are
collected: none may come from this pack (its file or name, or an internal-module notice, or any error with one
of the page's extension scripts on its stack), and a failed request is an error unless it is one of the APIs a
newer frontend asks an older server for (by name). The frontend's own errors tolerated are listed by message
and by where they come from (FRONTEND_ERRORS, FRONTEND_BUGS, CSP_BLOCKED).

Skipped, with the reason, without ComfyUI, Playwright or Chromium (never Playwright's own browser download).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from comfy_server import (PACK, TEMPLATE_SD_VAE, TEMPLATES, Server, api_example, comfyui_path, messages, prepare_base,
                          write_flux2_vae, write_qwen_image_vae)
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
TEMPLATE_NAMES = ("vae_finetune", "vae_finetune_advanced", "vae_finetune_flux2", "vae_finetune_qwen_image",
                  "vae_finetune_qwen_image21", "vae_finetune_wan22", "vae_compare_on_latents", "vae_distil_decoder")
# The nodes with a status box (web/vaeft.js STATUS_NODES)
STATUS_NODES = ("VAEFTFineTune", "VAEFTDistilDecoder")
# The VAE files the templates' Load VAE name, all in the server's models/vae (the base fixture)
TEMPLATE_VAES = (TEMPLATE_SD_VAE, "qwen_image_vae.safetensors", "flux2-vae.safetensors", "wan2.2_vae.safetensors",
                 "qwen_image_2.1_vae_bf16.safetensors")
# The compare template's tuned VAE (Save Fine-tuned VAE's file, no public source: Load VAE carries no models
# entry for it) and its Load Latent's file (Save Latent's, in input/)
TUNED_VAE, TEMPLATE_LATENT = "vae-ft-custom-2000.safetensors", "ComfyUI_00001_.latent"
# What a user types for a run that takes seconds on a CPU (the Save name gets the frontend's name: both
# frontends' servers share one base folder, and Save never overwrites).
SHORT_RUN = {2: {"patch_size": 32, "foreground_threshold": 0.0}, 3: {"steps": 2, "batch_size": 1}}
# The newest comfyui-frontend-package's static folder (.ci/run installs it outside the repository).
NEWEST_FRONTEND = os.environ.get("VAEFT_NEWEST_FRONTEND", "")
FRONTENDS = ("pinned", "newest")
# APIs a newer frontend asks the pinned server for and that server does not have: a server/frontend
# mismatch, not this pack's. A 404 for one of these (path prefixes) is tolerated; any other failed request
# is reported.
OLD_SERVER_MISSING = ("/api/jobs", "/api/global_subgraphs", "/api/userdata/")
OLD_SERVER_MISSING_NAMES = ("jobs",)  # as the newest frontend names them in its errors: "Failed to fetch jobs: 404"
# Files the page itself asks for that no ComfyUI ships (the browser's icon, the frontend's optional
# user stylesheet): a 404 for these is no one's error.
OPTIONAL_FILES = ("/favicon.ico", "/user.css")
# Start-up errors of a frontend itself, by message and where it is thrown (never under /extensions/):
# frontend 1.27's Navigation Mode setting, at its default, sets two settings not yet registered.
FRONTEND_BUGS = (("Cannot read properties of undefined (reading 'id')", "at Proxy.addSetting"),)
# Console errors a frontend itself logs, by their start, tolerated only when no page script (/extensions/) is
# on the call's stack: 1.27 when a dropped workflow replaces the graph; the missing-model dialog asking the
# model's public source for its size (this machine reaches no internet); 1.45 while the app sets up (a Vue
# computed of its own reads app.rootGraph before the graph exists).
FRONTEND_ERRORS = ("Attempted to cleanup event listeners for graph that was never set up",
                   "Error fetching file size: TypeError: Failed to fetch",
                   "ComfyApp graph accessed before initialization")
# A newer server's Content-Security-Policy (0.28: connect-src 'self') blocking the frontend's own requests to the
# internet, which the browser reports against the frontend's bundle: a model file's size at its public source when
# a workflow names a model the server lacks (1.45's default graph names three; the missing-VAE test below, one),
# and the Comfy Registry's answers about the workflow's node packs (1.45's panel that lists missing models asks
# https://api.comfy.org/ about every node, ours by name).
CSP_BLOCKED = re.compile(r"(?:Connecting to '(?P<a>https://[^'\s]+)' violates the following Content Security Policy "
                         r"directive: \"connect-src |Fetch API cannot load (?P<b>https://\S+)\. Refused to connect "
                         r"because it violates the document's Content Security Policy)")
MODEL_FILES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
COMFY_REGISTRY = "https://api.comfy.org/"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One base folder for both frontends' servers (one after the other): the random SD VAE under the name
    the generic templates' Load VAE holds, and the family templates' qwen_image_vae.safetensors and
    flux2-vae.safetensors (full-size random ones), wan2.2_vae.safetensors and qwen_image_2.1_vae_bf16.safetensors
    (small ones), so every template's named VAE is installed."""
    base = str(tmp_path_factory.mktemp("comfy-browser"))
    # A returning user: the first-run template gallery would otherwise cover the canvas.
    prepare_base(base, settings={"Comfy.TutorialCompleted": True})
    # the user's folders the frontend lists (a fresh server has none and answers 404)
    for folder in ("workflows", "subgraphs"):
        os.makedirs(os.path.join(base, "user", "default", folder), exist_ok=True)
    qwen = os.path.join(base, "models", "vae", "qwen_image_vae.safetensors")
    write_qwen_image_vae(qwen)
    flux2 = os.path.join(base, "models", "vae", "flux2-vae.safetensors")
    write_flux2_vae(flux2)
    # the Wan 2.2 and Qwen-Image 2.1 templates' files: listed by Load VAE, never loaded here (only the simple
    # template runs from the page), so small examples of each family under the names the templates hold
    from safetensors.torch import save_file

    from family_examples import qwen21_file, wan22_file

    save_file(wan22_file(0), os.path.join(base, "models", "vae", "wan2.2_vae.safetensors"))
    save_file(qwen21_file(0), os.path.join(base, "models", "vae", "qwen_image_2.1_vae_bf16.safetensors"))
    # the compare template's tuned VAE (the file the simple template's Save writes; the base's copy here) and
    # the latent it loads (Save Latent's file, moved to input/): a user who ran both has them
    os.link(os.path.join(base, "models", "vae", TEMPLATE_SD_VAE), os.path.join(base, "models", "vae", TUNED_VAE))
    import torch

    save_file({"latent_tensor": torch.zeros(1, 4, 8, 8), "latent_format_version_0": torch.tensor([])},
              os.path.join(base, "input", TEMPLATE_LATENT))
    try:
        yield base
    finally:
        os.unlink(qwen)  # ~250 MB and ~170 MB: not kept in pytest's last three temp folders
        os.unlink(flux2)


def _frontend_version(static: str) -> str:
    """comfyui-frontend-package's version, from the dist-info beside its package folder."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(static)))
    found = [re.match(r"comfyui_frontend_package-(.+)\.dist-info$", n) for n in os.listdir(site)] if os.path.isdir(site) else []
    return next((m.group(1) for m in found if m), "unknown version")


@pytest.fixture(scope="module", params=FRONTENDS)
def server(request, base):
    args: tuple[str, ...] = ()
    if request.param == "newest":
        if not NEWEST_FRONTEND:
            pytest.skip("the newest frontend's browser test needs VAEFT_NEWEST_FRONTEND: the static folder of "
                        "comfyui-frontend-package installed outside the repository (.ci/run does it, for the default "
                        "ComfyUI's run only: pip install --target DIR comfyui-frontend-package)")
        if not os.path.isfile(os.path.join(NEWEST_FRONTEND, "index.html")):
            pytest.fail(f"VAEFT_NEWEST_FRONTEND={NEWEST_FRONTEND!r} is not a frontend's static folder (no index.html)")
        args = ("--front-end-root", NEWEST_FRONTEND)
        print(f"newest frontend: comfyui-frontend-package {_frontend_version(NEWEST_FRONTEND)} at {NEWEST_FRONTEND}")
    srv = Server(base, COMFYUI, args)
    srv.frontend = request.param
    try:
        yield srv
    finally:
        srv.stop()
    # Newer ComfyUI servers log "[DEPRECATION WARNING] ..." naming the legacy path a page script imported (not
    # the pack): this pack is the only extension installed here, so any such line is its (0.3.64 logs none)
    with open(srv.log_path) as f:
        log = f.read()
    assert not [line for line in log.splitlines() if "DEPRECATION" in line.upper()], log[-3000:]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class Console:
    """The page's console warnings and errors, and its failed requests; for each console call, the scripts on its
    stack (Chromium's DevTools protocol: a frontend logs some errors for whoever called it)."""

    def __init__(self, pg):
        self.messages: list[tuple[str, str, str]] = []  # (type, text, url of the script or resource)
        self.failed: list[tuple[int, str]] = []  # (status, path)
        self.stacks: list[tuple[str, list[str]]] = []  # (first argument, urls of the scripts on the call's stack)
        pg.on("console", lambda m: self.messages.append((m.type, m.text, (m.location or {}).get("url", "")))
              if m.type in ("warning", "error") else None)
        pg.on("pageerror", lambda e: self.messages.append(("pageerror", str(e), getattr(e, "stack", "") or "")))
        pg.on("response", lambda r: self.failed.append((r.status, r.url.split("//", 1)[-1].split("/", 1)[-1]))
              if r.status >= 400 else None)
        cdp = pg.context.new_cdp_session(pg)
        cdp.on("Runtime.consoleAPICalled", self._called)
        cdp.send("Runtime.enable")

    def _called(self, event: dict) -> None:
        if event.get("type") in ("error", "warning") and event.get("args"):
            first = event["args"][0]
            text = str(first.get("value", first.get("description", "")))
            self.stacks.append((text, [f.get("url", "") for f in event.get("stackTrace", {}).get("callFrames", [])]))

    def through_an_extension(self, text: str) -> bool:
        """Whether a console call that logged ``text`` had a page script (/extensions/...) on its stack."""
        return any(text.startswith(first) and any("/extensions/" in url for url in urls)
                   for first, urls in self.stacks if first)

    def tolerated(self, status: int, path: str) -> bool:
        path = "/" + path.split("?")[0]
        return status == 404 and (path.startswith(OLD_SERVER_MISSING) or path in OPTIONAL_FILES)

    @staticmethod
    def csp_blocked_frontend_request(text: str, url: str) -> bool:
        """The server's CSP blocking the frontend's own request (its bundle, not a page script) for a model file at
        its public source or to the Comfy Registry."""
        m = CSP_BLOCKED.match(text)
        blocked = (m.group("a") or m.group("b")) if m else ""
        return bool(blocked) and "/assets/" in url and "/extensions/" not in url and \
            (blocked.split("?")[0].endswith(MODEL_FILES) or blocked.startswith(COMFY_REGISTRY))

    def problems(self) -> list:
        """Warnings from this pack, any internal-module notice or deprecation, errors other than a tolerated
        request's, and failed requests other than the tolerated ones."""
        ours = f"/extensions/{PACK}/"
        bad_requests = [(st, p) for st, p in self.failed if not self.tolerated(st, p)]
        out = [("request", st, p) for st, p in bad_requests]
        for kind, text, url in self.messages:
            lowered = text.lower()
            if kind == "error" and self.csp_blocked_frontend_request(text, url):
                continue  # checked first: the Comfy Registry's URL names our node types (VAEFT...)
            if ours in url or ours in text or "vaeft" in lowered or "internal module" in lowered:
                out.append((kind, text, url))  # this pack's, or an internal import (only a pack makes one)
            elif kind == "warning":
                continue  # the frontend's own warnings (this pack's are caught above)
            elif kind == "error" and "/extensions/" not in url and text.startswith(FRONTEND_ERRORS) \
                    and not self.through_an_extension(text):
                continue
            elif kind == "pageerror" and "/extensions/" not in url and any(
                    text == msg and where in url for msg, where in FRONTEND_BUGS):
                continue
            elif text.startswith("Failed to load resource") and self.tolerated(404, url.split("//", 1)[-1].split("/", 1)[-1]):
                continue  # the request itself is checked above, by its status
            elif text.startswith("Failed to load resource: net::") and not url.startswith("http://127.0.0.1"):
                continue  # a frontend asking a model's public source (this machine reaches no internet)
            elif any(f"Failed to fetch {what}: 404" in text for what in OLD_SERVER_MISSING_NAMES):
                continue  # the frontend's report of a tolerated 404 (the request is checked above)
            else:
                out.append((kind, text, url))
        return out


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1920, "height": 1200})
    pg = context.new_page()
    console = Console(pg)
    pg.goto(server.url)
    # the app is set up, our node types are registered, and the page has stopped loading
    pg.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.VAEFTFineTune",
                         timeout=120_000)
    pg.wait_for_load_state("networkidle")
    pg.console = console
    pg.frontend = server.frontend
    try:
        yield pg
        problems = console.problems()
        assert problems == [], f"console or requests on the {server.frontend} frontend: {problems}"
    finally:
        context.close()


def node_js(node_id) -> str:
    """A JS expression for the graph's node ``node_id`` (newer frontends keep ids as strings)."""
    return f"{APP}.graph.nodes.find(n => String(n.id) === {json.dumps(str(node_id))})"


def _template(name: str) -> dict:
    with open(os.path.join(TEMPLATES, name + ".json")) as f:
        return json.load(f)


DROP_JS = """([text, name]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: "application/json"}));
        // the canvas's container: newer frontends take drops there, older ones on the document it bubbles to
        const canvas = document.querySelector("#graph-canvas").parentElement;
        for (const type of ["dragenter", "dragover", "drop"])
            canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
    }"""


def drop_workflow(pg, name: str, workflow: dict | None = None) -> None:
    """Drop example_workflows/<name>.json (or ``workflow``) on the canvas as a file, the way a drag from
    the desktop does."""
    workflow = workflow or _template(name)
    text = json.dumps(workflow)
    pg.evaluate(DROP_JS, [text, name + ".json"])
    count = len(workflow["nodes"])
    ours = next(n["type"] for n in workflow["nodes"] if n["type"].startswith("VAEFT"))  # not in the default graph
    loaded = (f"() => {APP}.graph.nodes.length === {count} && "
              f"{APP}.graph.nodes.some(n => n.type === {json.dumps(ours)})")
    try:
        pg.wait_for_function(loaded, timeout=15_000)
    except sync_api.TimeoutError:  # the newest frontend can miss a drop on a page still setting up: once more
        pg.evaluate(DROP_JS, [text, name + ".json"])
        pg.wait_for_function(loaded, timeout=15_000)
    pg.wait_for_timeout(500)  # let the frontend lay out DOM widgets and draw


def graph_state(pg) -> list[dict]:
    """Per node: type, registered?, size, bounding box (title bar included), the size the frontend needs,
    its serialised widget values, its widgets' names (all, and the settings: those saved with the workflow),
    and each visible widget's bottom edge."""
    return pg.evaluate(f"""() => {APP}.graph.nodes.map(n => ({{
        id: Number(n.id), type: n.type, registered: n.type in LiteGraph.registered_node_types,
        size: Array.from(n.size), box: Array.from(n.boundingRect), needs: Array.from(n.computeSize()),
        widgets_values: n.serialize().widgets_values ?? [],
        widget_names: (n.widgets ?? []).map(w => w.name),
        settings: (n.widgets ?? []).filter(w => w.serialize !== false && w.options?.serialize !== false).map(w => w.name),
        widget_bottoms: (n.widgets ?? []).filter(w => n.isWidgetVisible(w))
            .map(w => [w.name, (w.y ?? 0) + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT)]),
    }}))""")


def open_dialogs(pg) -> list[str]:
    """Texts of visible dialogs and error toasts (a missing-node or load error shows one of these)."""
    return [t.strip()[:300] for t in pg.locator(".p-dialog:visible, .p-toast-message-error:visible").all_inner_texts()]


def status_box(pg, node_id=3) -> dict:
    """VAE Fine-tune's status box (web/vaeft.js): its text, whether all of it is in view (no line cut off or
    scrolled out, nothing wider than the box) and the box on screen inside its node."""
    return pg.evaluate(f"""() => {{ const app = {APP}, n = {node_js(node_id)};
        const w = n.widgets.find(w => w.name === "status"), el = w?.inputEl ?? w?.element;
        if (!el) return {{fits: false, why: "no status box"}};
        const r = el.getBoundingClientRect(), c = app.canvas.canvas.getBoundingClientRect();
        const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
        const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        const inside = r.left >= c.left + x0 - 1 && r.top >= c.top + y0 - 1 && r.right <= c.left + x1 + 1
            && r.bottom <= c.top + y1 + 1;
        const visible = el.checkVisibility ? el.checkVisibility() : el.offsetParent !== null;
        const whole = el.scrollHeight <= el.clientHeight + 1 && el.scrollWidth <= el.clientWidth + 1;
        return {{text: el.value, fits: visible && inside && whole && r.height > 0, visible, inside, whole,
                 scroll: [el.scrollWidth, el.scrollHeight], client: [el.clientWidth, el.clientHeight],
                 box: [r.left, r.top, r.right, r.bottom], node: [c.left + x0, c.top + y0, c.left + x1, c.top + y1]}};
    }}""")


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


def fit_graph(pg) -> float:
    """Fit the whole graph in view (at most 95 %); returns the zoom."""
    zoom = pg.evaluate(f"""() => {{ const app = {APP};
        const boxes = app.graph.nodes.map(n => n.boundingRect);
        const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
        const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
        // room above for the title bars: 1.45 floats its graph menu over the canvas's top left corner
        app.canvas.ds.fitToBounds([x0 - 20, y0 - 100, x1 - x0 + 40, y1 - y0 + 120], {{zoom: 0.95}});
        app.canvas.setDirty(true, true);
        return app.canvas.ds.scale; }}""")
    pg.wait_for_timeout(500)
    return zoom


def show_node(pg, node_id) -> None:
    """The node at 100 %, its top left corner near the canvas's: a tall template (the distil one) fits the page
    only at a zoom where the frontend draws no widgets, its status box among them."""
    pg.evaluate(f"""() => {{ const app = {APP}, n = {node_js(node_id)};
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-n.pos[0] + 120, -n.pos[1] + 120];  // (1.45's side bar covers the left edge)
        app.canvas.setDirty(true, true); }}""")
    pg.wait_for_timeout(500)


def screenshot(pg, name: str) -> str:
    """Fit the whole graph in view and save a PNG under ARTIFACTS; returns its path."""
    fit_graph(pg)
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, f"{pg.frontend}-{name}.png")
    pg.screenshot(path=path)
    return path


def write_thumbnail(pg, name: str) -> None:
    """example_workflows/<name>.jpg, as ComfyUI's template gallery shows beside each template: the graph
    as drawn, cropped to its nodes, without the minimap and canvas info (a graph too tall to be drawn in full at 70 %
    on the page gets a taller page for it)."""
    viewport = pg.viewport_size
    height = pg.evaluate(f"""() => {{ const boxes = {APP}.graph.nodes.map(n => n.boundingRect);
        return Math.max(...boxes.map(b => b[1] + b[3])) - Math.min(...boxes.map(b => b[1])); }}""")
    if height * 0.7 + 220 > viewport["height"]:
        pg.set_viewport_size({"width": viewport["width"], "height": int(height * 0.7) + 220})
    try:
        fit_graph(pg)
        _write_thumbnail(pg, name)
    finally:
        pg.set_viewport_size(viewport)


def _write_thumbnail(pg, name: str) -> None:
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
    png = os.path.join(ARTIFACTS, f"{pg.frontend}-{name}-thumbnail.png")
    pg.screenshot(path=png, clip=clip)
    with Image.open(png) as im:
        im = im.convert("RGB")
        im.thumbnail((800, 800))
        im.save(os.path.join(TEMPLATES, name + ".jpg"), "JPEG", quality=85)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_loads_clean_and_matches_the_api_example(page, name):
    drop_workflow(page, name)
    shot = screenshot(page, f"{name}-loaded")
    zoom = page.evaluate(f"() => {APP}.canvas.ds.scale")
    state = graph_state(page)
    template = _template(name)

    # the VAE the template names is installed: no dialog, no toast, no node flagged
    assert open_dialogs(page) == [], f"a dialog is open after loading {name} (see {shot})"
    assert all(n["registered"] for n in state), [n["type"] for n in state if not n["registered"]]
    assert page.evaluate(f"() => {APP}.graph.nodes.filter(n => n.has_errors).map(n => n.type)") == [], shot
    # each Load VAE offers the file the template names, and carries the model's description (none for the
    # file the pack's own Save writes: it has no public source)
    loaders = [n for n in template["nodes"] if n["type"] == "VAELoader"]
    assert loaders, name
    for loader in loaders:
        named = loader["widgets_values"][0]
        assert named in TEMPLATE_VAES + (TUNED_VAE,), named
        offered = page.evaluate(f"() => {node_js(loader['id'])}.widgets[0].options.values")
        assert named in offered, (name, offered)
        models = page.evaluate(f"() => {node_js(loader['id'])}.properties.models ?? null")
        if named == TUNED_VAE:
            assert models is None and "models" not in loader["properties"], models
        else:
            assert models == loader["properties"]["models"] and [m["name"] for m in models] == [named], models
    assert sorted(n["type"] for n in state) == sorted(n["type"] for n in template["nodes"])
    # every widget holds the file's value
    by_id = {n["id"]: n for n in template["nodes"]}
    for n in state:
        assert n["widgets_values"] == by_id[n["id"]]["widgets_values"], (n["id"], n["type"])
    # what Run would send is exactly the API example
    prompt = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output")
    api = api_example(name)
    assert {str(k): (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in api.items()}
    assert {str(k): v["_meta"]["title"] for k, v in prompt.items()} == {k: v["_meta"]["title"] for k, v in api.items()}
    # a clean graph: nothing overlaps, nothing is cut off, the main node is short
    assert overlaps(state) == [], f"overlapping nodes (see {shot})"
    assert hidden_widgets(state) == [], f"widgets cut off (see {shot})"
    assert grown(state, template) == [], f"the template's sizes are too small (see {shot})"
    fine_tune = next((n for n in state if n["type"] == "VAEFTFineTune"), None)
    if fine_tune is not None:
        assert len(fine_tune["settings"]) <= 10, fine_tune["settings"]
    for n in state:  # the training nodes' status box: shown (empty, a placeholder) and never saved
        if n["type"] in STATUS_NODES:
            assert "status" in n["widget_names"] and "status" not in n["settings"], n
            if zoom < 0.6:  # the frontend draws no DOM widget at this zoom: the box is checked at 100 %
                show_node(page, n["id"])
            assert status_box(page, n["id"])["fits"], status_box(page, n["id"])
    for n in state:  # our output nodes' result box: shown, never saved (the compare and distil nodes' reports)
        if n["type"] in ("VAEFTCompareOnLatents", "VAEFTEvaluate", "VAEFTSave", "VAEFTDistilDecoder"):
            assert "result" in n["widget_names"] and "result" not in n["settings"], n
    if name != "vae_finetune" and page.frontend == "pinned" and os.environ.get("VAEFT_WRITE_THUMBNAILS") == "1":
        write_thumbnail(page, name)


def test_a_template_whose_vae_is_missing_says_which_file_and_where_it_goes(page):
    """The simple template as it would be for an SDXL user who has not downloaded sdxl_vae.safetensors
    (not in this server's models/vae): the frontend names the file, its folder and where to get it."""
    missing = _template("vae_finetune")
    loader = next(n for n in missing["nodes"] if n["type"] == "VAELoader")
    url = "https://huggingface.co/stabilityai/sdxl-vae/resolve/main/sdxl_vae.safetensors"
    loader["widgets_values"] = ["sdxl_vae.safetensors"]
    loader["properties"]["models"] = [{"name": "sdxl_vae.safetensors", "url": url, "directory": "vae"}]
    drop_workflow(page, "vae_finetune", missing)
    named = "() => document.body.innerText.includes('sdxl_vae.safetensors')"
    page.wait_for_function(f"() => ({named})() || Array.from(document.querySelectorAll('button'))"
                           ".some(b => b.innerText.trim() === 'Show missing models')", timeout=30_000)
    show = page.get_by_role("button", name="Show missing models")
    if show.count():  # 1.45: an error overlay says that a model is missing; the panel it opens names it
        show.first.click()
        page.wait_for_function(named, timeout=30_000)
    shot = screenshot(page, "missing-vae")
    text = page.evaluate("() => document.body.innerText")
    assert "vae" in text.split("sdxl_vae.safetensors")[0][-200:] + text.split("sdxl_vae.safetensors")[1][:200], shot
    page.keyboard.press("Escape")


def test_the_layout_checks_catch_an_overlap_and_a_too_small_node(page):
    """The checks above can fail: the same template with the previews moved onto VAE Fine-tune and the
    Save node squeezed shorter than its widgets (the frontend grows it back on load), and a status text longer
    than the status box shows."""
    bad = _template("vae_finetune")
    nodes = {n["id"]: n for n in bad["nodes"]}
    nodes[7]["pos"] = list(nodes[3]["pos"])
    nodes[4]["size"] = [nodes[4]["size"][0], 60]
    drop_workflow(page, "vae_finetune", bad)
    state = graph_state(page)
    assert (3, "VAEFTFineTune", 7, "PreviewImage") in overlaps(state)
    assert [g[0] for g in grown(state, bad)] == [4]
    page.evaluate(f"() => {{ {node_js(3)}.widgets.find(w => w.name === 'status').value = "
                  f"{json.dumps(chr(10).join(f'line {i}' for i in range(12)))}; }}")
    box = status_box(page)
    assert box["text"].startswith("line 0") and not box["whole"] and not box["fits"], box


def test_run_from_the_page_shows_where_the_file_went_and_load_vae_lists_it(page, server):
    drop_workflow(page, "vae_finetune")
    loaded = {n["id"]: n["size"] for n in graph_state(page)}
    save_name = f"browser-{page.frontend}"
    # type the short-run values into the widgets, as a user would
    page.evaluate(f"""(values) => {{ const app = {APP};
        for (const [id, kv] of Object.entries(values)) {{
            const node = app.graph.nodes.find(n => String(n.id) === id);
            for (const [name, v] of Object.entries(kv)) {{
                const w = node.widgets.find(w => w.name === name);
                w.value = v; w.callback?.(v, app.canvas, node);
            }}
        }}
        app.graph.setDirtyCanvas(true, true); }}""", {str(k): v for k, v in {**SHORT_RUN, 4: {"name": save_name}}.items()})
    # the status texts the node sends while it trains (nodes/finetune.py STATUS_EVENT, for node 3), and whether
    # its status box showed each in full once the page had drawn it
    page.evaluate(f"""() => {{ window.__vaeftStatus = [];
        window.comfyAPI.api.api.addEventListener("vaeft.status", e => {{
            if (String(e.detail?.node) !== "3") return;
            const entry = [e.detail.text, null];
            window.__vaeftStatus.push(entry);
            requestAnimationFrame(() => requestAnimationFrame(() => {{
                const el = {node_js(3)}.widgets.find(w => w.name === "status")?.inputEl;
                entry[1] = !!el && el.value === e.detail.text && el.scrollHeight <= el.clientHeight + 1
                    && el.scrollWidth <= el.clientWidth + 1;
            }}));
        }}); }}""")
    before = set(server.get("/history").json())
    # Run: the queue button (1.27 wraps it in a split button; 1.45 has a second "Run" button beside it, the
    # queue-mode menu)
    queue = page.get_by_test_id("queue-button")
    run = page.get_by_role("button", name="Run", exact=True).and_(queue).or_(
        queue.get_by_role("button", name="Run", exact=True))
    assert run.count() == 1, [run.nth(i).evaluate("e => e.outerHTML.slice(0, 200)") for i in range(run.count())]
    run.click()
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
    out_file = os.path.join(server.base, "output", "vae", f"vae-ft-{save_name}-2.safetensors")
    assert os.path.isfile(out_file)

    # while it trained, the node's status box showed each status text in full: the run, the step, the losses,
    # and at the end validation beside the base
    status = page.evaluate("() => window.__vaeftStatus")
    assert status and all(t.startswith("run ") for t, _ in status), status
    assert any("step" in t and "loss" in t.lower() for t, _ in status), status
    assert "validation (now / base)" in status[-1][0], status[-1]
    assert all(in_full for _, in_full in status), status

    # the Save node shows where the file went, in a box the page draws
    page.wait_for_function(f"() => ({node_js(4)}.widgets.find(w => w.name === 'result')?.value ?? '')"
                           f".includes({json.dumps(out_file)})", timeout=30_000)
    shown = [t for t in page.locator("textarea.comfy-multiline-input").all() if out_file in t.input_value()]
    assert shown and shown[0].is_visible()
    shot = screenshot(page, "vae_finetune-after-run")
    bb = shown[0].bounding_box()
    assert bb and bb["width"] > 50 and bb["height"] > 20, (bb, shot)
    assert shown[0].get_attribute("readonly") is not None
    # the last status stays on the node after the run, all of it in view inside the node (the screenshot)
    box = status_box(page)
    assert box["text"] == status[-1][0] and box["fits"], (box, shot)
    # previews drawn after the run (live reconstructions on VAE Fine-tune, the loss curve, sampled
    # patches) fit the room the template left: no node grew, nothing overlaps
    state = graph_state(page)
    assert {n["id"]: n["size"] for n in state} == loaded, f"a node grew after the run (see {shot})"
    assert overlaps(state) == [] and hidden_widgets(state) == [], shot
    assert page.evaluate(f"() => [6, 7].map(id => ({APP}.graph.nodes.find(n => Number(n.id) === id).imgs ?? [])"
                         ".length)") == [1, 1]
    assert open_dialogs(page) == [], shot
    if page.frontend == "pinned" and os.environ.get("VAEFT_WRITE_THUMBNAILS") == "1":
        write_thumbnail(page, "vae_finetune")

    # Refresh (R): stock Load VAE lists the new file without a restart
    page.evaluate("() => document.querySelector('#graph-canvas').focus()")  # no click: a panel may cover it
    page.keyboard.press("r")
    page.wait_for_function(f"() => {node_js(1)}.widgets[0].options.values"
                           f".includes('vae-ft-{save_name}-2.safetensors')", timeout=30_000)
