"""Conversions at the ComfyUI boundary, and node inputs derived from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing

import torch
from comfy_api.latest import io

from ..training.errors import VAEFTError
from ..training.options import base_type
from ..training.vae import LoadedVAE, build_vae

# Our own socket types: plain names, like ComfyUI's LORA_MODEL / LOSS_MAP.
Dataset = io.Custom("VAEFT_DATASET")
Trained = io.Custom("VAEFT_TRAINED")


def image_to_training(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W) in [0, 1], a normal (non-inference) tensor."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise VAEFTError(f"expected an IMAGE batch (B, H, W, C); got shape {tuple(images.shape)}")
    x = images[..., :3] if images.shape[-1] >= 3 else images.expand(-1, -1, -1, 3)
    return x.movedim(-1, 1).float().clone()


def training_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    return x.clamp(0, 1).movedim(1, -1).contiguous().cpu()


def comfy_vae_to_training(vae) -> LoadedVAE:
    """A trainable fp32 copy of a ComfyUI VAE's weights (the cached input VAE is never touched)."""
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise VAEFTError("the VAE input is empty or invalid; connect a Load VAE (or checkpoint) VAE output")
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in vae.get_sd().items()}
    return build_vae(sd, source="the connected VAE")


def ldm_to_comfy_vae(sd: dict[str, torch.Tensor]):
    import comfy.sd

    vae = comfy.sd.VAE(sd=sd)
    vae.throw_exception_if_invalid()
    return vae


def config_inputs(cls: type, defaults: dict | None = None, skip: tuple[str, ...] = (),
                  order: tuple[str, ...] = ()) -> list:
    """One V3 input per dataclass field (unless metadata says node=False), same defaults and bounds."""
    defaults = defaults or {}
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip and f.metadata.get("node") is not False]
    fields.sort(key=lambda f: order.index(f.name) if f.name in order else len(order))
    hints = typing.get_type_hints(cls)
    inputs = []
    for f in fields:
        tp, optional = base_type(hints[f.name])
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        tip = meta.get("help")
        if meta.get("choices"):
            inputs.append(io.Combo.Input(f.name, options=list(meta["choices"]), default=default, tooltip=tip))
        elif tp is bool:
            inputs.append(io.Boolean.Input(f.name, default=default, tooltip=tip))
        elif tp is int:
            lo = meta.get("min", 0)
            hi = meta.get("max", 2**63 - 1)
            inputs.append(io.Int.Input(f.name, default=default, min=lo, max=hi, tooltip=tip))
        elif tp is float:
            lo = meta.get("min", meta.get("gt", 0.0))
            hi = meta.get("max", 1e9)
            inputs.append(io.Float.Input(f.name, default=default, min=lo, max=hi, step=_step(default),
                                         round=False, tooltip=tip))
        elif tp is str:
            inputs.append(io.String.Input(f.name, default=default or "", optional=optional, tooltip=tip))
    return inputs


def _step(default: float) -> float:
    if not default:
        return 0.01
    return 10 ** (int(f"{abs(default):e}".split("e")[1]))


def config_from_inputs(cls: type, kwargs: dict, **overrides):
    """Build ``cls`` from the node's keyword inputs (unknown keys ignored, empty strings -> None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (None if v == "" else v) for k, v in kwargs.items() if k in names}
    values.update(overrides)
    return cls(**values)
