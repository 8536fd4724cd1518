"""Evaluate node: two or more VAEs on the same held-out patches -> metrics table and comparison image."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..training.evaluate import compare, evaluation_patches, format_table, image_channels_of
from ..training.metrics import try_load_lpips
from .common import Dataset, comfy_vae_to_training, schema, training_to_image


class VAEEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTEvaluate",
            display_name="VAE Evaluate",
            description="PSNR, SSIM, LPIPS and colour fidelity (ΔE2000, channel shift) of several VAEs on the "
                        "same held-out patches, with rows of original | VAE A | VAE B | ... | error map.",
            search_aliases=["compare vae", "vae metrics"],
            inputs=[
                io.Vae.Input("vae_a", tooltip="usually the base VAE"),
                io.Vae.Input("vae_b", tooltip="usually the fine-tuned VAE"),
                io.Vae.Input("vae_c", optional=True, tooltip="a third VAE to compare (optional)"),
                io.Vae.Input("vae_d", optional=True, tooltip="a fourth VAE to compare (optional)"),
                Dataset.Input("dataset", tooltip="VAE Patch Dataset's output; its validation images are scored"),
                io.Int.Input("patches", default=32, min=1, max=4096,
                             tooltip="held-out patches to score (validation images; all images if none)"),
                io.Int.Input("rows", default=4, min=1, max=32, tooltip="rows in the comparison image"),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="seed for which held-out patches are drawn"),
                io.Combo.Input("lpips_net", options=["alex", "vgg"], default="alex",
                               tooltip="LPIPS backbone for the metric (alex, as the LPIPS paper reports)"),
            ],
            outputs=[io.String.Output("table", tooltip="the metrics table as text"),
                     io.Image.Output("comparison", tooltip="rows of original | A | B | ... | error map")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vae_a, vae_b, dataset, patches, rows, seed, lpips_net, vae_c=None, vae_d=None
                ) -> io.NodeOutput:
        import comfy.model_management as mm

        given = {"A": vae_a, "B": vae_b, "C": vae_c, "D": vae_d}
        device = mm.get_torch_device()
        with torch.inference_mode(False):
            models = {name: comfy_vae_to_training(v).model for name, v in given.items() if v is not None}
            x, info = evaluation_patches(dataset, patches, seed, channels=image_channels_of(models))  # RGB or RGBA
            net, availability = try_load_lpips(lpips_net)
            lpips = {"lpips_net": net} if net is not None else {"lpips_unavailable": availability["reason"]}
            results, grid = compare(models, x, rows=rows, device=device, **lpips)
        source = "validation images" if info["split"] == "validation" else \
            "all images (the dataset has no validation split)"
        table = f"{len(x)} patches from {source}\n" + (f"alpha: {info['alpha']}\n" if "alpha" in info else "") \
            + format_table(results)
        return io.NodeOutput(table, training_to_image(grid), ui=ui.PreviewText(table))
