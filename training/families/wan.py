"""The Wan 2.1 family: the VAE of Qwen-Image (Qwen-Image, -Edit, Anima, Krea2) and of Wan 2.1 /
Wan 2.2-14B video: 16 latent channels, 8x spatial, causal 3D convolutions, RMSNorm, a single-head mid
attention. Files come in the original layout, which ComfyUI's Load VAE reads (``qwen_image_vae.safetensors``,
``wan_2.1_vae.safetensors``), or in diffusers' (``AutoencoderKLWan`` / ``AutoencoderKLQwenImage``, the
same 194 tensors); exports are written in the original layout. VAEs of RGB images and of RGBA images
(Qwen-Image-Layered's VAE: ``encoder.conv1`` takes 4 channels, the decoder's head gives 4; straight
alpha, see :mod:`training.alpha`); other channel counts are refused by name.

The module is diffusers' ``AutoencoderKLQwenImage`` with the image interface of :mod:`training.families`
(BCHW in and out: one frame, T = 1). At one frame a causal 3D convolution, whose input is padded with
zeros in front in time, only ever multiplies its last temporal tap with the frame, and the temporal
up/down-sampling layers are skipped; so the 2D path (``image_path = "2d"``, the default) runs every
causal convolution as a 2D convolution with that tap, exactly, at a fraction of the cost, and supports
gradient checkpointing (diffusers' 3D path caches features between calls and has none). ``"3d"`` runs
diffusers' own forward, the reference the 2D path is tested against.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

from ..errors import VAEFTError
from .base import Family, check_keys, conv_io
from .wan2d import RESIDUAL as _RESIDUAL
from .wan2d import REV_RESIDUAL as _REV_RESIDUAL
from .wan2d import (OneFrame, check_settings, decoder_block, foreign, per_channel_latents, refuse_latent_choice,
                    set_up, shared_to_diffusers, shared_to_original, sub)

LABEL = "Wan 2.1 VAE (Qwen-Image, Wan 2.1)"
ORIGINAL_PROBE = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_PROBE = "decoder.mid_block.resnets.0.norm1.gamma"
# Image channels of the Wan 2.1 VAEs this version trains: RGB (Qwen-Image, Wan 2.1), RGBA (Qwen-Image-Layered).
IMAGE_CHANNELS = {3: "RGB", 4: "RGBA: Qwen-Image-Layered's VAE"}
# Still images never reach the temporal resampling convolutions (skipped at one frame): they stay frozen.
IMAGE_FROZEN = (r"^(encoder\.down_blocks\.\d+|decoder\.up_blocks\.\d+\.upsamplers\.0)\.time_conv\.",)

# ----- keys: the original (ComfyUI) layout <-> diffusers'



def _sub(rest: str, table: dict[str, str], key: str) -> str:
    return sub(rest, table, key, "Wan 2.1 VAE")


def to_diffusers_key(key: str, per_level: int = 4) -> str:
    """diffusers name of one original-layout key. ``per_level``: decoder blocks per resolution level in
    the original's flat list (num_res_blocks + 1 residual blocks and one upsampler: 4 in Wan 2.1)."""
    head, rest, name = shared_to_diffusers(key, "Wan 2.1 VAE")
    if name is not None:
        return name
    m = re.fullmatch(r"(downsamples|upsamples)\.(\d+)\.(.+)", rest)
    if not m:
        raise foreign(key, "Wan 2.1 VAE")
    n, part = int(m.group(2)), m.group(3)
    resampler = part.startswith(("resample.", "time_conv."))
    if head == "encoder":  # one flat list in both layouts
        return f"encoder.down_blocks.{n}.{part if resampler else _sub(part, _RESIDUAL, key)}"
    level, i = divmod(n, per_level)
    if resampler:
        return f"decoder.up_blocks.{level}.upsamplers.0.{part}"
    return f"decoder.up_blocks.{level}.resnets.{i}.{_sub(part, _RESIDUAL, key)}"


def to_original_key(key: str, per_level: int = 4) -> str:
    """The original-layout name of one diffusers key (inverse of :func:`to_diffusers_key`)."""
    head, rest, name = shared_to_original(key, "Wan 2.1 VAE")
    if name is not None:
        return name
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m and head == "encoder":
        part = m.group(2)
        resampler = part.startswith(("resample.", "time_conv."))
        return f"encoder.downsamples.{m.group(1)}.{part if resampler else _sub(part, _REV_RESIDUAL, key)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(?:upsamplers\.0\.(.+)|resnets\.(\d+)\.(.+))", rest)
    if m and head == "decoder":
        level = int(m.group(1))
        if m.group(2) is not None:
            return f"decoder.upsamples.{level * per_level + per_level - 1}.{m.group(2)}"
        return f"decoder.upsamples.{level * per_level + int(m.group(3))}.{_sub(m.group(4), _REV_RESIDUAL, key)}"
    raise foreign(key, "Wan 2.1 VAE")


def _per_level(keys) -> int:
    """Decoder blocks per level in the original layout: num_res_blocks + 2 (read off the encoder)."""
    return _num_res_blocks(keys) + 2


def _num_res_blocks(keys) -> int:
    """Residual blocks per encoder level: those before the first downsampler (diffusers or original)."""
    ids = {int(m.group(2)) for k in keys if (m := re.match(r"encoder\.(downsamples|down_blocks)\.(\d+)\.resample\.", k))}
    if not ids:
        raise VAEFTError("a Wan 2.1 VAE state dict without encoder down-samplers")
    return min(ids)


# ----- recognising and reading a file

def recognise(sd: dict) -> bool:
    return ORIGINAL_PROBE in sd or DIFFUSERS_PROBE in sd


def file_layout(sd: dict[str, torch.Tensor], source: str = "state dict") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors in the original layout (what ComfyUI's Load VAE reads) from either layout."""
    if not any(re.match(r"encoder\.(downsamples|down_blocks)\.\d+\.resample\.", k) for k in sd):
        other = sorted({k.split(".")[1] for k in sd if k.startswith("encoder.") and k.count(".") > 1})
        why = (f"its encoder is not (encoder.{', encoder.'.join(other[:3])}: another VAE's)" if other
               else "it has no encoder")
        raise VAEFTError(f"{source}: its decoder is a Wan 2.1 VAE's ({ORIGINAL_PROBE if ORIGINAL_PROBE in sd else DIFFUSERS_PROBE}) "
                         f"but {why}. The file mixes parts of different VAEs or is incomplete; use one complete VAE file.")
    per = _per_level(sd)  # read off the encoder, whose numbering both layouts share
    if DIFFUSERS_PROBE in sd:
        check_keys(sd, lambda k: to_original_key(k, per), source, LABEL)
        sd = {to_original_key(k, per): v for k, v in sd.items()}
    check_keys(sd, lambda k: to_diffusers_key(k, per), source, LABEL)
    return dict(sd), []


def config_from_file(sd: dict[str, torch.Tensor]) -> dict:
    """``AutoencoderKLQwenImage``'s config read off original-layout shapes (so a narrower test model
    needs no preset)."""
    res = _num_res_blocks(sd)
    downs = sorted(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.1\.weight$", k)))
    base = int(sd["encoder.conv1.weight"].shape[0])
    # each level: res residual blocks then a downsampler (none after the last level)
    widths = [int(sd[f"encoder.downsamples.{i * (res + 1)}.residual.2.weight"].shape[0]) for i in range(len(downs) + 1)]
    temporal = [f"encoder.downsamples.{d}.time_conv.weight" in sd for d in downs]
    return dict(base_dim=base, z_dim=int(sd["conv2.weight"].shape[0]), dim_mult=[w // base for w in widths],
                num_res_blocks=res, attn_scales=[], temperal_downsample=temporal, dropout=0.0,
                input_channels=int(sd["encoder.conv1.weight"].shape[1]))


def check(sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Refuse halves of two different VAEs (the encoder's 2z moments must feed conv1 (2z -> 2z), and the
    z-channel latents conv2 (z -> z) and the decoder) and VAEs of other than RGB or RGBA images (or whose
    decoder gives other channels than the encoder takes)."""
    head, quant, post, dec = (conv_io(sd, n) for n in ("encoder.head.2", "conv1", "conv2", "decoder.conv1"))
    if None in (head, quant, post, dec):
        missing = [n for n, v in (("encoder.head.2", head), ("conv1", quant), ("conv2", post), ("decoder.conv1", dec))
                   if v is None]
        raise VAEFTError(f"{source} is not a complete Wan 2.1 VAE: it lacks {', '.join(m + '.weight' for m in missing)}")
    if not (head[1] == quant[0] == quant[1] == 2 * post[0] and post[1] == dec[0]):
        raise VAEFTError(f"{source}: the encoder and decoder do not fit together (encoder.head makes {head[1]} channels, "
                         f"conv1 {quant[0]} -> {quant[1]}, conv2 {post[0]} -> {post[1]}, decoder.conv1 takes {dec[0]}). "
                         "The file mixes parts of different VAEs; use one complete VAE file.")
    taken = int(sd["encoder.conv1.weight"].shape[1]) if "encoder.conv1.weight" in sd else 3
    given = int(sd["decoder.head.2.weight"].shape[0]) if "decoder.head.2.weight" in sd else taken
    trains = ("this version trains Wan 2.1 VAEs of RGB images (3 channels: qwen_image_vae.safetensors, "
              "wan_2.1_vae.safetensors) and of RGBA images (4 channels: Qwen-Image-Layered's VAE)")
    if taken not in IMAGE_CHANNELS:
        raise VAEFTError(f"{source} is a Wan 2.1 VAE of {taken}-channel images; {trains}")
    if given != taken:
        raise VAEFTError(f"{source} is a Wan 2.1 VAE whose encoder takes {taken}-channel images but whose decoder "
                         f"(decoder.head.2) gives {given}-channel ones; {trains}, each giving back what it takes")


def build(sd: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, str]]:
    """The image-interface module (meta device) for original-layout tensors, and file key -> module key."""
    with torch.device("meta"):
        model = WanImageVAE(**config_from_file(sd))
    per = _per_level(sd)
    return model, {k: to_diffusers_key(k, per) for k in sd}


# ----- the module: diffusers' AutoencoderKLQwenImage, images in and out (the 2D path: .wan2d)


class WanImageVAE(OneFrame, AutoencoderKLQwenImage):
    """``AutoencoderKLQwenImage`` taking and giving BCHW images (one frame): see :class:`.wan2d.OneFrame`."""


# The published per-channel statistics of Wan 2.1's latents (diffusers' AutoencoderKLWan /
# AutoencoderKLQwenImage configs; ComfyUI's latent_formats.Wan21): a pipeline uses (z - mean) / std.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.9160]


def latents(trained, model: torch.nn.Module, probe, family: str = "auto", device="cpu", *, measure) -> dict:
    """Wan 2.1's published per-channel statistics, or re-estimated (:func:`.wan2d.per_channel_latents`)."""
    check_latent_choice(model, family)
    return per_channel_latents("wan2.1", "Wan 2.1", LATENTS_MEAN, LATENTS_STD, trained, model, probe, device, measure)


def check_latent_choice(model: torch.nn.Module, family: str) -> None:
    """Only "auto": Wan 2.1 latents are described per channel by the family's own statistics."""
    refuse_latent_choice("Wan 2.1", family)


def diffusers_model(tensors: dict[str, torch.Tensor], scaling: dict, base_name: str = "") -> torch.nn.Module:
    """``AutoencoderKLQwenImage`` (for a Qwen-Image base) or ``AutoencoderKLWan`` (meta device) for
    original-layout ``tensors``, with ``scaling``'s per-channel statistics: the two share their weights'
    names and shapes, and their pipelines look for their own class."""
    config = {**config_from_file(tensors), "latents_mean": scaling["latents_mean"],
              "latents_std": scaling["latents_std"]}
    cls = AutoencoderKLQwenImage if "qwen" in base_name.lower() or "wan" not in base_name.lower() else AutoencoderKLWan
    if cls is AutoencoderKLWan:  # its config names the image channels in_channels / out_channels
        channels = config.pop("input_channels")
        config.update(in_channels=channels, out_channels=channels)
    with torch.device("meta"):
        return cls.from_config(config)


def check_config(cfg) -> None:
    """Settings this family cannot train with (weight decay; checkpointing off the 2D path), refused by name."""
    check_settings("Wan 2.1", cfg, temporal_taps=True)


FAMILY = Family(
    name="wan2.1",
    label=LABEL,
    files="qwen_image_vae.safetensors, wan_2.1_vae.safetensors",
    short="Wan 2.1",
    models="Qwen-Image, Wan 2.1",
    diffusers_classes="AutoencoderKLQwenImage / AutoencoderKLWan",
    probes=(ORIGINAL_PROBE, DIFFUSERS_PROBE),
    recognise=recognise,
    file_layout=file_layout,
    check=check,
    build=build,
    file_key=lambda key, sd: to_original_key(key, _per_level(sd)),
    decoder_block=decoder_block,
    downsampling=lambda model: model.spatial_compression_ratio,
    image_frozen=IMAGE_FROZEN,
    latents=latents,
    check_latent_choice=check_latent_choice,
    diffusers_model=diffusers_model,
    check_config=check_config,
    set_up=set_up,
    raw_decode=lambda model, z: model.decode_unclamped(z),
    latent_channels=lambda model: int(model.config.z_dim),
    image_channels=lambda model: int(model.config.input_channels),
    video=True,
    frozen_what=lambda trainable: "encoder, conv1 and the temporal resampling" if trainable == "decoder"
    else "the temporal resampling",
    extra_metadata={"vaeft.trained_on": "still images (one frame): video quality not validated"},
)
