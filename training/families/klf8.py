"""The kl-f8 family: the ``AutoencoderKL`` of SD1.x/2.x/SDXL (4 latent channels, with quant convs) and
SD3/Flux.1 (16 channels, without), in the ldm (CompVis) file layout that ComfyUI and Automatic1111 load,
or diffusers'.

State dict formats are data: :func:`ldm_to_diffusers_key` maps one ldm key to its diffusers name,
and the reverse map is the same table inverted, so the round trip ldm -> diffusers -> ldm is exact
by construction (tested bit for bit). The model config is read off tensor shapes, so every member
of the family needs no preset.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import VAEFTError
from . import Family, decoder_block_of

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


_RESNET = {"nin_shortcut": "conv_shortcut"}


_NON_MODEL_PREFIXES = ("loss.", "model_ema.")


LDM_PROBE = "decoder.conv_in.weight"


DIFFUSERS_PROBE = "decoder.up_blocks.0.resnets.0.norm1.weight"


def _num_levels(keys) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    if not levels:
        levels = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def ldm_to_diffusers_key(key: str, num_levels: int) -> str:
    """Diffusers name of one ldm AutoencoderKL key.

    ``num_levels`` is the number of resolution levels (len(ch_mult), 4 for SD):
    ldm numbers decoder levels from the lowest resolution up, diffusers from the top.
    """
    parts = key.split(".")
    head = parts[0]
    if head in ("quant_conv", "post_quant_conv"):
        return key
    if head not in ("encoder", "decoder"):
        raise VAEFTError(f"state dict key {key!r} is not part of a kl-f8 AutoencoderKL")
    rest = parts[1:]
    name = rest[0]
    if name in ("conv_in", "conv_out"):
        out = rest
    elif name == "norm_out":
        out = ["conv_norm_out"] + rest[1:]
    elif name == "mid":
        block = rest[1]
        if block.startswith("block_"):
            idx = int(block.split("_")[1]) - 1
            sub = [_RESNET.get(rest[2], rest[2])] + rest[3:]
            out = ["mid_block", "resnets", str(idx)] + sub
        elif block == "attn_1":
            out = ["mid_block", "attentions", "0"] + _ATTN[rest[2]].split(".") + rest[3:]
        else:
            raise VAEFTError(f"unknown mid-block key {key!r}")
    elif name in ("down", "up"):
        level = int(rest[1])
        blocks = "down_blocks" if name == "down" else "up_blocks"
        if name == "up":
            level = num_levels - 1 - level
        kind = rest[2]
        if kind == "block":
            sub = [_RESNET.get(rest[4], rest[4])] + rest[5:]
            out = [blocks, str(level), "resnets", rest[3]] + sub
        elif kind in ("downsample", "upsample"):
            samplers = "downsamplers" if kind == "downsample" else "upsamplers"
            out = [blocks, str(level), samplers, "0"] + rest[3:]
        else:
            raise VAEFTError(f"unknown block key {key!r}")
    else:
        raise VAEFTError(f"state dict key {key!r} is not part of a kl-f8 AutoencoderKL")
    return ".".join([head] + out)


def is_attention_weight(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def attention_matrices(shapes: dict) -> list[str]:
    """The attention weights a base stores as (C, C) matrices: written as the 1x1 convolutions stock
    loaders take (``Family.conv_form``)."""
    return [k for k, s in shapes.items() if is_attention_weight(k) and len(s) == 2]


def ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ldm state dict to diffusers keys; 1x1-conv attention weights become Linear."""
    n = _num_levels(sd)
    out = {}
    for k, v in sd.items():
        dk = ldm_to_diffusers_key(k, n)
        if is_attention_weight(k) and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[dk] = v
    return out


def diffusers_to_ldm(sd: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]] | None = None,
                     num_levels: int | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`ldm_to_diffusers`.

    ``shapes`` (ldm key -> shape) is the layout to reproduce, normally the base file's; it
    fixes the key set and whether attention weights are stored as 1x1 convs (the common
    case) or as matrices. Without it, the standard ldm layout is produced.
    """
    sd = {_normalise_diffusers_key(k): v for k, v in sd.items()}
    if num_levels is None:
        num_levels = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if shapes is None:
        ldm_keys = _standard_ldm_keys(sd, num_levels)
    else:
        ldm_keys = list(shapes)
    names = {ldm_to_diffusers_key(k, num_levels): k for k in ldm_keys}
    missing = sorted(set(names) - set(sd))
    extra = sorted(set(sd) - set(names))
    if missing or extra:
        raise VAEFTError(
            "the weights do not match the base VAE's layout: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    out = {}
    for dk, lk in names.items():
        v = sd[dk]
        if shapes is not None:
            v = v.reshape(shapes[lk])
        elif is_attention_weight(lk) and v.ndim == 2:
            v = v[:, :, None, None]
        out[lk] = v
    return out


def _normalise_diffusers_key(k: str) -> str:
    m = re.match(r"(.*\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)(\..*)", k)
    if m:
        return m.group(1) + _OLD_DIFFUSERS_ATTN[m.group(2)] + m.group(3)
    return k


def _standard_ldm_keys(diffusers_sd, num_levels) -> list[str]:
    """ldm names for a diffusers state dict; each checked against the forward map."""
    keys = []
    for dk in diffusers_sd:
        lk = diffusers_to_ldm_key(dk, num_levels)
        if ldm_to_diffusers_key(lk, num_levels) != dk:
            raise VAEFTError(f"state dict key {dk!r} is not part of a kl-f8 AutoencoderKL")
        keys.append(lk)
    return keys


def diffusers_to_ldm_key(dk: str, n: int) -> str:
    """ldm name of one diffusers AutoencoderKL key (inverse of :func:`ldm_to_diffusers_key`)."""
    p = dk.split(".")
    head = p[0]
    if head in ("quant_conv", "post_quant_conv"):
        return dk
    rest = p[1:]
    name = rest[0]
    rev_resnet = {v: k for k, v in _RESNET.items()}
    rev_attn = {v: k for k, v in _ATTN.items()}
    if name in ("conv_in", "conv_out"):
        return dk
    if name == "conv_norm_out":
        return ".".join([head, "norm_out"] + rest[1:])
    if name == "mid_block":
        if rest[1] == "resnets":
            sub = [rev_resnet.get(rest[3], rest[3])] + rest[4:]
            return ".".join([head, "mid", f"block_{int(rest[2]) + 1}"] + sub)
        attn = ".".join(rest[3:-1])
        return ".".join([head, "mid", "attn_1", rev_attn.get(attn, attn), rest[-1]])
    if name in ("down_blocks", "up_blocks"):
        level = int(rest[1])
        kind = "down" if name == "down_blocks" else "up"
        if kind == "up":
            level = n - 1 - level
        if rest[2] == "resnets":
            sub = [rev_resnet.get(rest[4], rest[4])] + rest[5:]
            return ".".join([head, kind, str(level), "block", rest[3]] + sub)
        sampler = "downsample" if kind == "down" else "upsample"
        return ".".join([head, kind, str(level), sampler] + rest[4:])
    return dk


def config_from_ldm(sd: dict[str, torch.Tensor]) -> dict:
    """diffusers ``AutoencoderKL`` config read off an ldm state dict's shapes."""
    n = _num_levels(sd)
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
    def io(name: str) -> tuple[int, int] | None:  # (in, out) channels of a conv
        v = sd.get(f"{name}.weight")
        return (int(v.shape[1]), int(v.shape[0])) if v is not None and v.ndim >= 2 else None

    enc, quant, post, dec = io("encoder.conv_out"), io("quant_conv"), io("post_quant_conv"), io("decoder.conv_in")
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
    levels = _num_levels(sd)
    for k in sd:
        ldm_to_diffusers_key(k, levels)  # raises on keys of another architecture
    return sd, dropped


def build(ldm: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, str]]:
    """A diffusers AutoencoderKL on the meta device shaped for ``ldm`` (ldm key -> tensor), and the
    map ldm key -> module key."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**config_from_ldm(ldm))
    levels = _num_levels(ldm)
    return model, {k: ldm_to_diffusers_key(k, levels) for k in ldm}


def decoder_block(name: str) -> str | None:
    """Decoder block of a module name: 'conv_in', 'mid_block', 'up_blocks.2', 'conv_norm_out', ..."""
    return decoder_block_of(name, "conv_act", "conv_norm_out")


def downsampling(model: torch.nn.Module) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


def recognise(sd: dict) -> bool:
    """Encoder or decoder tensors of any kind: kl-f8's reader then says precisely what is missing."""
    return any(k.startswith(("encoder.", "decoder.")) for k in sd)


LATENT_FAMILIES = {  # the published factors (diffusers' configs; ComfyUI's latent_formats.py)
    "sd": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None, "what": "SD 1.x/2.x"},
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None, "what": "SDXL"},
    "sd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "what": "SD3/3.5"},
    "flux": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "what": "Flux.1"},
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
    from ..metadata import last_component

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


def latents(trained, model: torch.nn.Module, probe, family: str = "auto", device: torch.device | str = "cpu") -> dict:
    """{"family", "why", "scaling_factor", "shift_factor", "source"} for an exported kl-f8 VAE.

    Decoder-only: the latent space is the base's, so the family's published factors. Full
    (encoder trained): re-estimated on the probe's training patches with the exported encoder, as
    latent diffusion's recipe does (scaling = 1/std of the latents; for 16-channel VAEs also shift =
    their mean, and scaling = 1/std around it)."""
    from ..probe import latent_statistics

    channels = int(trained.model.config.latent_channels)
    stats = probe.base_latents if probe is not None else None
    if family == "auto":
        family, why = pick_latent_family(trained.layout.base_name, channels, stats)
    else:
        why = "as given"
        if LATENT_FAMILIES[family]["latent_channels"] != channels:
            raise VAEFTError(f"family {family!r} has {LATENT_FAMILIES[family]['latent_channels']} latent channels, this VAE "
                             f"{channels}; choose one of " + ", ".join(f for f, v in LATENT_FAMILIES.items()
                                                                      if v["latent_channels"] == channels))
    out = {"family": family, "why": why, "scaling_factor": LATENT_FAMILIES[family]["scaling_factor"],
           "shift_factor": LATENT_FAMILIES[family]["shift_factor"],
           "source": f"{LATENT_FAMILIES[family]['what']}'s published factors (decoder-only: the latent space is the base's)"}
    if trained.config.trainable == "full":
        if probe is None or probe.train_patches is None:
            out["source"] = (f"{LATENT_FAMILIES[family]['what']}'s published factors: NOT re-estimated (no training "
                             "patches), though the encoder was trained")
            return out
        new = latent_statistics(model, probe.train_patches, device, seed=trained.config.seed)
        shift = new["mean"] if channels == 16 else None
        out.update(scaling_factor=float(f"{1 / new['std']:.5g}"),
                   shift_factor=float(f"{shift:.5g}") if shift is not None else None,
                   source=f"re-estimated on {new['patches']} training patches with the trained encoder "
                          f"(1/std{' and mean' if shift is not None else ''} of {new['values']} latent values)")
    return out


def diffusers_model(tensors: dict[str, torch.Tensor], scaling: dict, base_name: str = "") -> torch.nn.Module:
    """The ``AutoencoderKL`` (meta device) for ldm-keyed ``tensors``, with ``scaling``'s latent factors."""
    from diffusers import AutoencoderKL

    config = config_from_ldm(tensors)
    config.update(scaling_factor=scaling["scaling_factor"], shift_factor=scaling["shift_factor"])
    with torch.device("meta"):
        return AutoencoderKL.from_config(config)


FAMILY = Family(
    name="kl-f8",
    label="kl-f8 VAE (AutoencoderKL: SD1.x/2.x/SDXL, SD3, Flux.1)",
    files="vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors, ae.safetensors",
    probes=(LDM_PROBE, DIFFUSERS_PROBE),
    recognise=recognise,
    file_layout=file_layout,
    check=check_latent_channels,
    build=build,
    decoder_block=decoder_block,
    downsampling=downsampling,
    fused_norms=True,
    conv_form=attention_matrices,
    reshapable=is_attention_weight,
    latents=latents,
    diffusers_model=diffusers_model,
)
