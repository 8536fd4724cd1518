"""ComfyUI entry point (V3 schema): VAE fine-tuning nodes.

Outside ComfyUI (pytest collecting this folder, `python -m training`) there is no
`comfy_api`, and this file defines nothing: the `training` library stands alone.
Inside a ComfyUI older than ``[tool.comfy] requires-comfyui`` (pyproject.toml), it logs
one error naming the version needed and registers no nodes.
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


# Loaded by ComfyUI (a relative import works, and ComfyUI's modules are there) rather than by pytest.
if __package__ and "folder_paths" in sys.modules:
    _error = _too_old()
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
