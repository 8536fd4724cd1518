"""Build the UI-format example (vae_finetune.json) from the API-format one and a running ComfyUI's
/object_info, so the two examples never drift apart.

    python example_workflows/build_ui_workflow.py http://127.0.0.1:8188 > example_workflows/vae_finetune.json

The integration tests rebuild it against a real ComfyUI and compare with the committed file.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Left-to-right columns for the example's nodes (id -> (x, y)).
POSITIONS = {"1": (40, 80), "2": (40, 260), "3": (520, 80), "4": (1000, 80), "5": (1000, 300),
             "6": (1300, 300), "7": (520, 760)}


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


def build(api: dict, object_info: dict) -> dict:
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
    for order, (nid, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        spec_all = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order_names = info.get("input_order", {})
        names = order_names.get("required", []) + order_names.get("optional", [])
        for name in names:
            spec = spec_all[name]
            if _is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                widgets.append(node["inputs"].get(name, options.get("default")))
                if _has_control_widget(name, spec[0], options):
                    widgets.append("fixed")  # the saved value of the frontend's added control widget
            else:
                link = incoming.get(nid, {}).get(name)
                inputs.append({"name": name, "type": spec[0], "link": link})
                if link is not None:
                    links[link - 1][4] = len(inputs) - 1
        outputs = [{"name": oname, "type": otype, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))]
        x, y = POSITIONS.get(nid, (40 + 300 * order, 900))
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [x, y], "size": [420, 120],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "title": node.get("_meta", {}).get("title"),
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    return {"last_node_id": max(int(k) for k in api), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main(url: str) -> None:
    with open(os.path.join(HERE, "vae_finetune_api.json")) as f:
        api = json.load(f)
    with urllib.request.urlopen(url.rstrip("/") + "/object_info") as r:
        info = json.load(r)
    json.dump(build(api, info), sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188")
