"""VAE families behind one seam: what the rest of the library asks of a VAE, answered once per family.

A family is data and small functions (:class:`Family`), one module per family:

- :mod:`training.families.klf8`: the kl-f8 ``AutoencoderKL`` (SD1.x/2.x/SDXL with 4 latent channels,
  SD3 and Flux.1 with 16), files in the ldm (CompVis) layout or diffusers';
- :mod:`training.families.flux2`: the Flux.2 VAE (32 latent channels, BatchNorm latent statistics, a
  decoder possibly narrower than the encoder), files in Black Forest Labs' layout or diffusers';
- :mod:`training.families.wan`: the Wan 2.1 VAE that Qwen-Image and Wan 2.1/2.2-14B use (16 latent
  channels, causal 3D convolutions, RMSNorm), files in the original (ComfyUI) layout or diffusers'.

Every family's model is a diffusers module with the same image interface: ``encode(x)`` of BCHW
images in [-1, 1] gives ``.latent_dist`` (``mean``, ``logvar``, ``mode()``, ``sample(g)``) of BCHW
latents, ``decode(z)`` gives ``.sample`` (BCHW), and its parameters are named ``encoder.*``,
``quant_conv.*``, ``decoder.*``, ``post_quant_conv.*``, so which tensors train is decided on those
names for every family. What differs is here: how a file is recognised and read, how its keys map
to the module's and back, what images cannot train, and how the latents are described.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import VAEFTError

# Module-name prefixes trained in each mode (shared by every family's module).
TRAINABLE_PREFIXES = {
    "decoder": ("decoder.", "post_quant_conv."),
    "full": ("encoder.", "quant_conv.", "decoder.", "post_quant_conv."),
}


@dataclass(frozen=True)
class Family:
    """One VAE family. ``name`` is recorded in checkpoints and exports; the functions take and return
    plain dicts of tensors (a file's, in its own layout) and modules."""

    name: str                 # "kl-f8", "wan2.1"
    label: str                # what it is, for messages: "kl-f8 VAE (AutoencoderKL: SD1.x/2.x/SDXL, SD3, Flux.1)"
    files: str                # the files users have for it, for messages
    probes: tuple[str, ...]   # keys that mark a (prefix-free) state dict as this family's, in each layout it reads
    recognise: Callable[[dict], bool]                       # are these (prefix-free) tensors this family's?
    file_layout: Callable[[dict, str], tuple[dict, list[str]]]  # any layout it reads -> its file layout, dropped keys
    check: Callable[[dict, str], None]                      # refuse a damaged or mixed file, naming it
    build: Callable[[dict], tuple[torch.nn.Module, dict[str, str]]]  # file tensors -> model, file key -> module key
    decoder_block: Callable[[str], str | None]              # the decoder block of a module name (fp16 report)
    downsampling: Callable[[torch.nn.Module], int]          # pixels per latent, each side
    # how the exported latents are scaled for a diffusion model: (trained, exported model, export probe,
    # the user's latent-family choice or "auto", device) -> {"family", "why", "source", ...}
    latents: Callable[..., dict]
    # the diffusers model (meta device) that file tensors and the latents' scaling make: the export's folder
    diffusers_model: Callable[[dict, dict, str], torch.nn.Module]
    # file keys of tensors written in another form than the base stores them (kl-f8: attention matrices
    # as the 1x1 convolutions stock loaders take), from the base's {file key: shape}
    conv_form: Callable[[dict], list[str]] = lambda shapes: []
    # module-name patterns of tensors still images cannot train (no gradient reaches them at one frame)
    image_frozen: tuple[str, ...] = field(default_factory=tuple)
    fused_norms: bool = False  # its GroupNorms can run as the fused Triton kernels (training.fused_blocks)
    # the decoder's last weight (LDM's adaptive GAN weight): diffusers' name in every family's module
    last_layer: Callable[[torch.nn.Module], torch.Tensor] = lambda model: model.decoder.conv_out.weight
    # file keys whose base tensor may differ from the module's only by trailing 1s (kl-f8: attention weights
    # stored as (C, C) matrices or (C, C, 1, 1) convolutions)
    reshapable: Callable[[str], bool] = lambda key: False
    # refuse a TrainConfig the family cannot train with, naming the setting (checked before any file is written)
    check_config: Callable[[object], None] = lambda cfg: None
    # the training copy's set-up from the (checked) TrainConfig (the Wan family: its 2D or 3D path)
    set_up: Callable[[torch.nn.Module, object], None] = lambda model, cfg: None
    # the decoder's output before anything clamps it (the export's fp16/bf16 check watches it)
    raw_decode: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lambda model, z: model.decode(z).sample
    # what the untrained tensors are, in the family's words, for mode 'decoder' / 'full' (the export report)
    frozen_what: Callable[[str], str] = lambda trainable: "encoder, quant_conv"
    extra_metadata: dict = field(default_factory=dict)  # vaeft.* facts every export of the family records
    # file-key prefixes written in the base's dtype whatever the export dtype (Flux.2's latent statistics)
    keep_dtype: tuple[str, ...] = field(default_factory=tuple)


def decoder_block_of(name: str, activation: str, norm_out: str) -> str | None:
    """The decoder block of a module name in the diffusers layout every family's module has:
    'post_quant_conv', 'conv_in', 'mid_block', 'up_blocks.N', ``norm_out`` (with the ``activation`` module
    that follows it) or 'conv_out'; None outside the decoder (the fp16/bf16 report's grouping)."""
    parts = name.split(".")
    if parts[0] == "post_quant_conv":
        return "post_quant_conv"
    if parts[0] != "decoder" or len(parts) < 2:
        return None
    if parts[1] == activation:  # the SiLU between the last norm and conv_out
        return norm_out
    return ".".join(parts[1:3]) if parts[1] == "up_blocks" and len(parts) > 2 else parts[1]


def trained(name: str, trainable: str, family: Family) -> bool:
    """Whether module tensor ``name`` trains in mode ``trainable`` ('decoder' or 'full')."""
    return name.startswith(TRAINABLE_PREFIXES[trainable]) and not any(re.search(p, name) for p in family.image_frozen)


def _families() -> list[Family]:
    """Every family this version trains, the most specific recogniser first (kl-f8's takes any
    encoder/decoder tensors and then says precisely what is missing)."""
    from . import flux2, klf8, wan

    return [wan.FAMILY, flux2.FAMILY, klf8.FAMILY]


def family_named(name: str) -> Family:
    for f in _families():
        if f.name == name:
            return f
    raise VAEFTError(f"unknown VAE family {name!r}; this version trains {', '.join(f.name for f in _families())}")


def family_of_model(model: torch.nn.Module) -> Family:
    """The family a model built by :func:`recognise`'s family belongs to (its ``vaeft_family``)."""
    name = getattr(model, "vaeft_family", None)
    return family_named(name) if name else family_named("kl-f8")


# Families the pack recognises but does not train, by a key or shape that marks them: refused by name.
_NOT_TRAINED: list[tuple[str, Callable[[dict], bool]]] = [
    ("the Wan 2.2 VAE (48 latent channels, 16x; Wan2.2-TI2V-5B)",
     lambda sd: any(k.startswith(("decoder.upsamples.0.upsamples.", "decoder.up_blocks.0.upsampler.")) for k in sd)
     or _channels(sd, ("conv2.weight", "post_quant_conv.weight")) == 48),
    ("a 64-channel VAE (Qwen-Image 2.1 or HunyuanImage 2.1)",
     lambda sd: _channels(sd, ("conv2.weight", "post_quant_conv.weight", "decoder.conv_in.weight")) == 64),
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
    families = _families()
    tensors = sd
    probes = {k for f in families for k in f.probes}
    for prefix in ("first_stage_model.", "vae."):  # a full checkpoint: its VAE part only
        if not probes & set(tensors) and any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for what, marks in _NOT_TRAINED:
        if marks(tensors):
            raise VAEFTError(f"{source} is {what}, which this version does not train. It trains the "
                             + " and the ".join(f"{f.label} ({f.files})" for f in reversed(families)))
    for family in families:
        if family.recognise(tensors):
            file_sd, dropped = family.file_layout(tensors, source)
            return family, file_sd, dropped
    raise VAEFTError(f"{source} is not a " + " or a ".join(f.label for f in reversed(families))
                     + ", the VAE families this version trains. Pass a VAE file ("
                     + "; ".join(f.files for f in reversed(families)) + ") or a checkpoint that contains one.")
