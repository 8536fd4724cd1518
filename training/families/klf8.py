"""The kl-f8 family: the ``AutoencoderKL`` of SD1.x/2.x/SDXL (4 latent channels, with quant convs) and
SD3/Flux.1 (16 channels, without), in the ldm (CompVis) file layout that ComfyUI and Automatic1111 load,
or diffusers'. The key grammar is :mod:`training.families.ldm` (shared with Flux.2); what is kl-f8's own
is here: the model config read off tensor shapes (so every member of the family needs no preset), the
encoder/decoder fit check, and the published latent families (sd, sdxl, sd3, flux).
"""

from __future__ import annotations

import math
import re

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder

from ..errors import VAEFTError
from ..files import last_component
from .base import Family, check_keys, conv_io
from .ldm import (DIFFUSERS_PROBE, LDM_PROBE, attention_matrices, decoder_block, diffusers_to_ldm, diffusers_to_ldm_key,
                  downsampling, is_attention_weight, ldm_to_diffusers_key, normalise_diffusers_key, num_levels,
                  num_levels_diffusers)

FAMILY_LABEL = "kl-f8 VAE (AutoencoderKL: SD1.x/2.x/SDXL, SD3, Flux.1)"

# LDM training checkpoints keep the loss network and the EMA copy beside the VAE: dropped on reading
_NON_MODEL_PREFIXES = ("loss.", "model_ema.")


def config_from_ldm(sd: dict[str, torch.Tensor]) -> dict:
    """diffusers ``AutoencoderKL`` config read off an ldm state dict's shapes."""
    n = num_levels(sd)
    if n == 0:
        raise VAEFTError("VAE state dict has no encoder.down.* blocks")
    block_out = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    latent = int(sd["decoder.conv_in.weight"].shape[1])
    has_quant = "quant_conv.weight" in sd
    has_post_quant = "post_quant_conv.weight" in sd
    # GroupNorm's group count leaves no trace in the weights; every SD-family VAE uses 32.
    groups = 32
    if any(c % groups for c in block_out):
        raise VAEFTError(f"VAE channel widths {block_out} are not multiples of 32 (GroupNorm groups of the "
                         "SD-family VAE); this is not a kl-f8 AutoencoderKL we can rebuild")
    return dict(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=block_out,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=groups,
        use_quant_conv=has_quant,
        use_post_quant_conv=has_post_quant,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
        sample_size=512,
    )


def check_latent_channels(sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """VAEFTError when an ldm state dict's encoder makes a different number of latent channels than
    its decoder takes (halves of two VAEs, e.g. a 4-channel SD one and a 16-channel SD3/Flux one).

    The chain, for L latent channels: encoder.conv_out gives 2L (mean and log-variance),
    quant_conv maps 2L -> 2L; a sample has L; post_quant_conv maps L -> L, decoder.conv_in takes L.
    """
    enc, quant, post, dec = (conv_io(sd, n) for n in ("encoder.conv_out", "quant_conv", "post_quant_conv",
                                                        "decoder.conv_in"))
    if enc is None or dec is None:
        return  # normalise_state_dict names missing tensors

    def refuse(what: str) -> None:
        raise VAEFTError(f"{source}: the encoder and decoder do not fit together: {what}. The file mixes parts "
                         "of different VAEs (e.g. a 4-channel SD1.x/SDXL one and a 16-channel SD3/Flux one); "
                         "use one complete VAE file.")

    moments, maker = enc[1], "encoder.conv_out"
    if quant is not None:
        if quant[0] != moments:
            refuse(f"encoder.conv_out makes {moments} channels but quant_conv takes {quant[0]}")
        moments, maker = quant[1], "quant_conv"
    if moments % 2:
        raise VAEFTError(f"{source}: {maker} makes {moments} channels, not mean + log-variance pairs; this is not "
                         "a kl-f8 AutoencoderKL")
    taker, takes = ("post_quant_conv", post[0]) if post is not None else ("decoder.conv_in", dec[0])
    if moments // 2 != takes:
        refuse(f"{maker} makes {moments // 2} latent channels (as {moments} = mean + log-variance) but "
               f"{taker} takes {takes}")
    if post is not None and post[1] != dec[0]:
        refuse(f"post_quant_conv makes {post[1]} channels but decoder.conv_in takes {dec[0]}")
    known = sorted({f["latent_channels"] for f in LATENT_FAMILIES.values()})
    if dec[0] not in known:  # its export could not say how diffusion models scale its latents: refuse now
        flux2 = (": a Flux.2 VAE (32 channels) also holds its BatchNorm statistics bn.running_mean, bn.running_var "
                 "and bn.num_batches_tracked, which this file lacks; use the complete file") if dec[0] == 32 else ""
        raise VAEFTError(f"{source} is a kl-f8 VAE with {dec[0]} latent channels, for which no latent family is "
                         f"known (" + ", ".join(f"{c}: " + "/".join(v["what"] for v in LATENT_FAMILIES.values()
                                                                      if v["latent_channels"] == c) for c in known)
                         + f"){flux2}")


def file_layout(sd: dict[str, torch.Tensor], source: str = "state dict") -> tuple[dict[str, torch.Tensor], list[str]]:
    """An ldm-keyed AutoencoderKL state dict from an ldm or diffusers one (any full-checkpoint prefix
    already removed): drops LDM's loss/EMA keys, refuses anything that is not a kl-f8 AutoencoderKL with
    a message naming ``source``. Returns (state dict, dropped key names)."""
    if DIFFUSERS_PROBE in sd:
        n = num_levels_diffusers(sd)
        check_keys(sd, lambda k: _diffusers_key_back(normalise_diffusers_key(k), n), source, FAMILY_LABEL)
        sd = diffusers_to_ldm(sd)
    dropped = sorted(k for k in sd if k.startswith(_NON_MODEL_PREFIXES))
    sd = {k: v for k, v in sd.items() if not k.startswith(_NON_MODEL_PREFIXES)}
    required = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    lacking = [k for k in required if k not in sd]
    if lacking:
        raise VAEFTError(
            f"{source} is not a kl-f8 VAE (AutoencoderKL): it lacks {', '.join(lacking)}. "
            "Pass a VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors, "
            "ae.safetensors) or a checkpoint that contains one.")
    levels = num_levels(sd)
    check_keys(sd, lambda k: ldm_to_diffusers_key(k, levels), source, FAMILY_LABEL)
    return sd, dropped


def _diffusers_key_back(key: str, n: int) -> str:
    """The ldm name of a diffusers key, checked by mapping it forward again (the inverse map passes unknown
    names through unchanged; the forward one refuses them)."""
    ldm = diffusers_to_ldm_key(key, n)
    if ldm_to_diffusers_key(ldm, n) != key:
        raise VAEFTError(f"state dict key {key!r} is not part of a kl-f8 AutoencoderKL")
    return ldm


def decoder_widths(sd: dict[str, torch.Tensor]) -> list[int]:
    """The decoder's channel widths per level (ldm keys; level 0 the full-resolution one), read off its own
    tensors: narrower than the encoder's in a distilled narrow decoder (``training.students``), as ComfyUI's
    Load VAE reads them (``decoder_ch`` off ``decoder.conv_in``)."""
    return [int(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0]) for i in range(num_levels(sd))
            if f"decoder.up.{i}.block.0.conv2.weight" in sd]


def is_narrow(sd: dict[str, torch.Tensor]) -> bool:
    """Whether an ldm state dict's decoder is narrower than its encoder (a distilled narrow decoder)."""
    return decoder_widths(sd) != config_from_ldm(sd)["block_out_channels"]


def build(ldm: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, str]]:
    """A diffusers AutoencoderKL on the meta device shaped for ``ldm`` (ldm key -> tensor), and the
    map ldm key -> module key. A decoder narrower than the encoder gets its own widths (diffusers'
    ``AutoencoderKL`` has one set for both: its decoder is replaced by one of the decoder's widths)."""
    config = config_from_ldm(ldm)
    dec = decoder_widths(ldm)
    if any(c % config["norm_num_groups"] for c in dec):
        raise VAEFTError(f"VAE decoder widths {dec} are not multiples of 32 (GroupNorm groups of the SD-family VAE); "
                         "this is not a kl-f8 AutoencoderKL we can rebuild")
    with torch.device("meta"):
        model = AutoencoderKL(**config)
        if dec and dec != config["block_out_channels"]:
            model.decoder = Decoder(in_channels=config["latent_channels"], out_channels=config["out_channels"],
                                    up_block_types=config["up_block_types"], block_out_channels=dec,
                                    layers_per_block=config["layers_per_block"], norm_num_groups=config["norm_num_groups"],
                                    act_fn="silu", mid_block_add_attention=config["mid_block_add_attention"])
    levels = num_levels(ldm)
    return model, {k: ldm_to_diffusers_key(k, levels) for k in ldm}


def recognise(sd: dict) -> bool:
    """Encoder or decoder tensors of any kind: kl-f8's reader then says precisely what is missing."""
    return any(k.startswith(("encoder.", "decoder.")) for k in sd)


LATENT_FAMILIES = {  # the published factors (diffusers' configs; ComfyUI's latent_formats.py)
    "sd": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None, "what": "SD 1.x/2.x", "tiny": "taesd"},
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None, "what": "SDXL", "tiny": "taesdxl"},
    "sd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "what": "SD3/3.5", "tiny": "taesd3"},
    "flux": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "what": "Flux.1", "tiny": "taef1"},
}




_NAME_HINTS = (("sdxl", r"(^|[^a-z])(sd[_-]?)?xl([^a-z]|$)"), ("flux", r"flux|^ae\.(safetensors|sft|ckpt)$"),
               ("sd3", r"sd[_-]?3"), ("sd", r"vae-ft-(mse|ema)|sd[_-]?(v?1|v?2)([^0-9]|$)|v1-5|v2-1"))


def pick_latent_family(base_name: str, latent_channels: int, stats: dict | None = None) -> tuple[str, str]:
    """(family, why) for a base VAE: its file name's hint when there is one for its channel count,
    else the family whose published scaling_factor is nearest to the measured 1/std of its latents,
    else the common one (sd for 4 channels, flux for 16)."""
    fits = [f for f, v in LATENT_FAMILIES.items() if v["latent_channels"] == latent_channels]
    if not fits:
        raise VAEFTError(f"no known latent family has {latent_channels} latent channels; pass the scaling "
                         "yourself (families: " + ", ".join(f"{k} ({v['latent_channels']} ch)"
                                                            for k, v in LATENT_FAMILIES.items()) + ")")
    name = last_component(base_name).lower()
    for family, pattern in _NAME_HINTS:
        if family in fits and re.search(pattern, name):
            return family, f"from the base file's name {name!r}"
    if stats and stats.get("std", 0) > 0:
        scale = 1 / stats["std"]
        family = min(fits, key=lambda f: abs(math.log(scale / LATENT_FAMILIES[f]["scaling_factor"])))
        return family, (f"the base encoder's latents have 1/std {scale:.4g} on the training patches, nearest to "
                        f"{family}'s {LATENT_FAMILIES[family]['scaling_factor']}; pass the family to be sure")
    family = "sd" if latent_channels == 4 else "flux"
    return family, "a guess from the channel count alone (nothing measured); pass the family to be sure"


def check_latent_choice(model: torch.nn.Module, family: str) -> None:
    """Refuse a latent family whose channel count is not this VAE's (checked before training: --family)."""
    channels = int(model.config.latent_channels)
    if family != "auto" and LATENT_FAMILIES[family]["latent_channels"] != channels:
        raise VAEFTError(f"family {family!r} has {LATENT_FAMILIES[family]['latent_channels']} latent channels, this VAE "
                         f"{channels}; choose one of " + ", ".join(f for f, v in LATENT_FAMILIES.items()
                                                                  if v["latent_channels"] == channels))


def latents(trained, model: torch.nn.Module, probe, family: str = "auto", device: torch.device | str = "cpu", *,
            measure) -> dict:
    """{"family", "why", "scaling_factor", "shift_factor", "source"} for an exported kl-f8 VAE.

    Decoder-only: the latent space is the base's, so the family's published factors. Full
    (encoder trained): re-estimated on the probe's training patches with the exported encoder, as
    latent diffusion's recipe does (scaling = 1/std of the latents; for 16-channel VAEs also shift =
    their mean, and scaling = 1/std around it). ``measure``: the latent-statistics function
    (``training.probe.latent_statistics``), needed when the encoder was trained."""
    channels = int(trained.model.config.latent_channels)
    stats = probe.base_latents if probe is not None else None
    if family == "auto":
        family, why = pick_latent_family(trained.layout.base_name, channels, stats)
    else:
        why = "as given"
        check_latent_choice(model, family)
    out = {"family": family, "why": why, "scaling_factor": LATENT_FAMILIES[family]["scaling_factor"],
           "shift_factor": LATENT_FAMILIES[family]["shift_factor"],
           "source": f"{LATENT_FAMILIES[family]['what']}'s published factors (decoder-only: the latent space is the base's)"}
    if trained.config.trainable == "full":
        if probe is None or probe.train_patches is None:
            out["source"] = (f"{LATENT_FAMILIES[family]['what']}'s published factors: NOT re-estimated (no training "
                             "patches), though the encoder was trained")
            return out
        new = measure(model, probe.train_patches, device, seed=trained.config.seed)
        shift = new["mean"] if channels == 16 else None
        out.update(scaling_factor=float(f"{1 / new['std']:.5g}"),
                   shift_factor=float(f"{shift:.5g}") if shift is not None else None,
                   source=f"re-estimated on {new['patches']} training patches with the trained encoder "
                          f"(1/std{' and mean' if shift is not None else ''} of {new['values']} latent values)")
    return out


def tiny(model: torch.nn.Module, choice: str, base_name: str, stats: dict | None) -> dict:
    """The tiny decoder (ComfyUI's TAESD name and the latent format's scale/shift it is fed with) of the latent family
    ``choice``, or with "auto" the one :func:`pick_latent_family` finds for the base."""
    channels = int(model.config.latent_channels)
    if choice == "auto":
        choice, why = pick_latent_family(base_name, channels, stats)
    else:
        check_latent_choice(model, choice)
        why = "as given"
    f = LATENT_FAMILIES[choice]
    return {"name": f["tiny"], "scale": f["scaling_factor"], "shift": f["shift_factor"] or 0.0, "channels": channels,
            "latent_family": choice, "why": why}


def diffusers_model(tensors: dict[str, torch.Tensor], scaling: dict, base_name: str = "") -> torch.nn.Module:
    """The ``AutoencoderKL`` (meta device) for ldm-keyed ``tensors``, with ``scaling``'s latent factors."""
    if is_narrow(tensors):
        raise VAEFTError(f"a kl-f8 VAE with a narrower decoder ({decoder_widths(tensors)} against the encoder's "
                         f"{config_from_ldm(tensors)['block_out_channels']}) cannot be a diffusers folder: diffusers' "
                         "AutoencoderKL has one set of widths for both (so does Automatic1111). Write the safetensors "
                         "file: ComfyUI's Load VAE reads it")
    config = config_from_ldm(tensors)
    config.update(scaling_factor=scaling["scaling_factor"], shift_factor=scaling["shift_factor"])
    with torch.device("meta"):
        return AutoencoderKL.from_config(config)


FAMILY = Family(
    name="kl-f8",
    label=FAMILY_LABEL,
    files="vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors, ae.safetensors",
    short="kl-f8",
    models="SD1.x/2.x/SDXL, SD3, Flux.1",
    diffusers_classes="AutoencoderKL",
    probes=(LDM_PROBE, DIFFUSERS_PROBE),
    recognise=recognise,
    file_layout=file_layout,
    check=check_latent_channels,
    build=build,
    file_key=lambda key, sd: diffusers_to_ldm_key(key, num_levels(sd)),
    decoder_block=decoder_block,
    downsampling=downsampling,
    fused_norms=True,
    conv_form=attention_matrices,
    reshapable=is_attention_weight,
    latents=latents,
    check_latent_choice=check_latent_choice,
    diffusers_model=diffusers_model,
    latent_choices=tuple(LATENT_FAMILIES),
    narrow_loaders="diffusers' AutoencoderKL and Automatic1111 do not (one set of widths for encoder and decoder)",
    tiny=tiny,
)
