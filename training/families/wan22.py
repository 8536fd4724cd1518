"""The Wan 2.2 layout: two families of one architecture, residual levels (each level's blocks plus a
shortcut of its input averaged down / duplicated up onto its output), 16x spatial, RMSNorm, causal
convolutions.

- **Wan 2.2** (Wan2.2-TI2V-5B, Bria FIBO / FIBO-Edit): 48 latent channels, a 2x2 patchify of RGB pixels into
  12 channels before the encoder (and back after the decoder), causal 3D convolutions (temporal kernel 3).
  Files: ComfyUI's ``wan2.2_vae.safetensors`` (the original layout, which ComfyUI's Load VAE reads) or
  diffusers' ``AutoencoderKLWan(is_residual=True, z_dim=48, patch_size=2)``.
- **Qwen-Image 2.1**: 64 latent channels, RGBA pixels (4 channels in and out), no patchify, temporal kernel 1
  (every causal convolution is a 2D one). Files: ComfyUI's ``qwen_image_2.1_vae*.safetensors`` (the original
  layout with 5D weights of temporal size 1) or diffusers' ``AutoencoderKLQwenImage21`` (4D weights).

Which of the two a file is, is read off its convolutions' temporal size (3 or 1). Exports are written in the
original layout in the base's dtype (5D, as ComfyUI loads them); ``--format diffusers`` writes the family's
diffusers class. The module is the diffusers class with the image interface of :mod:`training.families` and
the exact one-frame path of :mod:`.wan2d`.
"""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import AutoencoderKLQwenImage21, AutoencoderKLWan

from ..errors import VAEFTError
from .base import Family, check_keys, conv_io
from .wan2d import (RESIDUAL, REV_RESIDUAL, OneFrame, check_settings, decoder_block, foreign, per_channel_latents,
                    refuse_latent_choice, set_up, shared_to_diffusers, shared_to_original, sub)

WAN22_LABEL = "Wan 2.2 VAE (48 latent channels, 16x; Wan2.2-TI2V-5B, FIBO)"
QWEN21_LABEL = "Qwen-Image 2.1 VAE (64 latent channels, 16x, RGBA)"
ORIGINAL_MARK = re.compile(r"^(encoder\.downsamples\.\d+\.downsamples|decoder\.upsamples\.\d+\.upsamples)\.\d+\.")
# (diffusers' kl-f8 and Flux.2 name their levels alike, but their norms have no gamma and their up blocks
# a list of upsamplers; Wan 2.1's levels are flat lists with no resnets)
DIFFUSERS_MARK = re.compile(r"^(encoder\.down_blocks\.\d+\.resnets\.\d+\.norm1\.gamma$|decoder\.up_blocks\.\d+\.upsampler\.)")
ORIGINAL_PROBE = "decoder.upsamples.0.upsamples.0.residual.0.gamma"
DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.norm1.gamma"
# Still images never reach the temporal resampling convolutions (skipped at one frame): they stay frozen.
IMAGE_FROZEN = (r"^(encoder\.down_blocks\.\d+\.downsampler|decoder\.up_blocks\.\d+\.upsampler)\.time_conv\.",)


# ----- keys: the original (ComfyUI) layout <-> diffusers'

LAYOUT = "Wan 2.2-layout VAE"


def _resampler(part: str) -> bool:
    return part.startswith(("resample.", "time_conv."))


def to_diffusers_key(key: str) -> str:
    """diffusers' name of one original-layout key."""
    head, rest, name = shared_to_diffusers(key, LAYOUT)
    if name is not None:
        return name
    outer, blocks, sampler = (("downsamples", "down_blocks", "downsampler") if head == "encoder"
                              else ("upsamples", "up_blocks", "upsampler"))
    m = re.fullmatch(rf"{outer}\.(\d+)\.{outer}\.(\d+)\.(.+)", rest)
    if not m:
        raise foreign(key, LAYOUT)
    level, j, part = int(m.group(1)), int(m.group(2)), m.group(3)
    if _resampler(part):
        return f"{head}.{blocks}.{level}.{sampler}.{part}"
    return f"{head}.{blocks}.{level}.resnets.{j}.{sub(part, RESIDUAL, key, LAYOUT)}"


def to_original_key(key: str, res: int) -> str:
    """The original-layout name of one diffusers key (inverse of :func:`to_diffusers_key`). ``res``: the
    encoder's residual blocks per level (its resampler follows them; the decoder has one block more)."""
    head, rest, name = shared_to_original(key, LAYOUT)
    if name is not None:
        return name
    outer, blocks, sampler, n = (("downsamples", "down_blocks", "downsampler", res) if head == "encoder"
                                 else ("upsamples", "up_blocks", "upsampler", res + 1))
    m = re.fullmatch(rf"{blocks}\.(\d+)\.(?:{sampler}\.(.+)|resnets\.(\d+)\.(.+))", rest)
    if not m:
        raise foreign(key, LAYOUT)
    level = int(m.group(1))
    if m.group(2) is not None:
        return f"{head}.{outer}.{level}.{outer}.{n}.{m.group(2)}"
    return f"{head}.{outer}.{level}.{outer}.{m.group(3)}.{sub(m.group(4), REV_RESIDUAL, key, LAYOUT)}"


def _res_blocks(keys, source: str = "state dict") -> int:
    """Residual blocks per encoder level, read off level 0 (either layout)."""
    ids = {int(m.group(1)) for k in keys
           if (m := re.match(r"encoder\.(?:downsamples\.0\.downsamples|down_blocks\.0\.resnets)\.(\d+)\.(?:residual|norm1)", k))}
    if not ids:
        raise VAEFTError(f"{source} is laid out like a Wan 2.2-layout VAE but has no encoder residual blocks: the file "
                         "is damaged or incomplete; use one complete VAE file")
    return max(ids) + 1


# The causal convolutions' weights in the original layout (5D there; Qwen-Image 2.1's diffusers layout
# stores them as 4D 2D-convolution weights)
_CAUSAL = re.compile(r"(^conv[12]|\.conv1|\.head\.2|\.residual\.[26]|\.shortcut|\.time_conv)\.weight$")
# the 3x3 convolutions that say which family a file is, in either layout, the encoder's first
_KERNEL_KEYS = ("encoder.conv1.weight", "encoder.conv_in.weight", "decoder.conv1.weight", "decoder.conv_in.weight",
                "decoder.head.2.weight", "decoder.conv_out.weight", "encoder.head.2.weight", "encoder.conv_out.weight")


def _temporal_kernel(sd: dict, source: str = "state dict") -> int:
    """The temporal size of the VAE's convolutions (3: Wan 2.2; 1: Qwen-Image 2.1, whose diffusers weights
    are 4D), read off the first of its outer convolutions the file has."""
    for k in _KERNEL_KEYS:
        w = sd.get(k)
        if isinstance(w, torch.Tensor) and w.ndim in (4, 5):
            return 1 if w.ndim == 4 else int(w.shape[2])
    raise VAEFTError(f"{source} is laid out like a Wan 2.2-layout VAE but has none of its outer convolutions "
                     f"({', '.join(_KERNEL_KEYS[:4])}, ...): the file is damaged or incomplete; use one complete VAE file")


# ----- recognising and reading a file

def recognise_layout(sd: dict) -> bool:
    """Whether the tensors are laid out like the Wan 2.2 layout's (either family, either naming)."""
    return any(ORIGINAL_MARK.match(k) or DIFFUSERS_MARK.match(k) for k in sd)


def _kernel_or_none(sd: dict) -> int | None:
    try:
        return _temporal_kernel(sd)
    except VAEFTError:
        return None


def recognise_wan22(sd: dict) -> bool:
    # no outer convolution at all: Wan 2.2's file_layout says what is missing
    return recognise_layout(sd) and _kernel_or_none(sd) != 1


def recognise_qwen21(sd: dict) -> bool:
    return recognise_layout(sd) and _kernel_or_none(sd) == 1


def file_layout(sd: dict[str, torch.Tensor], source: str = "state dict", label: str = WAN22_LABEL
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors in the original layout (what ComfyUI's Load VAE reads) from either layout: diffusers' names
    mapped back, and Qwen-Image 2.1's 4D diffusers convolution weights given their temporal size 1.
    ``label``: the family's, for refusals."""
    if not any(k.startswith(("encoder.downsamples.", "encoder.down_blocks.")) for k in sd):
        raise VAEFTError(f"{source}: its decoder is laid out like a {label}'s but it has no encoder (or another "
                         "VAE's). The file mixes parts of different VAEs or is incomplete; use one complete VAE file.")
    if any(DIFFUSERS_MARK.match(k) for k in sd):
        res = _res_blocks(sd, source)
        check_keys(sd, lambda k: to_original_key(k, res), source, label)
        flat = _temporal_kernel(sd, source) == 1  # Qwen-Image 2.1: its 4D diffusers weights become 5D (T = 1)
        sd = {to_original_key(k, res): v for k, v in sd.items()}
        if flat:
            sd = {k: (v.unsqueeze(2) if v.ndim == 4 and _CAUSAL.search(k) else v) for k, v in sd.items()}
    check_keys(sd, to_diffusers_key, source, label)
    return dict(sd), []


def config_from_file(sd: dict[str, torch.Tensor]) -> dict:
    """The diffusers class and its config read off original-layout shapes (so a narrower test model needs
    no preset): ``(cls, config)``."""
    res = _res_blocks(sd)
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    base = int(sd["encoder.conv1.weight"].shape[0])
    widths = [int(sd[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"].shape[0]) for i in range(levels)]
    temporal = [f"encoder.downsamples.{i}.downsamples.{res}.time_conv.weight" in sd for i in range(levels - 1)]
    kernel = _temporal_kernel(sd)
    patch = 2 if kernel != 1 else 1
    mult = [w // base for w in widths]
    pixels = int(sd["encoder.conv1.weight"].shape[1])
    # read off the decoder where it has them (a tensor it lacks is then named by build_vae, not a KeyError here)
    dec = sd.get("decoder.conv1.weight")
    dec_base = int(dec.shape[0]) // mult[-1] if isinstance(dec, torch.Tensor) else base
    out = sd.get("decoder.head.2.weight")
    config = dict(base_dim=base, decoder_base_dim=dec_base,
                  z_dim=int(sd["conv2.weight"].shape[0]), dim_mult=mult, num_res_blocks=res,
                  attn_scales=[], temperal_downsample=temporal, dropout=0.0, is_residual=True,
                  in_channels=pixels, out_channels=int(out.shape[0]) if isinstance(out, torch.Tensor) else pixels,
                  patch_size=patch if patch > 1 else None, scale_factor_spatial=2 ** (levels - 1) * patch)
    return (AutoencoderKLWan if kernel != 1 else AutoencoderKLQwenImage21), config


def check(sd: dict[str, torch.Tensor], source: str = "state dict", label: str = WAN22_LABEL) -> None:
    """Refuse, naming ``source`` and the family's ``label``, an incomplete file, halves of two different VAEs
    (the encoder's 2z moments must feed conv1 (2z -> 2z), the z-channel latents conv2 (z -> z) and the decoder;
    every causal convolution of one temporal size; the encoder's temporal resampling mirrored by the decoder's;
    the encoder taking the images the decoder makes) and VAEs of other than RGB or RGBA images."""
    first, head, quant, post, dec = (conv_io(sd, n) for n in ("encoder.conv1", "encoder.head.2", "conv1", "conv2",
                                                                "decoder.conv1"))
    res = _res_blocks(sd, source)
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    needed = ["encoder.conv1.weight", "encoder.head.2.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight"]
    needed += [f"encoder.downsamples.{i}.downsamples.0.residual.2.weight" for i in range(levels)]
    missing = [k for k in needed if not isinstance(sd.get(k), torch.Tensor)]
    if missing:
        raise VAEFTError(f"{source} is not a complete {label}: it lacks {', '.join(missing[:4])}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    kernels = {}
    for k, v in sd.items():
        if _CAUSAL.search(k) and v.ndim == 5 and not k.endswith("time_conv.weight") and v.shape[-1] == 3:
            kernels.setdefault(int(v.shape[2]), k)
    if len(kernels) > 1:
        (a, ka), (b, kb) = sorted(kernels.items())[:2]
        raise VAEFTError(f"{source} mixes causal convolutions of temporal size {a} ({ka}: Qwen-Image 2.1's) and {b} "
                         f"({kb}: Wan 2.2's): the file mixes parts of different VAEs; use one complete VAE file.")
    if not (head[1] == quant[0] == quant[1] == 2 * post[0] and post[1] == dec[0]):
        raise VAEFTError(f"{source}: the encoder and decoder do not fit together (encoder.head makes {head[1]} channels, "
                         f"conv1 {quant[0]} -> {quant[1]}, conv2 {post[0]} -> {post[1]}, decoder.conv1 takes {dec[0]}). "
                         "The file mixes parts of different VAEs; use one complete VAE file.")
    # the temporal levels: the encoder's downsamplers with a time_conv, mirrored by the decoder's upsamplers
    down = [f"encoder.downsamples.{i}.downsamples.{res}.time_conv.weight" in sd for i in range(levels - 1)]
    up = [f"decoder.upsamples.{i}.upsamples.{res + 1}.time_conv.weight" in sd for i in range(levels - 1)]
    if up != down[::-1]:
        name = lambda flags: ", ".join(str(i) for i, f in enumerate(flags) if f) or "none"  # noqa: E731
        raise VAEFTError(f"{source}: its temporal resampling does not mirror itself (encoder levels with a time_conv: "
                         f"{name(down)}; decoder levels: {name(up)}, expected {name(down[::-1])}): the file is damaged "
                         "or mixes parts of different VAEs; use one complete VAE file.")
    patch = 1 if _temporal_kernel(sd, source) == 1 else 2
    pixels_in = first[0]
    pixels_out = int(sd["decoder.head.2.weight"].shape[0]) if "decoder.head.2.weight" in sd else pixels_in
    if pixels_in != pixels_out or pixels_in % (patch * patch):
        raise VAEFTError(f"{source}: the encoder takes {pixels_in} channels but the decoder makes {pixels_out} "
                         f"(patch {patch}x{patch}): the file mixes parts of different VAEs; use one complete VAE file.")
    channels = pixels_in // (patch * patch)
    if channels not in (3, 4):
        raise VAEFTError(f"{source} is a {label} of {channels}-channel images; this version trains VAEs of RGB or "
                         "RGBA images")


def build(sd: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, str]]:
    """The image-interface module (meta device) for original-layout tensors, and file key -> module key."""
    cls, config = config_from_file(sd)
    with torch.device("meta"):
        model = (Wan22ImageVAE if cls is AutoencoderKLWan else Qwen21ImageVAE)(**config)
    return model, {k: to_diffusers_key(k) for k in sd}


class Wan22ImageVAE(OneFrame, AutoencoderKLWan):
    """``AutoencoderKLWan`` (residual levels, 2x2 patchify) taking and giving BCHW images (one frame)."""


class Qwen21ImageVAE(OneFrame, AutoencoderKLQwenImage21):
    """``AutoencoderKLQwenImage21`` taking and giving BCHW RGBA images (one frame)."""


# ----- latents

# The published per-channel statistics of Wan 2.2's latents (ComfyUI's latent_formats.Wan22, the Wan2.2
# repository's VAE): a pipeline uses (z - mean) / std.
WAN22_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
              0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
              -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]


def _published(cls) -> tuple[list[float], list[float]]:
    """Qwen-Image 2.1's published statistics: ``AutoencoderKLQwenImage21``'s own defaults (its released config)."""
    params = inspect.signature(cls.__init__).parameters
    return list(params["latents_mean"].default), list(params["latents_std"].default)


def _latents_for(name: str, short: str, published: tuple[list[float], list[float]]):
    def latents(trained, model: torch.nn.Module, probe, choice: str = "auto", device="cpu", *, measure) -> dict:
        """The family's published per-channel statistics, or re-estimated (:func:`.wan2d.per_channel_latents`)."""
        refuse_latent_choice(short, choice)
        return per_channel_latents(name, short, *published, trained, model, probe, device, measure)
    return latents


def diffusers_model(tensors: dict[str, torch.Tensor], scaling: dict, base_name: str = "") -> torch.nn.Module:
    """``AutoencoderKLWan`` (Wan 2.2) or ``AutoencoderKLQwenImage21`` (meta device) for original-layout
    ``tensors``, with ``scaling``'s per-channel statistics."""
    cls, config = config_from_file(tensors)
    config.update(latents_mean=scaling["latents_mean"], latents_std=scaling["latents_std"])
    with torch.device("meta"):
        return cls.from_config(config)


def _family(name: str, label: str, short: str, files: str, models: str, classes: str, recognise,
            temporal_taps: bool, published: tuple[list[float], list[float]], **extra) -> Family:
    return Family(
        name=name, label=label, files=files, short=short, models=models, diffusers_classes=classes,
        probes=(ORIGINAL_PROBE, DIFFUSERS_PROBE), recognise=recognise,
        file_layout=lambda sd, source="state dict": file_layout(sd, source, label),
        check=lambda sd, source="state dict": check(sd, source, label),
        build=build, file_key=lambda key, sd: to_original_key(key, _res_blocks(sd)), decoder_block=decoder_block,
        downsampling=lambda model: int(model.config.scale_factor_spatial), image_frozen=IMAGE_FROZEN,
        latents=_latents_for(name, short, published),
        check_latent_choice=lambda model, choice: refuse_latent_choice(short, choice),
        diffusers_model=diffusers_model,
        check_config=lambda cfg: check_settings(short, cfg, temporal_taps), set_up=set_up,
        raw_decode=lambda model, z: model.decode_unclamped(z),
        latent_channels=lambda model: int(model.config.z_dim),
        image_channels=lambda model: int(model.config.in_channels) // int(model.config.patch_size or 1) ** 2,
        frozen_what=lambda trainable: ("encoder, conv1 and the temporal resampling" if trainable == "decoder"
                                       else "the temporal resampling"),
        reshapable=lambda key: True, video=True, **extra)


WAN22 = _family(
    "wan2.2", WAN22_LABEL, "Wan 2.2", "wan2.2_vae.safetensors", "Wan 2.2 TI2V-5B, FIBO", "AutoencoderKLWan",
    recognise_wan22, temporal_taps=True, published=(WAN22_MEAN, WAN22_STD),
    extra_metadata={"vaeft.trained_on": "still images (one frame): video quality not validated"})
QWEN21 = _family(
    "qwen-image-2.1", QWEN21_LABEL, "Qwen-Image 2.1", "qwen_image_2.1_vae_bf16.safetensors", "Qwen-Image 2.1",
    "AutoencoderKLQwenImage21", recognise_qwen21, temporal_taps=False,
    published=_published(AutoencoderKLQwenImage21))
