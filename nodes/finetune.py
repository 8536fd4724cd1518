"""Fine-tune node: trains a copy of the connected VAE; the cached input is never modified."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from comfy_api.latest import io

from ..training.config import MEMORY_FIELDS, RECIPES, TrainConfig
from ..training.augment import augmenter
from ..training.checkpoint import peek
from ..training.data import preview_patches, worker_start_method
from ..training.errors import VAEFTError
from ..training.evaluate import evaluation_patches
from ..training.export import ldm_state_dict, make_probe, safe_name
from ..training.plot import image_grid, to_pil
from ..training.runs import MARKER, RunFolder, RunStatus, read_metrics, validation_patches
from ..training.trainer import Callbacks, fine_tune, history_curves
from .common import (Dataset, Trained, TrainOptions, comfy_vae_to_training, config_inputs, input_values,
                     ldm_to_comfy_vae, schema)

log = logging.getLogger("vaeft")
NEW_RUN = "new run"
RUNS_FOLDER = "vae_ft_runs"  # under ComfyUI's output folder


def runs_root() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER)


def run_choices() -> list[str]:
    """"new run", then the run folders under output/vae_ft_runs/ (read each time the page asks)."""
    root = runs_root()
    try:
        names = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, MARKER)))
    except OSError:
        names = []
    return [NEW_RUN] + names


def open_run(run_name: str, continue_run: str) -> tuple[RunFolder, str | None]:
    """(the run folder, the checkpoint to resume from or None). A new run gets a fresh folder named
    after ``run_name`` (-2, -3, ... when taken); continuing needs a run folder with a checkpoint."""
    root = runs_root()
    if continue_run and continue_run != NEW_RUN:
        path = os.path.join(root, safe_name(continue_run))
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise VAEFTError(f"continue_run {continue_run!r}: there is no such run in output/{RUNS_FOLDER}/")
        run = RunFolder.create(path, resume=True)
        resume = run.latest_checkpoint()
        if resume is None:
            raise VAEFTError(f"run {continue_run!r} has no checkpoint yet: it stopped before its first one; "
                             "start it again as a new run")
        return run, resume
    stem = safe_name(run_name or "vae-ft")
    os.makedirs(root, exist_ok=True)
    path, k = os.path.join(root, stem), 2
    while os.path.lexists(path):
        path, k = os.path.join(root, f"{stem}-{k}"), k + 1
    return RunFolder.create(path), None


# Widget order on the node: its essential TrainConfig fields (option(..., essential=True)); the rest
# come from VAE Fine-tune Options.
NODE_ORDER = ("recipe", "steps", "lr", "batch_size", "memory", "trainable", "seed")


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
                io.String.Input("run_name", default="vae-ft",
                                tooltip=f"the run's folder, output/{RUNS_FOLDER}/<run_name>/: config, metrics.jsonl, "
                                        "previews, checkpoints (TensorBoard events when tensorboard is installed); "
                                        "a taken name gets -2, -3, ..."),
                io.Combo.Input("continue_run", options=run_choices(), default=NEW_RUN,
                               tooltip="continue a stopped run (Cancel, a crash) from its newest checkpoint, with the "
                                       "same VAE, dataset and settings: the result equals an uninterrupted run. A "
                                       "finished run continues to a larger 'steps' (a cosine schedule is stretched "
                                       "to the new length from where it was; a constant one goes on). Refresh the "
                                       "page to see new runs"),
                Dataset.Input("general", optional=True,
                              tooltip="other images (another VAE Patch Dataset) validated beside the domain's as "
                                      "gen_*: does the fine-tune harm images it is not meant for?"),
            ],
            outputs=[
                io.Vae.Output("fine_tuned_vae", tooltip="the fine-tuned VAE, usable downstream at once"),
                io.LossMap.Output("loss", tooltip="loss history (and validation scores) for VAE Loss Graph"),
                Trained.Output("trained", tooltip="the trained state, for Save Fine-tuned VAE"),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vae, dataset, options=None, run_name="vae-ft", continue_run=NEW_RUN, general=None,
                **kwargs) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        cfg = config_from_widgets({**(options or {}), **kwargs}, dataset.cfg.patch_size)
        source = _source_file(cls.hidden.prompt, cls.hidden.unique_id)
        device = mm.get_torch_device()
        # Prompts run under inference_mode; training needs autograd, on tensors made outside it.
        with torch.inference_mode(False):
            base = comfy_vae_to_training(vae, source)
            run, resume = open_run(run_name, continue_run)
            mm.unload_all_models()
            mm.soft_empty_cache()
            pbar = comfy.utils.ProgressBar(cfg.steps)
            cancelled = [False]

            def progress(*args) -> None:
                # ComfyUI's progress hook raises on Cancel; caught here so the trainer stops at the next
                # micro-batch and checkpoints the step reached instead of losing it
                try:
                    pbar.update_absolute(*args)
                except mm.InterruptProcessingException:
                    cancelled[0] = True

            start = int(peek(resume)["step"]) if resume else 0
            status = RunStatus(cfg.steps, start, read_metrics(run.path) if resume else None)
            shown = [0.0]

            def show(force: bool = False) -> None:
                """Status text on the node (ComfyUI's progress-text channel), at most every 2 s."""
                if force or time.monotonic() - shown[0] >= 2.0:
                    shown[0] = time.monotonic()
                    _send_text(f"run {os.path.basename(run.path)}\n{status.text()}", cls.hidden.unique_id)

            def on_step(step, total, losses):
                status.step = step
                progress(step, total)
                show()

            def on_log(line):
                status.update(line)
                run.log(line)
                if "total" in line:
                    log.info("VAE fine-tune step %d/%d: %s", line["step"], cfg.steps,
                             ", ".join(f"{k}={v:.5f}" for k, v in line.items() if k != "step"))
                show(force=True)

            def on_preview(step, images):
                run.preview(step, images)
                progress(step, cfg.steps, ("JPEG", to_pil(image_grid(images, rows=2)), 768))

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
            val, cfg, note = validation_patches(dataset, cfg)
            if note:
                log.warning("VAE fine-tune: %s", note)
            gen = evaluation_patches(general, cfg.val_patches, cfg.seed, use_validation=False)[0] \
                if general is not None and cfg.val_every else None
            run.write_config({"vae": source[1] if source else "the connected VAE", "dataset": _input_name(dataset.source),
                              "general": _input_name(general.source) if general is not None else None},
                             {**dataclasses.asdict(dataset.cfg), **dataclasses.asdict(cfg)}, paths="comfyui")
            if resume:
                run.rewind(start)
            try:
                result = fine_tune(
                    base, batches, cfg, device=device, augment=augmenter(dataset.cfg), preview_batch=preview,
                    val_batch=val, general_batch=gen, resume=resume, checkpoints=run.checkpoints(cfg),
                    data_signature=dataset.order_signature(),
                    callbacks=Callbacks(
                        on_step=on_step, on_log=on_log, on_preview=on_preview,
                        # Cancel / POST /interrupt: finish the micro-batch, checkpoint the step reached,
                        # then end the prompt as ComfyUI does (below); the server stays up.
                        should_stop=lambda: cancelled[0] or mm.processing_interrupted(),
                    ),
                )
            finally:
                run.close()
            if result.stopped_early:
                status.step = result.steps_done
                _send_text(f"run {os.path.basename(run.path)} stopped at step {result.steps_done}/{cfg.steps}"
                           + (f"; checkpoint written. Continue it: continue_run = {os.path.basename(run.path)}"
                              if result.checkpoint else "; no checkpoint (stopped before the first step)"),
                           cls.hidden.unique_id)
                mm.throw_exception_if_processing_interrupted()
                raise mm.InterruptProcessingException()
            result.model.to("cpu")
            result.export_probe = make_probe(base, dataset, seed=cfg.seed, device=device)  # for Save's fp16 check
            out_vae = ldm_to_comfy_vae(ldm_state_dict(result, "fp32"))
        loss_map = loss_map_of(result.history)
        result.dataset_summary = dataset.summary()
        return io.NodeOutput(out_vae, loss_map, result)


def _send_text(text: str, node_id) -> None:
    """Text under the node while it runs (the frontend draws ComfyUI's progress-text messages)."""
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.send_progress_text(text, str(node_id))
    except Exception as e:  # noqa: BLE001 - a status line must never stop a run
        log.debug("progress text not sent: %s", e)


def _input_name(source: str) -> str:
    """A dataset's source as a name inside ComfyUI's input folder (never the absolute path)."""
    import folder_paths

    root = os.path.abspath(folder_paths.get_input_directory())
    path = os.path.abspath(source) if os.path.isabs(source) else None
    if path and os.path.commonpath([root, path]) == root:
        return os.path.relpath(path, root)
    return os.path.basename(source) if path else source


def loss_map_of(history: list[dict]) -> dict:
    """LOSS_MAP for ComfyUI: "loss" (the total, what stock Plot Loss Graph draws) and the other training
    terms over "steps"; validation scores over "val_steps" (stock nodes cannot take NaN gaps)."""
    values, steps = history_curves(history)
    out = {"loss": values.pop("total", []), "steps": steps.pop("total", []), **values}
    val_steps = [steps[k] for k in values if k.startswith(("val_", "gen_"))]
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
