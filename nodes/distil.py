"""Distil node: a faster student decoder learns the connected VAE's decode on the dataset's patches
(training/distil.py, the CLI's ``python -m training distil``), through the one session the fine-tune uses.

A narrow student is written as a VAE file into output/vae/ (Load VAE lists it), a tiny one as ComfyUI's preview
decoder into models/vae_approx/; either file is refused before training when it exists."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from comfy_api.latest import io, ui

from ..training.config import DistilConfig, TrainConfig
from ..training.distil import check_tiny_out, export_narrow, export_tiny, own_files, run_distil, tiny_names
from ..training.errors import VAEFTError
from ..training.export import file_state_dict, safe_name
from ..training.families import LATENT_CHOICES, latent_choices_text
from ..training.students import decoder_widths
from ..training.vae import model_to_file
from .common import FLOAT_STEP, Dataset, TrainOptions, comfy_vae_to_training, config_from_inputs, \
    config_inputs, file_to_comfy_vae, schema
from .finetune import (NEW_RUN, RUNS_FOLDER, _NodeHooks, _input_name, _send_text, _source_file, config_from_widgets,
                       end_stopped_prompt, loss_map_of, run_choices, run_folder)
from .save import vae_output_folder

log = logging.getLogger("vaeft")

# Widget order: what the student is, then the run's essential settings (VAE Fine-tune's, less the recipe, which is
# distil-<student>, and trainable, which is the decoder). lr is on the node, after steps, but as its own input
# (:func:`_lr_input`): 0, its default, means the student's recipe lr, which differs per student.
DISTIL_ORDER = ("student", "width", "with_encoder")
TRAIN_ORDER = ("steps", "batch_size", "memory", "seed")
NOT_ON_NODE = ("recipe", "trainable")


def distil_filename(name: str, dcfg: DistilConfig, steps: int) -> str:
    """``vae-distil-narrow<width>-<name>-<steps>.safetensors``: says what the file is beside the teacher's and the
    fine-tunes' (vae-ft-*) in Load VAE's list."""
    return f"vae-distil-narrow{dcfg.width}-{safe_name(name)}-{steps}.safetensors"


def tiny_folder() -> str:
    """ComfyUI's first models/vae_approx folder (made when missing): where its previews and Load VAE look for
    taesd_decoder.* files."""
    import folder_paths

    folder = folder_paths.get_folder_paths("vae_approx")[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def distil_train_config(widgets: dict, student: str, patch_size: int) -> TrainConfig:
    """TrainConfig from the node's widgets and VAE Fine-tune Options' values with the recipe distil-<student>:
    a loss weight left at its default takes the recipe's value (see :func:`nodes.finetune.config_from_widgets`).
    A tiny student never takes the memory preset's gradient checkpointing (the presets are sized for the family
    decoders; a tiny one needs little memory and the library refuses checkpointing it).
    ``lr`` 0 (the node's default) or absent means the recipe's lr (distil-narrow 1e-4, distil-tiny 5e-4); a value
    above 0 overrides it, whatever it is (config_from_widgets would drop one equal to TrainConfig's default, 1e-5,
    as "left at its default", so it is set here)."""
    given = {k: v for k, v in widgets.items() if k not in NOT_ON_NODE and k != "lr"}
    cfg = config_from_widgets({**given, "recipe": f"distil-{student}"}, patch_size)
    lr = widgets.get("lr") or 0.0
    if lr > 0:
        cfg = cfg.replace(lr=float(lr))
    if student == "tiny" and cfg.grad_checkpointing and not widgets.get("grad_checkpointing"):
        cfg = cfg.replace(grad_checkpointing=False)
    return cfg


def _image_weight_input() -> io.Float.Input:
    """TrainConfig.image_weight (node=False: not on VAE Fine-tune or its options), from its declaration."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == "image_weight")
    meta = f.metadata
    return io.Float.Input("image_weight", default=f.default, min=meta.get("min", 0.0), max=meta.get("max", 10.0),
                          step=meta.get("ui_step", 0.01), round=meta.get("ui_step", 0.01), tooltip=meta["help"])


def _lr_input() -> io.Float.Input:
    """TrainConfig.lr with 0 for the student's recipe lr (the field's own default, 1e-5, is the fine-tunes'; a
    student's recipe has its own): its help, bounds and step (fine enough for 1e-5-scale values), from its
    declaration."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr")
    meta = f.metadata
    step = meta.get("ui_step", FLOAT_STEP)
    return io.Float.Input("lr", default=0.0, min=0.0, max=meta.get("max", 1.0), step=step, round=step,
                          tooltip=f"{meta['help']}; 0: the student's recipe lr (narrow 1e-4, tiny 5e-4), a value "
                                  "above 0 overrides it")


def _train_inputs() -> list:
    """The run's essential settings (TRAIN_ORDER), with lr right after steps."""
    inputs = config_inputs(TrainConfig, order=TRAIN_ORDER, essential=True, skip=NOT_ON_NODE + ("lr",))
    at = next(i for i, inp in enumerate(inputs) if inp.id == "steps") + 1
    return inputs[:at] + [_lr_input()] + inputs[at:]


def _check_comfy_reads(student) -> None:
    """Refuse, before training, a narrow student this ComfyUI's own VAE cannot be built from (its Load VAE reads
    a narrower decoder from 0.28 on, comfy/sd.py's ``decoder_ch``; older ones fail on the sizes)."""
    try:
        file_to_comfy_vae({k: v.float() for k, v in model_to_file(student.model, student.layout).items()})
    except Exception as e:  # noqa: BLE001 - any failure of ComfyUI's own reader means the same to the user
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")[:300]
        widths = decoder_widths(student.model)
        raise VAEFTError(f"this ComfyUI's Load VAE cannot read a narrow decoder (widths {widths}): "
                         f"its VAE loader failed on the student ({type(e).__name__}: {why}). ComfyUI 0.28.2 reads one; "
                         "here, distil a tiny student, or a narrow one from the command line: python -m training "
                         "distil --student narrow ...") from None


class VAEDistilDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTDistilDecoder",
            display_name="VAE Distil Decoder",
            description="Distil a faster decoder from the connected VAE (the teacher) on a patch dataset: the "
                        "student learns the teacher's decode of the teacher's own latents, so it keeps the latent "
                        "space. narrow: the teacher's layout with a narrower decoder, saved as "
                        "output/vae/vae-distil-narrow<width>-<name>-<steps>.safetensors (Load VAE lists it; kl-f8 "
                        "and Flux.2). tiny: a TAESD-layout decoder for ComfyUI's previews, saved as "
                        "models/vae_approx/<taesd>_decoder.ft-<name>.safetensors (kl-f8 and Flux.2). Shows the "
                        "student against the teacher (PSNR, LPIPS) and both decode times. Loss weights, EMA, "
                        "validation and previews are on VAE Fine-tune Options.",
            search_aliases=["distil vae", "distill vae", "faster vae decoder", "tiny vae", "taesd", "narrow vae"],
            inputs=[
                # (not "vae": ComfyUI 0.3.x refuses a node whose input and output share an id)
                io.Vae.Input("teacher", tooltip="the VAE whose decode the student learns (Load VAE, or a checkpoint "
                                                "loader's VAE); it is copied, never changed"),
                Dataset.Input("dataset", tooltip="patches from VAE Patch Dataset"),
                TrainOptions.Input("options", optional=True,
                                   tooltip="every other setting, from VAE Fine-tune Options (unconnected: the "
                                           "student's recipe, distil-narrow or distil-tiny, and the memory "
                                           "preset's defaults; a loss weight left at its default takes the "
                                           "recipe's)"),
                *config_inputs(DistilConfig, order=DISTIL_ORDER),
                *_train_inputs(),
                _image_weight_input(),
                io.Combo.Input("family", options=list(LATENT_CHOICES), default="auto",
                               tooltip="kl-f8: the latent family of the diffusion models the student decodes for "
                                       "(auto: from the teacher file's name or its latents): a tiny decoder's "
                                       f"name and latent scaling, a narrow file's metadata. {latent_choices_text()}"),
                io.String.Input("save_name", default="custom",
                                tooltip="a plain name in the saved file's name: narrow, output/vae/vae-distil-"
                                        "narrow<width>-<save_name>-<steps>.safetensors; tiny, models/vae_approx/"
                                        "<taesd>_decoder.ft-<save_name>.safetensors. An existing file is never "
                                        "replaced: the run is refused before it starts"),
                io.String.Input("run_name", default="vae-distil",
                                tooltip=f"the run's folder, output/{RUNS_FOLDER}/<run_name>/: config, metrics.jsonl, "
                                        "previews, checkpoints; a taken name gets -2, -3, ..."),
                io.Combo.Input("continue_run", options=run_choices(), default=NEW_RUN,
                               tooltip="continue a stopped run (Cancel, a crash) from its newest checkpoint, with the "
                                       "same VAE, dataset and settings; a finished run continues to a larger "
                                       "'steps'. Refresh the page to see new runs"),
            ],
            outputs=[
                io.Vae.Output("vae", tooltip="narrow: the student as a VAE, usable downstream at once (the teacher's "
                                             "encoder and latents, the faster decoder); tiny: the teacher, unchanged "
                                             "(the tiny decoder is for previews: pick it with --preview-method taesd)"),
                io.LossMap.Output("loss", tooltip="loss history (and validation scores) for VAE Loss Graph"),
                io.String.Output("report", tooltip="where the file went and how ComfyUI uses it; the student "
                                                   "against the teacher's decode and the images (PSNR, LPIPS) and "
                                                   "the decode time of each"),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,  # it writes a file: it runs without a node after it
        )

    @classmethod
    def execute(cls, teacher, dataset, options=None, student="narrow", width=64, with_encoder=False, image_weight=0.0,
                family="auto", save_name="custom", run_name="vae-distil", continue_run=NEW_RUN,
                **kwargs) -> io.NodeOutput:
        import comfy.model_management as mm

        dcfg = config_from_inputs(DistilConfig, dict(student=student, width=width, with_encoder=with_encoder))
        cfg = distil_train_config({**(options or {}), **kwargs, "image_weight": image_weight}, student,
                                  dataset.cfg.patch_size)
        tiny = dcfg.student == "tiny"
        # the output, checked before anything is read or written
        safe_name(save_name)
        folder = tiny_folder() if tiny else vae_output_folder()
        out_path = None if tiny else os.path.join(folder, distil_filename(save_name, dcfg, cfg.steps))
        if out_path is not None and os.path.lexists(out_path):
            raise VAEFTError(f"{os.path.basename(out_path)} already exists in output/vae: the distil node never "
                             "replaces a file; choose another save_name (or move that file)")
        source = _source_file(cls.hidden.prompt, cls.hidden.unique_id, "teacher")
        device = mm.get_torch_device()

        def before_training(student_vae, spec) -> None:  # the last checks, once the student is known
            if tiny:
                # a continued run replaces its own files (the same teacher and student), never another's
                check_tiny_out(folder, tiny_names(spec, save_name, dcfg.with_encoder), overwrite=False,
                               own=own_files(teacher_vae, dcfg) if resume else None)
            else:
                _check_comfy_reads(student_vae)

        # Prompts run under inference_mode; training needs autograd, on tensors made outside it.
        with torch.inference_mode(False):
            teacher_vae = comfy_vae_to_training(teacher, source)
            path, resume = run_folder(run_name, continue_run)
            mm.unload_all_models()
            mm.soft_empty_cache()
            hooks = _NodeHooks(cfg.steps, os.path.basename(path), cls.hidden.unique_id, label="VAE distil")
            result = run_distil(
                teacher_vae, dataset, cfg, dcfg, family=family, device=device, before_training=before_training,
                run_dir=path, resume=path if resume else None,
                inputs={"vae": source[1] if source else "the connected VAE", "dataset": _input_name(dataset.source)},
                input_paths="comfyui", importable=False, hooks=hooks.hooks())
            loop = result.session.loop
            if result.stopped:
                end_stopped_prompt(hooks, loop, path)
            if tiny:
                report = export_tiny(result, folder, save_name, replace_own=resume)["text"]
                out_vae = teacher
            else:
                exported = export_narrow(result, out_path, overwrite=False, device=device, family=family)
                for warning in exported.warnings:
                    log.warning("VAE Distil Decoder: %s", warning)
                report = exported.text()
                out_vae = file_to_comfy_vae(file_state_dict(result.session.trained, "fp32"))
        # the status box holds seven lines: the student against the teacher and the decode times (the report box
        # below has every figure)
        figures = result.lines()
        _send_text("\n".join([f"run {hooks.run}: {dcfg.label} done, {loop.steps_done} steps"]
                             + (figures[:1] + figures[-1:] if len(figures) > 2 else figures)), cls.hidden.unique_id)
        return io.NodeOutput(out_vae, loss_map_of(loop.history), report, ui=ui.PreviewText(report))
