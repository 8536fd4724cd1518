"""The Flux.2 family: the VAE of FLUX.2 [dev] / [klein] (and the diffusers pipelines that reuse it):
the kl-f8 architecture with 32 latent channels, its quant convolutions inside the encoder and decoder
(``encoder.quant_conv``, ``decoder.post_quant_conv`` in Black Forest Labs' layout), and an affine-free
BatchNorm (``bn.running_mean`` / ``bn.running_var`` / ``bn.num_batches_tracked``) over the 2x2-patchified
128-channel latent, which normalises what the diffusion model sees. A decoder may be narrower than the
encoder (FLUX.2-small-decoder): its widths are read off its own tensors.

Files come in BFL's layout (``ae.safetensors`` of FLUX.2, which BFL's ``AutoEncoder`` loads strictly and
newer ComfyUI reads), in the layout ComfyUI holds and saves (BFL's with the quant convolutions at the top,
as kl-f8's), or diffusers' (``AutoencoderKLFlux2``); exports are written in BFL's layout. The
module is diffusers' ``AutoencoderKLFlux2``: its ``encode`` / ``decode`` work on the 32-channel latents
around the BatchNorm, which is an invertible per-channel map applied identically before the diffusion
model and after it, so the decoder trains on the base encoder's latents exactly as a kl-f8 decoder does,
and ``bn.*`` stays the base's, byte for byte. Decoder-only: the encoder and the statistics are the latent
space every FLUX.2 model was trained on.
"""

from __future__ import annotations

import re

import torch

from ..errors import VAEFTError
from . import ldm
from .base import Family, check_keys, conv_io

# BFL keeps the quant convolutions inside the encoder and decoder; diffusers at the top, as kl-f8 does.
_QUANT = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
_BN = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
LABEL = "Flux.2 VAE (FLUX.2 [dev], [klein])"
BN_EPS = 1e-4       # BFL's AutoEncoder.bn_eps (diffusers' batch_norm_eps default)
PATCH = (2, 2)      # BFL's AutoEncoder.ps: the BatchNorm runs over 2x2-patchified latents


def _levels(keys, part: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(rf"{part}\.(?:down|up)\.(\d+)\.", k))})


def _diffusers_levels(keys, part: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(rf"{part}\.(?:down|up)_blocks\.(\d+)\.", k))})


def to_diffusers_key(key: str, encoder_levels: int, decoder_levels: int) -> str:
    """diffusers (``AutoencoderKLFlux2``) name of one BFL key."""
    for bfl, diff in _QUANT.items():
        if key.startswith(bfl):
            return diff + key[len(bfl):]
    if key in _BN:
        return key
    return ldm.ldm_to_diffusers_key(key, decoder_levels if key.startswith("decoder.") else encoder_levels)


def to_bfl_key(key: str, encoder_levels: int, decoder_levels: int) -> str:
    """BFL's name of one diffusers key (inverse of :func:`to_diffusers_key`)."""
    for bfl, diff in _QUANT.items():
        if key.startswith(diff):
            return bfl + key[len(diff):]
    if key in _BN:
        return key
    key = ldm.normalise_diffusers_key(key)
    bfl = ldm.diffusers_to_ldm_key(key, decoder_levels if key.startswith("decoder.") else encoder_levels)
    if to_diffusers_key(bfl, encoder_levels, decoder_levels) != key:
        raise VAEFTError(f"state dict key {key!r} is not part of a Flux.2 VAE")
    return bfl


def recognise(sd: dict) -> bool:
    """BatchNorm statistics beside an encoder/decoder, or BFL's quant convolutions (a Flux.2 file that lost
    its statistics is then refused naming them, not a key)."""
    return ("bn.running_mean" in sd and any(k.startswith(("encoder.", "decoder.")) for k in sd)) \
        or "encoder.quant_conv.weight" in sd or "decoder.post_quant_conv.weight" in sd


def file_layout(sd: dict[str, torch.Tensor], source: str = "state dict") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors in BFL's layout from either layout (attention as the 1x1 convolutions BFL stores), and the keys
    dropped: an affine BatchNorm's identity ``bn.weight`` / ``bn.bias`` (a converter that built
    ``BatchNorm2d(affine=True)`` saves them; FLUX.2's normalisation has none)."""
    sd, dropped = _without_identity_affine(sd, source)
    if ldm.DIFFUSERS_PROBE in sd:
        enc, dec = _diffusers_levels(sd, "encoder"), _diffusers_levels(sd, "decoder")
        check_keys(sd, lambda k: to_bfl_key(k, enc, dec), source, LABEL)
        out = {}
        for k, v in sd.items():
            bk = to_bfl_key(k, enc, dec)
            out[bk] = v[:, :, None, None] if ldm.is_attention_weight(bk) and v.ndim == 2 else v
        sd = out
    else:  # ComfyUI's layout: BFL's keys with the quant convolutions at the top
        sd = {next((b + k[len(d):] for b, d in _QUANT.items() if k.startswith(d)), k): v for k, v in sd.items()}
    enc, dec = _levels(sd, "encoder"), _levels(sd, "decoder")
    check_keys(sd, lambda k: to_diffusers_key(k, enc, dec), source, LABEL)
    lacking = [k for k in ("encoder.conv_in.weight", "encoder.quant_conv.weight", "decoder.post_quant_conv.weight",
                           "decoder.conv_in.weight", "decoder.conv_out.weight", *_BN) if k not in sd]
    if lacking:
        raise VAEFTError(f"{source} is not a complete Flux.2 VAE: it lacks {', '.join(lacking)}")
    return dict(sd), dropped


_AFFINE = {"bn.weight": 1.0, "bn.bias": 0.0}  # BatchNorm2d(affine=True)'s parameters at the identity


def _without_identity_affine(sd: dict, source: str) -> tuple[dict, list[str]]:
    """``sd`` without ``bn.weight`` / ``bn.bias`` when they are the identity (they change nothing); refused,
    naming the file and the tensors, when they are not (the latents would be normalised otherwise than
    every FLUX.2 model expects)."""
    present = [k for k in _AFFINE if k in sd]
    if not present:
        return sd, []
    moved = [k for k in present if not (isinstance(sd[k], torch.Tensor) and bool((sd[k].float() == _AFFINE[k]).all()))]
    if moved:
        raise VAEFTError(f"{source} is a Flux.2 VAE whose BatchNorm has affine parameters that are not the identity "
                         f"({', '.join(moved)}): FLUX.2's latent normalisation has none (BFL's AutoEncoder, "
                         "affine=False), so every FLUX.2 model would see these latents normalised otherwise. Use "
                         "the original file (flux2-vae.safetensors, FLUX.2's ae.safetensors)")
    return {k: v for k, v in sd.items() if k not in _AFFINE}, present


def _widths(sd: dict, part: str) -> list[int]:
    levels = _levels(sd, part)
    kind = "down" if part == "encoder" else "up"
    return [int(sd[f"{part}.{kind}.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]


def _blocks(sd: dict, part: str) -> int:
    kind = "down" if part == "encoder" else "up"
    return len({m.group(1) for k in sd if (m := re.match(rf"{part}\.{kind}\.0\.block\.(\d+)\.", k))})


def config_from_file(sd: dict[str, torch.Tensor]) -> dict:
    """``AutoencoderKLFlux2``'s config read off BFL-layout shapes (the decoder's widths off its own tensors)."""
    enc, dec = _widths(sd, "encoder"), _widths(sd, "decoder")
    return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                down_block_types=["DownEncoderBlock2D"] * len(enc), up_block_types=["UpDecoderBlock2D"] * len(dec),
                block_out_channels=enc, decoder_block_out_channels=dec if dec != enc else None,
                layers_per_block=_blocks(sd, "encoder"), latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
                norm_num_groups=32, mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
                batch_norm_eps=BN_EPS, patch_size=list(PATCH), sample_size=1024)


def check(sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Refuse halves of different VAEs and decoders this module cannot rebuild, naming what does not fit."""
    enc, quant, post, dec = (conv_io(sd, n) for n in ("encoder.conv_out", "encoder.quant_conv",
                                                        "decoder.post_quant_conv", "decoder.conv_in"))
    if None in (enc, quant, post, dec):
        missing = [n + ".weight" for n, v in (("encoder.conv_out", enc), ("encoder.quant_conv", quant),
                                              ("decoder.post_quant_conv", post), ("decoder.conv_in", dec)) if v is None]
        raise VAEFTError(f"{source} is not a complete Flux.2 VAE: it lacks {', '.join(missing)}")
    z = dec[0]
    if z != 32:
        raise VAEFTError(f"{source} is laid out like a Flux.2 VAE but has {z} latent channels (decoder.conv_in); "
                         "Flux.2's VAE has 32. This version trains the Flux.2 VAE itself, not other VAEs in its layout")
    stats = {k: int(sd[k].numel()) for k in ("bn.running_mean", "bn.running_var")}
    if not (enc[1] == quant[0] == quant[1] == 2 * z and post == (z, z)) or set(stats.values()) != {4 * z}:
        raise VAEFTError(f"{source}: the encoder, decoder and latent statistics do not fit together (encoder makes "
                         f"{quant[1]} channels, decoder.post_quant_conv {post[0]} -> {post[1]}, decoder.conv_in takes "
                         f"{z}, bn holds {stats['bn.running_mean']} means and {stats['bn.running_var']} variances for "
                         f"{4 * z} patchified channels). The file mixes parts of different VAEs; use one complete VAE file.")
    widths = _widths(sd, "encoder") + _widths(sd, "decoder")
    if any(w % 32 for w in widths):
        raise VAEFTError(f"{source}: channel widths {widths} are not multiples of 32 (GroupNorm groups of the Flux.2 "
                         "VAE); this is not a Flux.2 VAE this version can rebuild")
    if _levels(sd, "decoder") != _levels(sd, "encoder") or _blocks(sd, "decoder") != _blocks(sd, "encoder") + 1:
        raise VAEFTError(f"{source}: a Flux.2 decoder with {_levels(sd, 'decoder')} levels of {_blocks(sd, 'decoder')} "
                         f"blocks for an encoder with {_levels(sd, 'encoder')} levels of {_blocks(sd, 'encoder')}: "
                         "this version trains decoders that differ from the encoder in width only (as "
                         "FLUX.2-small-decoder does)")
    if float(sd["bn.running_var"].float().min()) < 0:
        raise VAEFTError(f"{source}: bn.running_var holds negative variances; the file is damaged")


def build(sd: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, str]]:
    """The ``AutoencoderKLFlux2`` (meta device) for BFL-layout tensors, and file key -> module key."""
    from diffusers import AutoencoderKLFlux2  # only in newer diffusers: an older one still trains the other families

    with torch.device("meta"):
        model = AutoencoderKLFlux2(**config_from_file(sd))
    enc, dec = _levels(sd, "encoder"), _levels(sd, "decoder")
    return model, {k: to_diffusers_key(k, enc, dec) for k in sd}


def check_config(cfg) -> None:
    if cfg.trainable != "decoder":
        raise VAEFTError(f"trainable {cfg.trainable!r} with a Flux.2 VAE: it trains decoder-only. Its encoder and "
                         "BatchNorm statistics are the latent space every FLUX.2 model was trained on; training "
                         "them would need a new diffusion model. Set trainable to 'decoder'")


def check_latent_choice(model: torch.nn.Module, family: str) -> None:
    """Only "auto": Flux.2 latents are normalised by the VAE's own BatchNorm statistics."""
    if family != "auto":
        raise VAEFTError(f"family {family!r} is a latent family of kl-f8 VAEs; this is a Flux.2 VAE, whose latents "
                         "are normalised by its own BatchNorm statistics: leave family on auto")


def latents(trained, model: torch.nn.Module, probe, family: str = "auto", device="cpu", *, measure) -> dict:
    """The base's BatchNorm statistics, which a pipeline normalises the 2x2-patchified latents with
    ((z - mean) / sqrt(var + eps) per patchified channel): the latent space is the base's."""
    check_latent_choice(model, family)
    mean = model.bn.running_mean.detach().float().cpu()
    std = torch.sqrt(model.bn.running_var.detach().float().cpu() + model.config.batch_norm_eps)
    return {"family": "flux2", "why": "the VAE family",
            "latents_mean": [float(f"{v:.6g}") for v in mean.tolist()],
            "latents_std": [float(f"{v:.6g}") for v in std.tolist()],
            "source": f"the base's BatchNorm statistics (bn.*, kept byte for byte), over the {PATCH[0]}x{PATCH[1]}-"
                      "patchified latents (decoder-only: the latent space is the base's)"}


def held_latent(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The module's 32-channel latents (B, 32, 2h, 2w) -> what FLUX.2 pipelines and ComfyUI hold (B, 128, h, w):
    2x2-patchified (channel, row offset, column offset) and normalised by the base's BatchNorm statistics."""
    b, c, h, w = z.shape
    pi, pj = PATCH
    z = z.reshape(b, c, h // pi, pi, w // pj, pj).permute(0, 1, 3, 5, 2, 4).reshape(b, c * pi * pj, h // pi, w // pj)
    mean, std = _statistics(model, z)
    return (z - mean) / std


def module_latent(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`held_latent`: (B, 128, h, w) held latents -> the module's (B, 32, 2h, 2w)."""
    mean, std = _statistics(model, z)
    z = z * std + mean
    b, cpp, h, w = z.shape
    pi, pj = PATCH
    c = cpp // (pi * pj)
    return z.reshape(b, c, pi, pj, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * pi, w * pj)


def _statistics(model: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the BatchNorm as (1, 128, 1, 1) in ``like``'s dtype and device."""
    mean = model.bn.running_mean.detach().to(like.device, torch.float32)
    std = torch.sqrt(model.bn.running_var.detach().to(like.device, torch.float32) + model.config.batch_norm_eps)
    return mean.view(1, -1, 1, 1).to(like.dtype), std.view(1, -1, 1, 1).to(like.dtype)


def diffusers_model(tensors: dict[str, torch.Tensor], scaling: dict, base_name: str = "") -> torch.nn.Module:
    """``AutoencoderKLFlux2`` (meta device) for BFL-layout ``tensors``: its BatchNorm buffers are the
    file's ``bn.*`` (the statistics its pipelines normalise latents with)."""
    from diffusers import AutoencoderKLFlux2  # only in newer diffusers (as in build)

    with torch.device("meta"):
        return AutoencoderKLFlux2.from_config(config_from_file(tensors))


def tiny(model: torch.nn.Module, choice: str, base_name: str, stats: dict | None) -> dict:
    """ComfyUI's taef2: fed the held latents (128 channels, BatchNorm-normalised) as they are (scale 1, shift 0)."""
    check_latent_choice(model, choice)
    return {"name": "taef2", "scale": 1.0, "shift": 0.0, "channels": 4 * int(model.config.latent_channels),
            "latent_family": "flux2", "why": "Flux.2's latents"}


FAMILY = Family(
    name="flux2",
    label=LABEL,
    files="flux2-vae.safetensors, FLUX.2's ae.safetensors",
    short="Flux.2",
    models="FLUX.2 [dev], [klein]",
    diffusers_classes="AutoencoderKLFlux2",
    probes=(ldm.LDM_PROBE, ldm.DIFFUSERS_PROBE),
    recognise=recognise,
    file_layout=file_layout,
    check=check,
    build=build,
    file_key=lambda key, sd: to_bfl_key(key, _levels(sd, "encoder"), _levels(sd, "decoder")),
    decoder_block=ldm.decoder_block,
    downsampling=ldm.downsampling,
    fused_norms=True,
    conv_form=ldm.attention_matrices,
    reshapable=ldm.is_attention_weight,
    latents=latents,
    check_latent_choice=check_latent_choice,
    diffusers_model=diffusers_model,
    check_config=check_config,
    frozen_what=lambda trainable: "encoder with its quant_conv, and bn.*: the latent statistics",
    held_latent=held_latent,
    module_latent=module_latent,
    narrow_loaders="so do diffusers' AutoencoderKLFlux2 (decoder_block_out_channels) and BFL's Decoder(ch=width)",
    tiny=tiny,
    keep_dtype=("bn.",),  # the statistics stay in the base's dtype whatever the export's: the latent space is exact
    extra_metadata={"vaeft.latent_normalisation": f"BatchNorm (bn.*, eps {BN_EPS}) over {PATCH[0]}x{PATCH[1]}-"
                                                  "patchified latents (4 x 32 = 128 channels), as FLUX.2 pipelines "
                                                  "normalise them"},
)
