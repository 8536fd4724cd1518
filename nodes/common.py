"""Conversions at the ComfyUI boundary, and node inputs derived from the config dataclasses."""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing

import torch
from comfy_api.latest import io

from ..training.errors import VAEFTError
from ..training.options import base_type, is_essential
from ..training.families import recognise
from ..training.vae import LoadedVAE, build_vae

log = logging.getLogger("vaeft")

CORE_TRAINING = "training"  # where ComfyUI 0.3.48 to 0.3.64 file its own training nodes (Train LoRA, Loss Graph)


def category() -> str:
    """<core's training category>/vae: beside core's own training nodes, wherever this ComfyUI files them
    ("training" in 0.3.64, "model/training" in 0.28.2). ComfyUI loads its own nodes before custom ones, so its
    nodes module already holds Train LoRA; without it (not loaded, or not ComfyUI) "training"."""
    mappings = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", None) or {}
    found = getattr(mappings.get("TrainLoraNode"), "CATEGORY", None)
    return (found if isinstance(found, str) and found.split("/")[-1] == "training" else CORE_TRAINING) + "/vae"


def schema(**kwargs) -> io.Schema:
    """io.Schema with the pack's category, marked experimental as core marks its training nodes.
    ``search_aliases`` is passed on only where this ComfyUI's Schema has the field (0.3.64 has not).
    Every output is named by its id ("fine_tuned_vae", not "VAE"): 0.28 names an output without a display
    name by its id, 0.3.64 by its type, and a socket should read the same on every ComfyUI (and so should
    the templates, which hold the names)."""
    aliases = kwargs.pop("search_aliases", None)
    if aliases and "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        kwargs["search_aliases"] = aliases
    for output in kwargs.get("outputs", []):
        if not output.display_name:
            output.display_name = output.id
    return io.Schema(category=category(), is_experimental=True, **kwargs)

# Our own socket types: plain names, like ComfyUI's LORA_MODEL / LOSS_MAP.
Dataset = io.Custom("VAEFT_DATASET")
Trained = io.Custom("VAEFT_TRAINED")
# An options node's settings (a dict of field -> value) for the node it plugs into.
TrainOptions = io.Custom("VAEFT_TRAIN_OPTIONS")
PatchOptions = io.Custom("VAEFT_PATCH_OPTIONS")


def image_to_training(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W) in [0, 1], a normal (non-inference) tensor;
    a 4-channel IMAGE (RGBA, straight alpha: JoinImageWithAlpha's) keeps its alpha, (B, 4, H, W)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise VAEFTError(f"expected an IMAGE batch (B, H, W, C); got shape {tuple(images.shape)}")
    x = images if images.shape[-1] >= 3 else images.expand(-1, -1, -1, 3)
    return x.movedim(-1, 1).float().clone()


def training_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    return x.clamp(0, 1).movedim(1, -1).contiguous().cpu()


def comfy_vae_to_training(vae, source_file: tuple[str, str] | None = None) -> LoadedVAE:
    """A trainable fp32 copy of a ComfyUI VAE's weights (the cached input VAE is never touched).

    ComfyUI keeps VAEs in bf16 on most GPUs, which would round the weights we start from (and
    the encoder we promise to leave untouched). So when the VAE comes straight from a loader,
    ``source_file`` = (model folder, file name) and the original weights are read from that file.
    """
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise VAEFTError("the VAE input is empty or invalid; connect a Load VAE (or checkpoint) VAE output")
    name = source_file[1] if source_file else "the connected VAE"
    read = _read_source_vae(*source_file) if source_file else None
    family, sd = read if read is not None else (None, None)
    held = vae.get_sd()
    if sd is not None and not _same_tensors(sd, held, name):
        sd = None  # not the weights this VAE was built from: use what ComfyUI holds
    from_comfy = sd is None
    if from_comfy:
        if getattr(vae, "vae_dtype", torch.float32) != torch.float32:
            log.warning("fine-tuning from a %s copy of the VAE (ComfyUI's working dtype); connect Load VAE "
                        "directly to start from the file's exact weights", vae.vae_dtype)
        sd = held
    # keep the stored dtype: the base hash in the export's metadata then matches the CLI's for the same file
    sd = {k: v.detach().to("cpu").clone() for k, v in sd.items()}
    try:
        loaded = build_vae(sd, source=name)
    except VAEFTError as e:
        if family is None or not from_comfy:
            raise
        raise _not_built_by_this_comfyui(name, family, vae, str(e)) from None
    if family is not None and loaded.family is not family:
        raise _not_built_by_this_comfyui(name, family, vae, f"it holds a {loaded.family.short} VAE")
    loaded.layout.from_file = not from_comfy  # config.json records a base digest only for a file's own weights
    return loaded


def _same_tensors(file_sd: dict, held: dict, name: str) -> bool:
    """Whether ComfyUI's copy holds the file's tensors, perhaps under its own names (ComfyUI holds a Flux.2
    VAE with its quant convolutions at the top, where BFL's file has them in the encoder and decoder)."""
    if set(file_sd) == set(held):
        return True
    try:
        return set(recognise(held, name)[1]) == set(file_sd)
    except VAEFTError:
        return False


def _not_built_by_this_comfyui(name: str, family, vae, why: str) -> VAEFTError:
    """The file is a VAE the pack trains, but the model this ComfyUI's Load VAE made of it holds other
    tensors (a ComfyUI that does not know the family reads it as another one)."""
    return VAEFTError(f"{name} is a {family.label}, but the {type(vae.first_stage_model).__name__} this ComfyUI's "
                      f"Load VAE built from it holds other tensors ({why}), so it is not that VAE: this ComfyUI "
                      f"does not read {family.files} as the pack does. Use a ComfyUI whose Load VAE loads this "
                      "family, or fine-tune from the command line: python -m training fit --vae FILE ...")


def _read_source_vae(folder: str, name: str) -> tuple[object, dict[str, torch.Tensor]] | None:
    """(its family, the VAE tensors of a model file in the family's file layout); None if unavailable."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return None
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                keys = list(f.keys())
                if folder == "checkpoints":  # read only the VAE part of a full checkpoint
                    keys = [k for k in keys if k.startswith("first_stage_model.")]
                sd = {k: f.get_tensor(k) for k in keys}
        elif folder == "vae":
            import comfy.utils

            sd = comfy.utils.load_torch_file(path)
        else:
            return None
        family, tensors, _ = recognise(sd, name)
        return family, tensors
    except (VAEFTError, OSError, RuntimeError, ValueError) as e:
        log.warning("could not read %s for its exact VAE weights (%s); using ComfyUI's copy", name, e)
        return None


def file_to_comfy_vae(sd: dict[str, torch.Tensor]):
    import comfy.sd

    vae = comfy.sd.VAE(sd=sd)
    vae.throw_exception_if_invalid()
    return vae


def node_fields(cls: type, essential: bool | None = None, skip: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are node inputs (metadata node != False): all of them, or only the
    essential ones (main node) or only the others (options node)."""
    return [f for f in dataclasses.fields(cls) if f.name not in skip and f.metadata.get("node") is not False
            and (essential is None or is_essential(f) == essential)]


def config_inputs(cls: type, defaults: dict | None = None, skip: tuple[str, ...] = (),
                  order: tuple[str, ...] = (), essential: bool | None = None,
                  choices: dict[str, tuple[str, ...]] | None = None) -> list:
    """One V3 input per node field of ``cls`` (see :func:`node_fields`), same defaults and bounds; the
    field's help is the tooltip. ``choices``: a field's combo options on this node, a subset of the field's."""
    defaults = defaults or {}
    choices = choices or {}
    fields = node_fields(cls, essential, skip)
    fields.sort(key=lambda f: order.index(f.name) if f.name in order else len(order))
    hints = typing.get_type_hints(cls)
    inputs = []
    for f in fields:
        tp, optional = base_type(hints[f.name])
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        tip = meta.get("help")
        if meta.get("choices"):
            options = [c for c in meta["choices"] if c in choices.get(f.name, meta["choices"])]
            inputs.append(io.Combo.Input(f.name, options=options, default=default, tooltip=tip))
        elif tp is bool:
            inputs.append(io.Boolean.Input(f.name, default=default, tooltip=tip))
        elif tp is int:
            lo = meta.get("min", 0)
            hi = meta.get("max", 2**63 - 1)
            # control_after_generate=False: the frontend otherwise adds a "randomize" control to any
            # INT named seed, which re-seeds (and so retrains) on every queue and takes a saved slot
            inputs.append(io.Int.Input(f.name, default=default, min=lo, max=hi, control_after_generate=False,
                                       tooltip=tip))
        elif tp is float:
            lo = meta.get("min", meta.get("gt", 0.0))
            hi = meta.get("max", 1e9)
            step = meta.get("ui_step", FLOAT_STEP)
            inputs.append(io.Float.Input(f.name, default=default, min=lo, max=hi, step=step, round=step,
                                         tooltip=tip))
        elif tp is str:
            inputs.append(io.String.Input(f.name, default=default or "", optional=optional, tooltip=tip))
    return inputs


# The frontend shows and rounds a FLOAT widget to the decimals of its step, so the step is the
# finest value a user can enter; fields that need finer say so (option(..., ui_step=...)).
FLOAT_STEP = 1e-4


def input_values(cls: type, kwargs: dict) -> dict:
    """The node's keyword inputs that are fields of ``cls`` (empty strings -> None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: (None if v == "" else v) for k, v in kwargs.items() if k in names}


def config_from_inputs(cls: type, kwargs: dict, **overrides):
    """Build ``cls`` from the node's keyword inputs (unknown keys ignored, empty strings -> None)."""
    return cls(**{**input_values(cls, kwargs), **overrides})
