"""The ldm (CompVis) key grammar of the ``AutoencoderKL`` architecture, and its diffusers names: shared by
the kl-f8 family and the Flux.2 family (the same encoder and decoder; Flux.2 adds its quant convolutions
inside them and BatchNorm statistics).

State dict formats are data: :func:`ldm_to_diffusers_key` maps one ldm key to its diffusers name, and the
reverse map is the same table inverted, so the round trip ldm -> diffusers -> ldm is exact by
construction (tested bit for bit). Module-side facts both families share (the decoder's blocks, the
downsampling factor) are here too.
"""

from __future__ import annotations

import re

import torch

from ..errors import VAEFTError
from .base import decoder_block_of

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


_RESNET = {"nin_shortcut": "conv_shortcut"}


LDM_PROBE = "decoder.conv_in.weight"


DIFFUSERS_PROBE = "decoder.up_blocks.0.resnets.0.norm1.weight"


def num_levels(keys) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    if not levels:
        levels = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def num_levels_diffusers(keys) -> int:
    """Resolution levels of a diffusers-keyed state dict (its encoder's down blocks)."""
    return len({m.group(1) for k in keys if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})


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
    n = num_levels(sd)
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
    sd = {normalise_diffusers_key(k): v for k, v in sd.items()}
    if num_levels is None:
        num_levels = num_levels_diffusers(sd)
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


def normalise_diffusers_key(k: str) -> str:
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


def decoder_block(name: str) -> str | None:
    """Decoder block of a module name: 'conv_in', 'mid_block', 'up_blocks.2', 'conv_norm_out', ..."""
    return decoder_block_of(name, "conv_act", "conv_norm_out")


def downsampling(model: torch.nn.Module) -> int:
    """Pixels per latent, each side, of a diffusers ``AutoencoderKL``-layout module."""
    return 2 ** (len(model.config.block_out_channels) - 1)
