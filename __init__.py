"""ComfyUI entry point (V3 schema): VAE fine-tuning nodes.

Outside ComfyUI (pytest collecting this folder, `python -m training`) there is no
`comfy_api`, and this file defines nothing: the `training` library stands alone.
"""

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:
    ComfyExtension = None

if ComfyExtension is not None:

    class VAEFineTuneExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            from .nodes import NODES

            return NODES

    async def comfy_entrypoint() -> VAEFineTuneExtension:
        return VAEFineTuneExtension()
