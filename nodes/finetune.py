"""Fine-tune node: trains a copy of the connected VAE; the cached input is never modified."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from comfy_api.latest import io

from ..training.config import MEMORY_FIELDS, RECIPES, TrainConfig
from ..training.export import file_state_dict
from ..training.families import models_text
from ..training.plot import history_curves, image_grid, to_pil
from ..training.checkpoint import latest_in
from ..training.runs import is_run_folder, named_run_folder
from ..training.session import Hooks, run_session
from .common import (Dataset, Trained, TrainOptions, comfy_vae_to_training, config_inputs, input_values,
                     file_to_comfy_vae, schema)

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
        names = sorted(n for n in os.listdir(root) if is_run_folder(os.path.join(root, n)))
    except OSError:
        names = []
    return [NEW_RUN] + names


def run_folder(run_name: str, continue_run: str) -> tuple[str, bool]:
    """(the run folder's path, whether it continues a run), see :func:`training.runs.named_run_folder`."""
    return named_run_folder(runs_root(), run_name, continue_run if continue_run != NEW_RUN else None,
                            f"output/{RUNS_FOLDER}")


# Widget order on the node: its essential TrainConfig fields (option(..., essential=True)); the rest
# come from VAE Fine-tune Options.
NODE_ORDER = ("recipe", "steps", "lr", "batch_size", "memory", "trainable", "seed")
# The recipes a fine-tune can use: distil's (distil-narrow, distil-tiny) need a teacher, and are the VAE Distil
# Decoder node's (the session refuses them without one).
FINE_TUNE_RECIPES = tuple(r for r in RECIPES if not r.startswith("distil-")) + ("custom",)


class VAEFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTFineTune",
            display_name="VAE Fine-tune",
            description=f"Fine-tune a VAE ({models_text()}) on a patch dataset "
                        "(default: sd-vae-ft-mse recipe, "
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
                *config_inputs(TrainConfig, order=NODE_ORDER, essential=True, choices={"recipe": FINE_TUNE_RECIPES}),
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

        cfg = config_from_widgets({**(options or {}), **kwargs}, dataset.cfg.patch_size)
        source = _source_file(cls.hidden.prompt, cls.hidden.unique_id)
        device = mm.get_torch_device()
        # Prompts run under inference_mode; training needs autograd, on tensors made outside it.
        with torch.inference_mode(False):
            base = comfy_vae_to_training(vae, source)
            path, resume = run_folder(run_name, continue_run)
            mm.unload_all_models()
            mm.soft_empty_cache()
            hooks = _NodeHooks(cfg.steps, os.path.basename(path), cls.hidden.unique_id)
            session = run_session(
                base, dataset, cfg, general=general, run_dir=path, resume=path if resume else None,
                inputs={"vae": source[1] if source else "the connected VAE", "dataset": _input_name(dataset.source),
                        "general": _input_name(general.source) if general is not None else None},
                input_paths="comfyui", device=device, importable=False, hooks=hooks.hooks())
            loop = session.loop
            if session.stopped:
                end_stopped_prompt(hooks, loop, path)
            out_vae = file_to_comfy_vae(file_state_dict(session.trained, "fp32"))
        return io.NodeOutput(out_vae, loss_map_of(loop.history), session.trained)


def end_stopped_prompt(hooks: "_NodeHooks", loop, path: str) -> None:
    """A stopped run (Cancel): say on the node where it stopped and how to continue it, then end the prompt as
    ComfyUI ends an interrupted one (raises)."""
    import comfy.model_management as mm

    newest = loop.checkpoint or latest_in(os.path.join(path, "checkpoints"))
    _send_text(f"run {hooks.run} stopped at step {loop.steps_done}/{loop.config.steps}"
               + (f"; its newest checkpoint is {os.path.basename(newest)}. Continue it: continue_run = "
                  f"{hooks.run}" if newest else "; no checkpoint was written yet (stopped before the "
                  "first step): queue it again as a new run"), hooks.node_id)
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


class _NodeHooks:
    """The session's hooks in ComfyUI: its progress bar (and preview image), the status text under
    the node (at most every 2 s, and at each history line), the log, and Cancel. ``label``: what the log
    lines call the run ("VAE fine-tune", "VAE distil")."""

    def __init__(self, steps: int, run: str, node_id, label: str = "VAE fine-tune"):
        import comfy.utils

        self.run, self.node_id, self.shown, self.cancelled, self.label = run, node_id, 0.0, False, label
        self.pbar = comfy.utils.ProgressBar(steps)

    def hooks(self) -> Hooks:
        import comfy.model_management as mm

        # Cancel / POST /interrupt: finish the micro-batch, checkpoint the step reached, then end the
        # prompt as ComfyUI does (execute); the server stays up.
        return Hooks(note=lambda text: log.info("%s: %s", self.label, text),
                     warn=lambda text: log.warning("%s: %s", self.label, text),
                     step=self.step, log=self.history_line, preview=self.preview,
                     should_stop=lambda: self.cancelled or mm.processing_interrupted())

    def progress(self, *args) -> None:
        import comfy.model_management as mm

        # ComfyUI's progress hook raises on Cancel; caught here so the trainer stops at the next
        # micro-batch and checkpoints the step reached instead of losing it
        try:
            self.pbar.update_absolute(*args)
        except mm.InterruptProcessingException:
            self.cancelled = True

    def show(self, status, force: bool = False) -> None:
        """Status text on the node (STATUS_EVENT), at most every 2 s."""
        if force or time.monotonic() - self.shown >= 2.0:
            self.shown = time.monotonic()
            _send_text(f"run {self.run}\n{status.text()}", self.node_id)

    def step(self, status) -> None:
        self.progress(status.step, status.total)
        self.show(status)

    def history_line(self, line, status) -> None:
        if "total" in line:
            log.info("%s step %d/%d: %s", self.label, line["step"], status.total,
                     ", ".join(f"{k}={v:.5f}" for k, v in line.items() if k != "step"))
        self.show(status, force=True)

    def preview(self, step, images) -> None:
        self.progress(step, self.pbar.total, ("JPEG", to_pil(image_grid(images, rows=2)), 768))


# The websocket event that carries the status text to the page: {"node": the node's id, "text": the lines}.
# Our own event, not ComfyUI's progress-text channel: newer frontends draw that in a generic box that gets
# what room the node's images leave it (frontend 1.45 cut our four to six lines at the node's edge), while
# web/vaeft.js shows this one in the node's own status box, made with the node and sized for the whole text.
STATUS_EVENT = "vaeft.status"


def _send_text(text: str, node_id) -> None:
    """The node's status text, to the page that queued the prompt (every page when it came without a client id,
    as ComfyUI's own progress messages go)."""
    try:
        from server import PromptServer

        server = PromptServer.instance
        if server is not None and node_id is not None:
            server.send_sync(STATUS_EVENT, {"node": str(node_id), "text": text}, getattr(server, "client_id", None))
    except Exception as e:  # noqa: BLE001 - a status line must never stop a run
        log.debug("status text not sent: %s", e)


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


def _source_file(prompt, unique_id, input_name: str = "vae") -> tuple[str, str] | None:
    """(model folder, file name) when the node's VAE input ``input_name`` comes straight from Load VAE or a
    checkpoint loader."""
    try:
        link = prompt[str(unique_id)]["inputs"][input_name]
        src = prompt[str(link[0])]["inputs"]
    except (KeyError, TypeError, IndexError):
        return None
    if isinstance(src.get("vae_name"), str):
        return ("vae", src["vae_name"])
    if isinstance(src.get("ckpt_name"), str) and link[1] == 2:  # checkpoint loaders output VAE third
        return ("checkpoints", src["ckpt_name"])
    return None
