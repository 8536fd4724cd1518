"""A VAE as the library holds it: a file's tensors, recognised as one of the families it trains
(:mod:`training.families`), built into that family's module (fp32, the image interface every family
shares) and mapped back to the file's own keys, shapes and dtypes exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from .errors import VAEFTError
from .families import Family, family_of, has_family, recognise, trained
from .files import describe_path
from .tensors import nonfinite, sha256


@dataclass
class FileLayout:
    """What an exported file must reproduce: the base file's keys, shapes and dtypes, its family and
    identity, and where each of its tensors lives in the module.

    ``dtypes`` and ``tensor_sha256`` (file key -> the base file's stored dtype / the hash of its bytes
    in that dtype, ``training.tensors.sha256(t, shapes=False)``) let an export keep every tensor in the
    base's dtype and prove the untrained ones bit-identical to the file.
    """

    family: Family                           # the base file's family (its .name is what files record)
    shapes: dict[str, tuple[int, ...]]
    module_keys: dict[str, str]              # file key -> module (state dict) key
    base_sha256: str = ""
    # False when the weights are not a file's own (ComfyUI's working-dtype copy): base_sha256 then names
    # no file a re-run could be checked against
    from_file: bool = True
    base_name: str = ""
    dropped_keys: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    tensor_sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadedVAE:
    model: "torch.nn.Module"  # the family's module (a diffusers autoencoder), fp32, eval mode, frozen
    layout: FileLayout

    @property
    def family(self) -> Family:
        return self.layout.family


def build_vae(sd: dict[str, torch.Tensor], source: str = "state dict", base_sha256: str | None = None
              ) -> LoadedVAE:
    """The family's module (fp32) holding a state dict's weights, in any layout a family reads
    (a full checkpoint's VAE too); refused, naming ``source``, when it is no VAE this version trains
    or is damaged."""
    family, file_sd, dropped = recognise(sd, source)
    check_finite_weights(file_sd, source)
    family.check(file_sd, source)
    model, keys = family.build(file_sd)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if set(keys.values()) != set(expected):
        # named as the file names them, in its family's layout (the module's names appear nowhere in the file)
        missing = sorted(family.file_key(mk, file_sd) for mk in set(expected) - set(keys.values()))
        extra = sorted(fk for fk, mk in keys.items() if mk not in expected)
        what = "; ".join(([f"it lacks {_names(missing)}"] if missing else [])
                         + ([f"it holds {_names(extra)}, which a {family.short} VAE of this shape has not"] if extra else []))
        raise VAEFTError(f"{source} is not a complete {family.label}: {what}. The file is damaged or mixes parts of "
                         "different VAEs; use one complete VAE file.")
    # shapes before load_state_dict, whose size-mismatch RuntimeError names no file and no remedy;
    # a matrix stored where the module has a 1x1 convolution (or back) is the same tensor
    wrong = [f"{fk} {tuple(v.shape)} (expected {expected[keys[fk]]})" for fk, v in file_sd.items()
             if not _fits(tuple(v.shape), expected[keys[fk]], family.reshapable(fk))]
    if wrong:
        raise VAEFTError(f"{source}: {len(wrong)} tensor(s) have shapes that do not fit the VAE read off its other "
                         f"tensors: {_names(wrong, 3)}. The file is damaged or mixes parts of different VAEs; "
                         "use one complete VAE file.")
    # floats as fp32 master weights; counters (BatchNorm's num_batches_tracked) keep their integer dtype
    model.load_state_dict({keys[fk]: (v.float() if v.is_floating_point() else v).reshape(expected[keys[fk]])
                           for fk, v in file_sd.items()},
                          strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.vaeft_family = family  # the one lookup: everything that holds the model asks it (families.family_of)
    layout = FileLayout(
        family=family,
        shapes={k: tuple(v.shape) for k, v in file_sd.items()},
        module_keys=dict(keys),
        base_sha256=base_sha256 or sha256(file_sd),
        base_name=os.path.basename(source),
        dropped_keys=dropped,
        dtypes={k: v.dtype for k, v in file_sd.items()},
        tensor_sha256={k: sha256(v, shapes=False) for k, v in file_sd.items()},
    )
    return LoadedVAE(model, layout)


def _fits(shape: tuple[int, ...], expected: tuple[int, ...], reshapable: bool) -> bool:
    """Whether a file tensor of ``shape`` is the module's ``expected`` one: equal, or for the family's
    reshapable keys equal but for dimensions of size 1, which never change the order of the values
    ((C, C, 1, 1) and (C, C) are the same weight; so are Qwen-Image 2.1's (O, I, 1, 3, 3) and (O, I, 3, 3))."""
    if not reshapable:
        return tuple(shape) == tuple(expected)
    return _squeezed(shape) == _squeezed(expected)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape if int(s) != 1)


def load_vae(path: str | os.PathLike) -> LoadedVAE:
    """Load a VAE file of a family this version trains (.safetensors, .ckpt, .pt, .bin)."""
    sd = read_state_dict(path)
    return build_vae(sd, source=os.fspath(path))


def model_to_file(model: "torch.nn.Module", layout: FileLayout) -> dict[str, torch.Tensor]:
    """The model's weights under the base file's exact keys and shapes."""
    sd = model.state_dict()
    return {fk: sd[mk].reshape(layout.shapes[fk]) for fk, mk in layout.module_keys.items()}


def latent_channels(model: torch.nn.Module) -> int | None:
    """Latent channels of a family's module (built by :func:`build_vae`); None for a model that is no VAE
    family's (an evaluation's identity baseline, which has no latents)."""
    return family_of(model).latent_channels(model) if has_family(model) else None


def pixels_per_latent(model: torch.nn.Module) -> int:
    """Pixels per latent, each side, of a family's module (8 for kl-f8 and Wan 2.1, 16 for Flux.2, Wan 2.2 and
    Qwen-Image 2.1); 8 for a model that is no VAE family's (an evaluation's identity baseline)."""
    return int(family_of(model).downsampling(model)) if has_family(model) else 8


def check_patch_side(model: torch.nn.Module, side: int, what: str = "patch_size") -> None:
    """Refuse a patch (or tile) side the model cannot encode and decode back to the same size, naming the
    setting, the family and the nearest sides that work."""
    n = pixels_per_latent(model)
    if side % n:
        family = f"a {family_of(model).short} VAE" if has_family(model) else "this VAE"
        lower, upper = max(n, side // n * n), (side // n + 1) * n
        raise VAEFTError(f"{what} {side} is not a multiple of {n}: {family} makes one latent of {n}x{n} pixels; "
                         f"use {lower} or {upper}")


def image_channels(model: torch.nn.Module) -> int:
    """Channels of the images a family's module takes (built by :func:`build_vae`)."""
    return family_of(model).image_channels(model)


def frozen_sha256(model: torch.nn.Module, trainable: str) -> str:
    """Digest of every parameter and buffer of ``model`` that mode ``trainable`` does not train."""
    family = family_of(model)
    return sha256({k: v for k, v in model.state_dict().items() if not trained(k, trainable, family)})


def trainable_shapes(model: torch.nn.Module, trainable: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the parameters mode ``trainable`` trains (what a checkpoint must hold)."""
    family = family_of(model)
    return {k: tuple(p.shape) for k, p in model.named_parameters() if trained(k, trainable, family)}


def trained_sha256(model: torch.nn.Module, trainable: str) -> str:
    """Digest of the tensors of ``model`` that mode ``trainable`` trains."""
    family = family_of(model)
    return sha256({k: v for k, v in model.state_dict().items() if trained(k, trainable, family)})


def check_finite_weights(sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """VAEFTError naming the tensors that hold NaN or infinite values (a damaged file, or one saved
    from a run that diverged): training from it gives NaN losses and a non-finite export."""
    bad = nonfinite(sd)
    if bad:
        raise VAEFTError(f"{source} holds NaN or infinite weights in {len(bad)} of {len(sd)} tensors "
                         f"({_names(bad)}); the file is damaged or was saved from a run that diverged: "
                         "use another copy of the base VAE")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .ckpt / .pt / .bin file, with a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = describe_path(path)  # stat only: a FIFO or device is never opened
        if what is None:
            raise VAEFTError(f"VAE file {path!r} does not exist")
        raise VAEFTError(f"VAE file {path!r} is {what}, not a regular file; give the .safetensors (or .ckpt) file")
    try:
        if path.endswith(".safetensors"):
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


def reconstruct(model: "torch.nn.Module", x: torch.Tensor, sample: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode and decode with a diffusers ``AutoencoderKL`` (or anything with
    ``.encode(x).latent_dist`` and ``.decode(z).sample``): posterior mode, or a sample with
    ``sample``. x: BCHW in [-1, 1], H and W multiples of 8, cast to the model's dtype ->
    BCHW in the model's dtype (as the family's decode gives it: kl-f8 unclamped, Wan 2.1 clamped to [-1, 1])."""
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if p is not None and x.dtype != p.dtype:
        x = x.to(p.dtype)
    dist = model.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return model.decode(z).sample


def perturbed(z: torch.Tensor, mean: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``z`` plus ``shift`` (unit-free noise, already multiplied by the latent_noise sigma, shaped like ``z``) times
    each patch's per-channel std of the posterior mean ``mean`` (B, C, h, w): latents near the encoder's manifold
    at a distance that follows each channel's own spread. ``shift`` None: ``z`` unchanged."""
    if shift is None:
        return z
    std = mean.detach().float().std(dim=(-2, -1), keepdim=True).clamp_min(1e-6) if mean.shape[-1] * mean.shape[-2] > 1 \
        else mean.detach().float().abs().clamp_min(1e-6)
    return z + (shift * std).to(z.dtype)


@torch.no_grad()
def teacher_decode(teacher: torch.nn.Module, mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None,
                   shift: torch.Tensor | None = None, spread: torch.Tensor | None = None) -> torch.Tensor:
    """A frozen teacher's fp32 decode of the latents a trained decoder got: the posterior ``mean`` (B, C, h, w), plus
    ``noise`` times its std when it decoded a sample (None: the mode), perturbed by ``shift`` as :func:`perturbed`
    does (by the spread of ``spread``, default ``mean``). The target of the fp16-fix recipe (target 'base') and of
    distil."""
    spread = mean if spread is None else spread
    mean, logvar = mean.float(), logvar.float()
    z = mean + noise * torch.exp(0.5 * logvar) if noise is not None else mean
    return teacher.decode(perturbed(z, spread, shift)).sample.float()


class Reconstruct(torch.nn.Module):
    """encode -> latent -> decode as one forward() for training, so DistributedDataParallel can wrap
    it: returns (reconstruction, posterior mean, posterior log-variance)."""

    def __init__(self, vae: torch.nn.Module, encoder_trains: bool, sample: bool,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.vae, self.encoder_trains, self.sample = vae, encoder_trains, sample
        self.memory_format = memory_format
        self.side_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, cached: torch.Tensor | None = None,
                shift: torch.Tensor | None = None):
        # noise is drawn by the caller: a seeded generator inside would break torch.compile's graph.
        # cached: the frozen encoder's (mean, logvar) for x, concatenated on channels (latent cache)
        # shift: latent_noise's perturbation (see :func:`perturbed`)
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
        # a distilled tiny student's own encoder learns the teacher's latents here, inside the forward that
        # DistributedDataParallel wraps (so its gradients are averaged too); read as ``.side_loss`` after the call
        side = getattr(self.vae, "side_loss", None)
        self.side_loss = side(x, mean) if side is not None and torch.is_grad_enabled() else None
        return self.vae.decode(perturbed(z, mean, shift)).sample, mean, logvar


def _names(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
