"""VAE I/O: ldm (CompVis) and diffusers state dicts <-> diffusers ``AutoencoderKL``.

State dict formats are data: :func:`ldm_to_diffusers_key` maps one ldm key to its
diffusers name, and the reverse map is the same table inverted, so the round trip
ldm -> diffusers -> ldm is exact by construction (tested bit for bit).

The model config is read off tensor shapes, so SD1.x/2.x/SDXL (4 latent channels,
with quant convs) and SD3/Flux (16 channels, no quant convs) need no preset.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .errors import VAEFTError
from .tensors import nonfinite, sha256

# ldm attention sub-layer -> diffusers attention sub-layer.
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers checkpoints name the attention layers differently; accepted on input.
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_RESNET = {"nin_shortcut": "conv_shortcut"}
# Keys of the training wrapper that are not part of the autoencoder (LDM's loss module,
# EMA bookkeeping); A1111 and ComfyUI ignore them, so we drop them on load.
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


@dataclass
class LdmLayout:
    """What an exported file must reproduce: ldm key -> shape, and the base's identity.

    ``dtypes`` and ``tensor_sha256`` (ldm key -> the base file's stored dtype / the hash of its
    bytes in that dtype, ``training.tensors.sha256(t, shapes=False)``) let an export keep every tensor in the base's
    dtype and prove the untrained ones bit-identical to the file.
    """

    shapes: dict[str, tuple[int, ...]]
    num_levels: int
    base_sha256: str = ""
    base_name: str = ""
    dropped_keys: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    tensor_sha256: dict[str, str] = field(default_factory=dict)


# Parameter name prefixes trained in each mode (diffusers names; ldm names share the first component).
TRAINABLE_PREFIXES = {
    "decoder": ("decoder.", "post_quant_conv."),
    "full": ("encoder.", "quant_conv.", "decoder.", "post_quant_conv."),
}


def trained_prefixes(trainable: str) -> tuple[str, ...]:
    """The name prefixes of the tensors a run in mode ``trainable`` ('decoder' or 'full') trains."""
    return TRAINABLE_PREFIXES[trainable]


def frozen_sha256(model: torch.nn.Module, trainable: str) -> str:
    """Digest of every parameter and buffer of ``model`` that mode ``trainable`` does not train."""
    prefixes = trained_prefixes(trainable)
    return sha256({k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)})


def trainable_shapes(model: torch.nn.Module, trainable: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the parameters mode ``trainable`` trains (what a checkpoint must hold)."""
    prefixes = trained_prefixes(trainable)
    return {k: tuple(p.shape) for k, p in model.named_parameters() if k.startswith(prefixes)}


def trained_sha256(model: torch.nn.Module, trainable: str) -> str:
    """Digest of the tensors of ``model`` that mode ``trainable`` trains."""
    prefixes = trained_prefixes(trainable)
    return sha256({k: v for k, v in model.state_dict().items() if k.startswith(prefixes)})


def normalise_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict"
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An ldm-keyed AutoencoderKL state dict from an ldm or diffusers one.

    Strips a ``first_stage_model.`` / ``vae.`` prefix (full checkpoints), drops LDM's
    loss/EMA keys, and rejects anything that is not a kl-f8 AutoencoderKL with a
    message naming ``source``. Returns (state dict, dropped key names).
    """
    if not isinstance(sd, dict) or not sd:
        raise VAEFTError(f"{source} holds no tensors; expected a VAE state dict")
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd) and LDM_PROBE not in sd and DIFFUSERS_PROBE not in sd:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
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
    if "decoder.mid.block_1.mix_factor" in sd or any(".time_stack." in k for k in sd):
        raise VAEFTError(f"{source} is a video VAE (temporal decoder); only image kl-f8 VAEs are supported")
    levels = _num_levels(sd)
    for k in sd:
        ldm_to_diffusers_key(k, levels)  # raises on keys of another architecture
    return sd, dropped


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


def _names(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_finite_weights(sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """VAEFTError naming the tensors that hold NaN or infinite values (a damaged file, or one saved
    from a run that diverged): training from it gives NaN losses and a non-finite export."""
    bad = nonfinite(sd)
    if bad:
        raise VAEFTError(f"{source} holds NaN or infinite weights in {len(bad)} of {len(sd)} tensors "
                         f"({_names(bad)}); the file is damaged or was saved from a run that diverged: "
                         "use another copy of the base VAE")


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


@dataclass
class LoadedVAE:
    model: "torch.nn.Module"  # diffusers AutoencoderKL, fp32, eval mode
    layout: LdmLayout


def build_vae(sd: dict[str, torch.Tensor], source: str = "state dict", base_sha256: str | None = None
              ) -> LoadedVAE:
    """A diffusers AutoencoderKL (fp32) holding an ldm or diffusers state dict's weights."""
    from diffusers import AutoencoderKL

    ldm, dropped = normalise_state_dict(sd, source)
    check_finite_weights(ldm, source)
    check_latent_channels(ldm, source)
    config = config_from_ldm(ldm)
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    dsd = {k: v.float() for k, v in ldm_to_diffusers(ldm).items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if set(dsd) != set(expected):
        missing = sorted(set(expected) - set(dsd))
        extra = sorted(set(dsd) - set(expected))
        raise VAEFTError(f"{source}: VAE layout not understood (missing {missing[:4]}, unexpected {extra[:4]})")
    # shapes before load_state_dict, whose size-mismatch RuntimeError names no file and no remedy
    levels = _num_levels(ldm)
    wrong = [f"{diffusers_to_ldm_key(k, levels)} {tuple(v.shape)} (expected {expected[k]})"
             for k, v in dsd.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise VAEFTError(f"{source}: {len(wrong)} tensor(s) have shapes that do not fit the VAE read off its other "
                         f"tensors: {_names(wrong, 3)}. The file is damaged or mixes parts of different VAEs; "
                         "use one complete VAE file.")
    model.load_state_dict(dsd, strict=True, assign=True)
    model.eval().requires_grad_(False)
    layout = LdmLayout(
        shapes={k: tuple(v.shape) for k, v in ldm.items()},
        num_levels=levels,
        base_sha256=base_sha256 or sha256(ldm),
        base_name=os.path.basename(source),
        dropped_keys=dropped,
        dtypes={k: v.dtype for k, v in ldm.items()},
        tensor_sha256={k: sha256(v, shapes=False) for k, v in ldm.items()},
    )
    return LoadedVAE(model, layout)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .ckpt / .pt / .bin file, with a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        from .files import describe_path

        what = describe_path(path)  # stat only: a FIFO or device is never opened
        if what is None:
            raise VAEFTError(f"VAE file {path!r} does not exist")
        raise VAEFTError(f"VAE file {path!r} is {what}, not a regular file; give the .safetensors (or .ckpt) file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except VAEFTError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means the same thing to a user
        raise VAEFTError(f"cannot read VAE file {path!r}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VAEFTError(f"{path!r} does not hold a state dict of tensors")
    return obj


def load_vae(path: str | os.PathLike) -> LoadedVAE:
    """Load a VAE file (ldm or diffusers keys; .safetensors, .ckpt, .pt, .bin)."""
    sd = read_state_dict(path)
    return build_vae(sd, source=os.fspath(path))


def model_to_ldm(model: "torch.nn.Module", layout: LdmLayout) -> dict[str, torch.Tensor]:
    """The model's weights under the base file's exact ldm keys and shapes."""
    return diffusers_to_ldm(model.state_dict(), layout.shapes, layout.num_levels)


def reconstruct(model: "torch.nn.Module", x: torch.Tensor, sample: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode and decode with a diffusers ``AutoencoderKL`` (or anything with
    ``.encode(x).latent_dist`` and ``.decode(z).sample``): posterior mode, or a sample with
    ``sample``. x: BCHW in [-1, 1], H and W multiples of 8, cast to the model's dtype ->
    BCHW in the model's dtype (unclamped)."""
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if p is not None and x.dtype != p.dtype:
        x = x.to(p.dtype)
    dist = model.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return model.decode(z).sample


class Reconstruct(torch.nn.Module):
    """encode -> latent -> decode as one forward() for training, so DistributedDataParallel can wrap
    it: returns (reconstruction, posterior mean, posterior log-variance)."""

    def __init__(self, vae: torch.nn.Module, encoder_trains: bool, sample: bool,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.vae, self.encoder_trains, self.sample = vae, encoder_trains, sample
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, cached: torch.Tensor | None = None):
        # noise is drawn by the caller: a seeded generator inside would break torch.compile's graph.
        # cached: the frozen encoder's (mean, logvar) for x, concatenated on channels (latent cache)
        if cached is not None:
            mean, logvar = cached.chunk(2, dim=1)
        else:
            with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
                moments = self.vae.encode(x).latent_dist
                mean, logvar = moments.mean, moments.logvar
        # One layout whichever way the latents came (fresh ones are strided views of the encoder's
        # output, cached ones are stacked copies): the decoder's kernels, and so its gradients to
        # the last bit, must not depend on whether the cache was warm (a resumed run starts cold).
        mean, logvar = (t.contiguous(memory_format=self.memory_format) for t in (mean, logvar))
        z = mean + noise * torch.exp(0.5 * logvar) if (self.sample and noise is not None) else mean
        return self.vae.decode(z).sample, mean, logvar
