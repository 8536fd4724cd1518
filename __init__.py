"""ComfyUI entry point (V3 schema): VAE fine-tuning nodes.

Outside ComfyUI (pytest collecting this folder, `python -m training`) there is no
`comfy_api`, and this file defines nothing: the `training` library stands alone.
Inside a ComfyUI older than ``[tool.comfy] requires-comfyui`` (pyproject.toml), or without this
pack's requirements (requirements.txt) importable at their versions, it logs one error naming what
is needed (and the command that installs it) and registers no nodes.
"""

from __future__ import annotations

import logging
import sys

# Our frontend extension (web/vaeft.js): shows the text our output nodes return.
WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:
    ComfyExtension = None


def _version_tuple(text: str) -> tuple:
    return tuple(int(p) for p in text.lstrip("v").split(".")[:3] if p.isdigit())


def _too_old() -> str | None:
    """The error to log when this ComfyUI is older than requires-comfyui, else None."""
    from .training import project_metadata

    need = project_metadata().get("tool", {}).get("comfy", {}).get("requires-comfyui", "").lstrip(">= ")
    have = getattr(sys.modules.get("comfyui_version"), "__version__", None)
    if ComfyExtension is not None and (not need or not have or _version_tuple(have) >= _version_tuple(need)):
        return None
    missing = "" if ComfyExtension is not None else ", without it"
    return (f"VAE Fine-tune needs ComfyUI {need or '(see pyproject.toml)'} or newer, with its V3 node API "
            f"(comfy_api.latest); this is ComfyUI {have or 'of an unknown, older version'}{missing}. No VAE "
            "Fine-tune nodes are loaded: update ComfyUI (git pull, or ComfyUI-Manager's Update ComfyUI) and restart.")


def _missing_requirements() -> str | None:
    """The error to log when a requirement of this pack (requirements.txt, what the Manager installs) does not
    import or is older than required, else None: found now, not mid-run when it is first used."""
    import importlib
    import importlib.metadata
    import os
    import re

    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")) as f:
            lines = [line.split("#")[0].strip() for line in f]
    except OSError:
        return None
    problems = []
    for req in filter(None, lines):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9.]*))?", req)
        if not m:
            continue
        name, need = m.group(1), m.group(2)
        try:
            importlib.import_module(name.replace("-", "_"))
            have = importlib.metadata.version(name)
        except Exception as e:  # noqa: BLE001 - missing, or installed but broken: either way it cannot be used
            problems.append((req, f"does not import: {type(e).__name__}: {str(e)[:160]}"))
            continue
        if need and _version_tuple(have) < _version_tuple(need):
            problems.append((req, f"{have} is installed"))
    if not problems:
        return None
    command = f'"{sys.executable}" -m pip install ' + " ".join(f'"{req}"' for req, _ in problems)
    return ("VAE Fine-tune needs " + "; ".join(f"{req} ({why})" for req, why in problems) + ". No VAE Fine-tune "
            f"nodes are loaded: install into ComfyUI's Python with {command} (or run python install.py in this "
            "pack's folder), then restart ComfyUI.")


# Loaded by ComfyUI (a relative import works, and ComfyUI's modules are there) rather than by pytest.
if __package__ and "folder_paths" in sys.modules:
    _error = _too_old() or _missing_requirements()
    if _error:
        logging.getLogger("vaeft").error(_error)
        NODE_CLASS_MAPPINGS = {}  # loaded with no nodes, so ComfyUI adds no second, vaguer warning
        ComfyExtension = None

if ComfyExtension is not None:

    class VAEFineTuneExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            from .nodes import NODES

            return NODES

    async def comfy_entrypoint() -> VAEFineTuneExtension:
        return VAEFineTuneExtension()
