"""Options nodes: the settings that are not essential (option(..., essential=False), the default) for
VAE Fine-tune and VAE Patch Dataset, as ComfyUI's own "... Options" nodes do (e.g. OpenAI Chat
Advanced Options): the main nodes stay short, and an unconnected options socket means the defaults.

ComfyUI 0.3.64 has no working per-widget "advanced" flag (frontend 1.27's litegraph can hide
``widget.advanced`` widgets, but nothing sets that from a node definition), so a typed socket it is.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..training.config import TrainConfig
from ..training.config import DataConfig
from .common import PatchOptions, TrainOptions, config_inputs, input_values, schema

# Loss terms first (what a recipe sets), then optimisation, validation, speed and memory.
TRAIN_ORDER = ("mse_weight", "l1_weight", "lpips_weight", "lpips_net", "kl_weight", "gan_weight", "disc_start",
               "latent_weight", "ema", "ema_decay", "export_ema", "warmup_steps", "lr_schedule", "weight_decay",
               "grad_clip", "posterior", "val_every", "val_patches", "export_best", "log_every", "preview_every")
PATCH_ORDER = ("grid_overlap", "min_foreground", "scale_jitter", "flip", "rotate90", "color_jitter")


class VAEFineTuneOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTFineTuneOptions",
            display_name="VAE Fine-tune Options",
            description="Every VAE Fine-tune setting that is not on the node itself: loss weights (a weight "
                        "left at its default takes the recipe's value), EMA, schedule, validation, previews, "
                        "and the speed/memory switches (micro_batch, grad_checkpointing and latent_cache_mb "
                        "left at their defaults take the memory preset's). Connect to VAE Fine-tune's "
                        "options input.",
            search_aliases=["vae fine-tune advanced", "vae training options"],
            inputs=config_inputs(TrainConfig, order=TRAIN_ORDER, essential=False),
            outputs=[TrainOptions.Output("options", tooltip="connect to VAE Fine-tune's options input")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(input_values(TrainConfig, kwargs))


class VAEPatchOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTPatchOptions",
            display_name="VAE Patch Options",
            description="Every VAE Patch Dataset setting that is not on the node itself: grid overlap, "
                        "foreground fraction, scale jitter, augmentation, caching and loading. Connect to VAE "
                        "Patch Dataset's options input.",
            search_aliases=["vae dataset advanced", "patch augmentation"],
            # mask_dir is VAE Patch Dataset's mask_folder (a folder inside ComfyUI's input directory)
            inputs=config_inputs(DataConfig, skip=("mask_dir",), order=PATCH_ORDER, essential=False),
            outputs=[PatchOptions.Output("options", tooltip="connect to VAE Patch Dataset's options input")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(input_values(DataConfig, kwargs))
