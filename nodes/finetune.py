"""Fine-tune node: trains a copy of the connected VAE; the cached input is never modified."""

from __future__ import annotations

import dataclasses
import logging

import torch
from comfy_api.latest import io

from ..training.config import MEMORY_FIELDS, RECIPES, TrainConfig
from ..training.data import augmenter, preview_patches, worker_start_method
from ..training.export import ldm_state_dict
from ..training.trainer import Callbacks, fine_tune, history_curves
from .common import (Dataset, Trained, TrainOptions, comfy_vae_to_training, config_inputs, input_values,
                     ldm_to_comfy_vae, schema)

log = logging.getLogger("vaeft")
# Widget order on the node: its essential TrainConfig fields (option(..., essential=True)); the rest
# come from VAE Fine-tune Options.
NODE_ORDER = ("recipe", "steps", "lr", "batch_size", "memory", "trainable", "seed")


def _preview_image(images: torch.Tensor):
    """(2N, 3, H, W) [0, 1] (inputs then reconstructions) -> a PIL image for the progress display."""
    from PIL import Image

    from ..training.plot import image_grid

    grid = image_grid(images, rows=2)
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype("uint8")
    return Image.fromarray(arr)


class VAEFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTFineTune",
            display_name="VAE Fine-tune",
            description="Fine-tune a kl-f8 VAE on a patch dataset (default: sd-vae-ft-mse recipe, "
                        "MSE + 0.1·LPIPS, decoder only, EMA). Decoder-only keeps the latent space, so "
                        "existing diffusion models work with the result. Loss weights, EMA, schedule, "
                        "validation and speed settings are on VAE Fine-tune Options.",
            search_aliases=["train vae", "vae training", "finetune vae"],
            inputs=[
                io.Vae.Input("vae", tooltip="the VAE to start from (Load VAE, or a checkpoint loader's VAE); "
                                            "it is copied, never changed"),
                Dataset.Input("dataset", tooltip="patches from VAE Patch Dataset"),
                TrainOptions.Input("options", optional=True,
                                   tooltip="every other setting, from VAE Fine-tune Options (unconnected: "
                                           "the recipe's and memory preset's defaults)"),
                *config_inputs(TrainConfig, order=NODE_ORDER, essential=True),
            ],
            outputs=[
                io.Vae.Output("fine_tuned_vae", tooltip="the fine-tuned VAE, usable downstream at once"),
                io.LossMap.Output("loss", tooltip="loss history (and validation scores) for VAE Loss Graph"),
                Trained.Output("trained", tooltip="the trained state, for Save Fine-tuned VAE"),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vae, dataset, options=None, **kwargs) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        cfg = config_from_widgets({**(options or {}), **kwargs}, dataset.cfg.patch_size)
        device = mm.get_torch_device()
        # Prompts run under inference_mode; training needs autograd, on tensors made outside it.
        with torch.inference_mode(False):
            base = comfy_vae_to_training(vae, _source_file(cls.hidden.prompt, cls.hidden.unique_id))
            mm.unload_all_models()
            mm.soft_empty_cache()
            pbar = comfy.utils.ProgressBar(cfg.steps)

            def on_step(step, total, losses):
                pbar.update_absolute(step, total)
                if losses:
                    log.info("VAE fine-tune step %d/%d: %s", step, total,
                             ", ".join(f"{k}={v:.5f}" for k, v in losses.items() if k not in ("step",)))

            def on_preview(step, images):
                pbar.update_absolute(step, cfg.steps, ("JPEG", _preview_image(images), 768))

            pin = device.type == "cuda"
            workers, method = dataset.cfg.num_workers, None
            if workers:
                method = worker_start_method(importable=False)
                if method is None:
                    log.warning("VAE fine-tune: num_workers=%d needs the 'fork' start method, which this "
                                "platform lacks for custom nodes; loading patches in the main process", workers)
                    workers = 0
            batches = lambda start: dataset.train_batches(cfg.batch_size, start_batch=start, pin_memory=pin,  # noqa: E731
                                                          with_keys=True, num_workers=workers,
                                                          start_method=method)
            preview = preview_patches(dataset, 4, seed=cfg.seed) if cfg.preview_every else None
            val = dataset.val_patches(cfg.val_patches, seed=cfg.seed) if cfg.val_every else None
            result = fine_tune(
                base, batches, cfg, device=device,
                augment=augmenter(dataset.cfg),
                preview_batch=preview,
                val_batch=val,
                callbacks=Callbacks(
                    on_step=on_step, on_preview=on_preview,
                    # Raises InterruptProcessingException on Cancel / POST /interrupt: ComfyUI
                    # ends the prompt cleanly and the server stays up.
                    should_stop=lambda: mm.throw_exception_if_processing_interrupted() or False,
                ),
            )
            result.model.to("cpu")
            out_vae = ldm_to_comfy_vae(ldm_state_dict(result, "fp32"))
        loss_map = loss_map_of(result.history)
        result.dataset_summary = dataset.summary()
        return io.NodeOutput(out_vae, loss_map, result)


def loss_map_of(history: list[dict]) -> dict:
    """LOSS_MAP for ComfyUI: "loss" (the total, what stock Plot Loss Graph draws) and the other training
    terms over "steps"; validation scores over "val_steps" (stock nodes cannot take NaN gaps)."""
    values, steps = history_curves(history)
    out = {"loss": values.pop("total", []), "steps": steps.pop("total", []), **values}
    val_steps = [steps[k] for k in values if k.startswith("val_")]
    if val_steps:
        out["val_steps"] = val_steps[0]
    return out


def config_from_widgets(widgets: dict, patch_size: int | None = None) -> TrainConfig:
    """TrainConfig from the node's widgets and its options node's values. A loss/trainable setting left
    at its default takes the chosen recipe's value (so picking 'sd-vae-ft-ema' gives L1 + 1.0·LPIPS),
    and a micro_batch / grad_checkpointing / latent_cache_mb left at its default the memory preset's
    (sized for ``patch_size``); a changed value overrides either."""
    recipe = widgets.get("recipe", "sd-vae-ft-mse")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    controlled = set(RECIPES.get(recipe, {})) | set(MEMORY_FIELDS)
    given = {k: v for k, v in input_values(TrainConfig, widgets).items()
             if k != "recipe" and not (k in controlled and v == defaults[k])}
    return TrainConfig.from_recipe(recipe, patch_size, **given)


def _source_file(prompt, unique_id) -> tuple[str, str] | None:
    """(model folder, file name) when the VAE input comes straight from Load VAE or a checkpoint loader."""
    try:
        link = prompt[str(unique_id)]["inputs"]["vae"]
        src = prompt[str(link[0])]["inputs"]
    except (KeyError, TypeError, IndexError):
        return None
    if isinstance(src.get("vae_name"), str):
        return ("vae", src["vae_name"])
    if isinstance(src.get("ckpt_name"), str) and link[1] == 2:  # checkpoint loaders output VAE third
        return ("checkpoints", src["ckpt_name"])
    return None
