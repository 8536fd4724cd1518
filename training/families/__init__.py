"""The registry of VAE families: which families this version trains, how a file is recognised as one of
them, and every user-facing list of them (help texts, node descriptions, refusals), read off here so that
a family added to :data:`FAMILIES` appears everywhere at once.

The floors below it: :mod:`.base` (the :class:`Family` type), :mod:`.ldm` (the ldm/diffusers key grammar
kl-f8 and Flux.2 share), one module per family:

- :mod:`training.families.klf8`: the kl-f8 ``AutoencoderKL`` (SD1.x/2.x/SDXL with 4 latent channels,
  SD3 and Flux.1 with 16), files in the ldm (CompVis) layout or diffusers';
- :mod:`training.families.flux2`: the Flux.2 VAE (32 latent channels, BatchNorm latent statistics, a
  decoder possibly narrower than the encoder), files in Black Forest Labs' layout or diffusers';
- :mod:`training.families.wan`: the Wan 2.1 VAE that Qwen-Image and Wan 2.1/2.2-14B use (16 latent
  channels, causal 3D convolutions, RMSNorm), files in the original (ComfyUI) layout or diffusers';
- :mod:`training.families.wan22`: the Wan 2.2 layout (residual levels, 16x), two families: Wan 2.2 (48 latent
  channels, 2x2 patchify; Wan2.2-TI2V-5B) and Qwen-Image 2.1 (64 latent channels, RGBA, temporal kernel 1),
  files in the original (ComfyUI) layout or diffusers';
- :mod:`training.families.wan2d`: what the Wan-layout families share (key grammar, the one-frame path).

A loaded VAE carries its :class:`Family` (``LoadedVAE.family``, ``family_of(model)``): nothing outside
this package looks a family up by name.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import VAEFTError
from . import flux2, klf8, wan, wan22
from .base import TRAINABLE_PREFIXES, Family, family_of, has_family, trained

__all__ = ["FAMILIES", "Family", "LATENT_CHOICES", "TRAINABLE_PREFIXES", "family_of",
           "diffusers_text", "files_text", "has_family", "labels_text", "latent_choices_text", "models_text", "recognise",
           "trained"]

# Every family this version trains, the most specific recogniser first (Wan 2.1's takes any Wan-layout
# file, kl-f8's any encoder/decoder tensors and then says precisely what is missing).
FAMILIES: tuple[Family, ...] = (wan22.QWEN21, wan22.WAN22, wan.FAMILY, flux2.FAMILY, klf8.FAMILY)

# In messages and help texts the families are listed oldest first.
_LISTED: tuple[Family, ...] = tuple(reversed(FAMILIES))

# The latent families a user may name for an export's scaling (--family, the Save node), or auto.
LATENT_CHOICES: tuple[str, ...] = ("auto",) + tuple(c for f in _LISTED for c in f.latent_choices)


def _joined(items: list[str], last: str = "and") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {last} " + items[-1]


def labels_text(last: str = "and") -> str:
    """'kl-f8 VAE (...), Flux.2 VAE (...) and Wan 2.1 VAE (...)': every family this version trains."""
    return _joined([f.label for f in _LISTED], last)


def models_text() -> str:
    """'SD1.x/2.x/SDXL, SD3, Flux.1; FLUX.2 [dev], [klein]; Qwen-Image, Wan 2.1': the models whose VAEs it trains."""
    return "; ".join(f.models for f in _LISTED)


def diffusers_text() -> str:
    """'AutoencoderKL for a kl-f8 VAE, ...': the diffusers class of each family's exported folder."""
    return _joined([f"{f.diffusers_classes} for a {f.short} VAE" for f in _LISTED])


def latent_choices_text() -> str:
    """What the latent-family choice means per family, for help texts."""
    named = [f for f in _LISTED if f.latent_choices]
    others = [f.short for f in _LISTED if not f.latent_choices]
    return ("; ".join(f"{f.short} VAEs: {', '.join(f.latent_choices)}" for f in named)
            + (f"; {_joined(others, 'and')} VAEs: auto (their own statistics)" if others else ""))


def files_text() -> str:
    """The files users have for every family, for messages: '...; ...; ...'."""
    return "; ".join(f.files for f in _LISTED)


# Families the pack recognises but does not train, by a key or shape that marks them: refused by name.
_NOT_TRAINED: list[tuple[str, Callable[[dict], bool]]] = [
    ("a 64-channel VAE of another layout than the Wan one (HunyuanImage 2.1's, 32x)",
     lambda sd: not (wan.recognise(sd) or wan22.recognise_layout(sd))
     and _channels(sd, ("conv2.weight", "post_quant_conv.weight", "decoder.conv_in.weight")) == 64),
    ("a video VAE with a temporal decoder (Stable Video Diffusion)",
     lambda sd: "decoder.mid.block_1.mix_factor" in sd or any(".time_stack." in k for k in sd)),
]


def _channels(sd: dict, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = sd.get(k)
        if isinstance(v, torch.Tensor) and v.ndim >= 2:
            return int(v.shape[1])
    return None


def recognise(sd: dict, source: str) -> tuple[Family, dict, list[str]]:
    """(family, its tensors in that family's file layout, dropped keys) for a state dict of any
    layout a family reads, with a full checkpoint's ``first_stage_model.`` / ``vae.`` prefix removed.
    Refused, naming ``source`` and the family found, for a family this version does not train and
    for anything that is not a VAE."""
    if not isinstance(sd, dict) or not sd:
        raise VAEFTError(f"{source} holds no tensors; expected a VAE state dict")
    tensors = sd
    probes = {k for f in FAMILIES for k in f.probes}
    for prefix in ("first_stage_model.", "vae."):  # a full checkpoint: its VAE part only
        if not probes & set(tensors) and any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for what, marks in _NOT_TRAINED:
        if marks(tensors):
            raise VAEFTError(f"{source} is {what}, which this version does not train. It trains the "
                             + " and the ".join(f"{f.label} ({f.files})" for f in _LISTED))
    for family in FAMILIES:
        if family.recognise(tensors):
            file_sd, dropped = family.file_layout(tensors, source)
            return family, file_sd, dropped
    raise VAEFTError(f"{source} is not a " + " or a ".join(f.label for f in _LISTED)
                     + ", the VAE families this version trains. Pass a VAE file ("
                     + files_text() + ") or a checkpoint that contains one.")
