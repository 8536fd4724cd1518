"""Loss-graph node: draws a LOSS_MAP as an IMAGE."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.plot import curve_image
from .common import schema, training_to_image


class VAELossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTLossGraph",
            display_name="VAE Loss Graph",
            description="Draw VAE Fine-tune's loss history (every training term, and validation scores when "
                        "validation ran) as an image.",
            search_aliases=["vae loss plot"],
            inputs=[
                io.LossMap.Input("loss", tooltip="VAE Fine-tune's loss output"),
                io.Boolean.Input("log_scale", default=True, tooltip="logarithmic y axis (losses span decades)"),
            ],
            outputs=[io.Image.Output("image", tooltip="the curves, for Preview Image or Save Image")],
        )

    @classmethod
    def execute(cls, loss, log_scale) -> io.NodeOutput:
        series = {k: [float(x) for x in v] for k, v in loss.items()
                  if k not in ("steps", "val_steps") and isinstance(v, list)}
        # validation curves have their own steps (LOSS_MAP from VAE Fine-tune); others share "steps"
        steps = {k: loss.get("val_steps" if k.startswith(("val_", "gen_")) and "val_steps" in loss else "steps")
                 for k in series}
        img = curve_image(series, steps, log_y=log_scale, title="VAE fine-tune loss")
        return io.NodeOutput(training_to_image(img))
