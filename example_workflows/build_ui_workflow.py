"""Build the UI-format templates (example_workflows/<name>.json) from the API-format examples
(examples/api/<name>_api.json) and a running ComfyUI's /object_info, so the two never drift apart:

    python example_workflows/build_ui_workflow.py http://127.0.0.1:8188

Each node's size is computed from its live input/output/widget counts the way the frontend sizes a node
(LGraphNode.computeSize in ComfyUI frontend 1.27), plus room for what it shows during and after a run (images,
our status and result text), and nodes are laid out in columns by their depth in the graph, so none overlaps
another before or after a run. The integration tests rebuild every template against a real ComfyUI (0.3.64 and
0.28.2 give the same files) and compare with the committed files; the browser test checks the sizes and the
layout in a real page.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
API_DIR = os.path.join(os.path.dirname(HERE), "examples", "api")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# LiteGraph's metrics (frontend 1.27): slot and widget rows, the gap after each widget, padding.
SLOT_H, WIDGET_H, WIDGET_GAP, WIDGETS_PAD, NODE_PAD, TITLE_H = 20, 20, 4, 8, 6, 30
NODE_W = 400
# The read-only box web/vaeft.js adds to this pack's output nodes (a multi-line text widget).
RESULT_BOX_H = 80
# The training nodes' status box (web/vaeft.js STATUS_LINES: 14 px lines and 12 px of padding, a fixed height): seven
# lines on VAE Fine-tune, eleven on VAE Distil Decoder (its validation scores the student against the teacher too).
STATUS_LINES = {"VAEFTFineTune": 7, "VAEFTDistilDecoder": 11}
# Room for images drawn on a node (the frontend's image-preview widget needs at least 220 px):
# preview nodes show the picture, the training nodes their live reconstructions while they train.
IMAGE_H = {"PreviewImage": 320, "SaveImage": 320, "VAEFTFineTune": 240, "VAEFTDistilDecoder": 240}
GAP_X, GAP_Y, ORIGIN = 60, 40, (40, 80)
# The VAE file a template's Load VAE names, and its public source. The node carries it as
# properties.models ({name, url, directory}), the shape ComfyUI's own templates use, so a frontend that
# does not find the file in models/vae says which file it is, where it goes and where to get it.
TEMPLATE_VAES = {
    "vae-ft-mse-840000-ema-pruned.safetensors": "https://huggingface.co/stabilityai/sd-vae-ft-mse-original/"
                                                "resolve/main/vae-ft-mse-840000-ema-pruned.safetensors?download=true",
    "qwen_image_vae.safetensors": "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/"
                                  "resolve/main/split_files/vae/qwen_image_vae.safetensors",
    # the FLUX.2 VAE as ComfyUI's own FLUX.2 templates name it and where they fetch it from
    "flux2-vae.safetensors": "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/"
                             "flux2-vae.safetensors",
    # Wan 2.2 (TI2V-5B) and Qwen-Image 2.1 as Comfy-Org's repackaged releases name them
    "wan2.2_vae.safetensors": "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/"
                              "split_files/vae/wan2.2_vae.safetensors",
    "qwen_image_2.1_vae_bf16.safetensors": "https://huggingface.co/Comfy-Org/Qwen-Image-2.1/resolve/main/vae/"
                                           "qwen_image_2.1_vae_bf16.safetensors",
}
# VAE files a user makes with this pack, which no one can download: the simple template's Save Fine-tuned VAE
# writes vae-ft-<name>-<steps>.safetensors (name "custom", 2000 steps). Such a Load VAE carries no models entry
# (a frontend would offer a download that cannot exist); a user without the file picks their own in the list.
OWN_VAES = ("vae-ft-custom-2000.safetensors",)


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, kind, options: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this one (it does for an
    INT spec that asks for it, and for any INT named seed or noise_seed that does not refuse it)."""
    if kind != "INT":
        return False
    wanted = options.get("control_after_generate")
    return bool(wanted) if wanted is not None else name in ("seed", "noise_seed")


def _shows_result_text(info: dict, pack_module: str | None) -> bool:
    """web/vaeft.js gives every output node of this pack a result box (the same rule as there)."""
    return bool(info.get("output_node")) and pack_module is not None and info.get("python_module") == pack_module


def node_size(class_type: str, info: dict, widget_rows: int, socket_inputs: int, outputs: int,
              pack_module: str | None) -> list[int]:
    """[width, height] of a node's body (the title bar sits above it), as the frontend computes it plus
    the room its images, status and result text take during and after a run."""
    rows = max(socket_inputs, outputs, 1)
    h = rows * SLOT_H
    widgets = widget_rows * (WIDGET_H + WIDGET_GAP)
    if _shows_result_text(info, pack_module):
        widgets += RESULT_BOX_H + WIDGET_GAP
    if class_type in STATUS_LINES and info.get("python_module") == pack_module:
        widgets += STATUS_LINES[class_type] * 14 + 12 + WIDGET_GAP
    if class_type in IMAGE_H:
        widgets += IMAGE_H[class_type] + WIDGET_GAP
    if widgets:
        h += widgets + WIDGETS_PAD
    return [NODE_W, h + NODE_PAD]


def _properties(nid: str, node: dict) -> dict:
    """The node's properties: its S&R name, and for Load VAE the model it names (see TEMPLATE_VAES)."""
    props = {"Node name for S&R": node["class_type"]}
    if node["class_type"] == "VAELoader":
        name = node["inputs"].get("vae_name")
        if name in OWN_VAES:
            return props
        if name not in TEMPLATE_VAES:
            raise ValueError(f"node {nid} (Load VAE) names {name!r}, a file with no known public source: a template "
                             f"must name one of {sorted(TEMPLATE_VAES)} (or add the file and its URL to TEMPLATE_VAES), or a file "
                             f"the pack writes ({', '.join(OWN_VAES)})")
        props["models"] = [{"name": name, "url": TEMPLATE_VAES[name], "directory": "vae"}]
    return props


def _columns(api: dict) -> dict[str, int]:
    """Column of each node: its depth from the sources; a source sits just left of its first consumer."""
    deps = {nid: {v[0] for v in n["inputs"].values() if isinstance(v, list)} for nid, n in api.items()}
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            depth[nid] = 1 + max((d(p) for p in deps[nid]), default=-1)
        return depth[nid]

    for nid in api:
        d(nid)
    for nid in api:
        consumers = [c for c, ps in deps.items() if nid in ps]
        if not deps[nid] and consumers:
            depth[nid] = max(depth[nid], min(depth[c] for c in consumers) - 1)
    return depth


def build(api: dict, object_info: dict) -> dict:
    pack_module = object_info.get("VAEFTFineTune", {}).get("python_module")
    nodes, links = [], []
    link_id = 0
    out_links: dict[tuple[str, int], list[int]] = {}
    incoming: dict[str, dict[str, int]] = {}
    for dst, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id += 1
                src, slot = value
                src_type = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(dst), None, src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                incoming.setdefault(dst, {})[name] = link_id
    columns = _columns(api)
    col_x: dict[int, int] = {}
    col_y: dict[int, int] = {}
    for c in sorted(set(columns.values())):
        col_x[c] = ORIGIN[0] + c * (NODE_W + GAP_X)
        col_y[c] = ORIGIN[1]
    for order, (nid, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        widget_rows = 0
        spec_all = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order_names = info.get("input_order", {})
        names = order_names.get("required", []) + order_names.get("optional", [])
        for name in names:
            spec = spec_all[name]
            if _is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                widgets.append(node["inputs"].get(name, options.get("default")))
                widget_rows += 1
                if _has_control_widget(name, spec[0], options):
                    widgets.append("fixed")  # the saved value of the frontend's added control widget
                    widget_rows += 1
            else:
                link = incoming.get(nid, {}).get(name)
                inputs.append({"name": name, "type": spec[0], "link": link})
                if link is not None:
                    links[link - 1][4] = len(inputs) - 1
        outputs = [{"name": oname, "type": otype, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))]
        if info.get("python_module") != pack_module:
            # A core node's outputs after the last one the template links are left out: ComfyUI adds outputs
            # to its own nodes from one version to the next (0.28 gave Preview Image an IMAGE output), and
            # the frontend gives a loaded node the outputs its live definition has. This pack's nodes keep
            # every output: their names are the same on every ComfyUI (nodes/common.py schema).
            while outputs and not outputs[-1]["links"]:
                outputs.pop()
        size = node_size(node["class_type"], info, widget_rows, len(inputs), len(outputs), pack_module)
        c = columns[nid]
        pos = [col_x[c], col_y[c]]
        col_y[c] += size[1] + TITLE_H + GAP_Y
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": pos, "size": size,
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "title": node.get("_meta", {}).get("title"),
                      "properties": _properties(nid, node), "widgets_values": widgets})
    return {"last_node_id": max(int(k) for k in api), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def api_examples() -> dict[str, str]:
    """{template name: API-format example path}: examples/api/<name>_api.json -> template <name>."""
    return {os.path.basename(p)[: -len("_api.json")]: p for p in sorted(glob.glob(os.path.join(API_DIR, "*_api.json")))}


def main(url: str) -> None:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info") as r:
        info = json.load(r)
    for name, path in api_examples().items():
        with open(path) as f:
            api = json.load(f)
        out = os.path.join(HERE, name + ".json")
        with open(out, "w") as f:
            json.dump(build(api, info), f, indent=1)
            f.write("\n")
        print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188")
