"""Latents users hold: ComfyUI's ``.latent`` files (core's Save Latent), tensors in ``.safetensors`` / ``.pt``,
and how they fit a VAE.

A LATENT in ComfyUI (a KSampler's output, VAE Encode's, Load Latent's) is the VAE's own latent space, before the
diffusion model's scaling: what :class:`~training.families.Family` calls the *held* latent (4D (B, C, h, w), or
5D (B, C, T, h, w) for the video families; Flux.2's is 2x2-patchified and BatchNorm-normalised, 128 channels
at 1/16). :func:`read_latents` reads them from files; :func:`module_latents` checks that they fit a VAE and
turns them into what its decoder takes.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from .errors import VAEFTError
from .families import family_of
from .files import describe_path

LATENT_SUFFIXES = (".latent", ".safetensors", ".pt", ".pth")
# ComfyUI's Load Latent: a .latent file without this key was saved before latents were stored unscaled, and is
# divided by SD's scale factor as it reads
VERSION_KEY, OLD_SCALE = "latent_format_version_0", 0.18215


def latent_files(path: str | os.PathLike) -> list[str]:
    """``path`` itself, or the latent files directly in folder ``path`` (sorted by name); refused, naming
    the path, when there is nothing to read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.lower().endswith(LATENT_SUFFIXES) and os.path.isfile(os.path.join(path, n)))
        if not found:
            raise VAEFTError(f"latents folder {path!r} holds no {', '.join(LATENT_SUFFIXES)} files (ComfyUI's Save "
                             "Latent writes .latent files to output/latents/)")
        return found
    if not os.path.isfile(path):
        what = describe_path(path)
        raise VAEFTError(f"latents {path!r} " + ("does not exist" if what is None else f"is {what}, not a file"))
    return [path]


def read_latent_file(path: str) -> tuple[torch.Tensor, str | None]:
    """(the latents of one file as float32, 4D or 5D, "old" for an old .latent file or None). ``.latent``: ComfyUI's Save Latent
    format (``latent_tensor``; without ``latent_format_version_0`` divided by 0.18215 as Load Latent does);
    ``.safetensors``: ``latent_tensor``, ``samples`` or its only tensor; ``.pt``/``.pth``: a tensor or a dict
    with ``samples`` (a LATENT) or ``latent_tensor``."""
    try:
        if path.lower().endswith((".latent", ".safetensors")):
            held = load_file(path)
        else:
            held = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to a user
        kind = "a safetensors file (what ComfyUI's Save Latent writes)" if path.lower().endswith(
            (".latent", ".safetensors")) else "a torch tensor file"
        raise VAEFTError(f"cannot read latents {path!r}: not {kind} ("
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    note = None
    if isinstance(held, torch.Tensor):
        z = held
    elif isinstance(held, dict):
        z = _pick(held, path)
        if "latent_tensor" in held and VERSION_KEY not in held:
            z = z.float() / OLD_SCALE
            note = "old"
    else:
        raise VAEFTError(f"latents {path!r} hold a {type(held).__name__}, not a tensor or a dict of tensors")
    if not z.is_floating_point():
        raise VAEFTError(f"latents {path!r} are {z.dtype}, not floating point: not latents")
    if z.ndim == 3:
        z = z[None]
    check_latent(z, f"latent file {path!r}")
    return z.float(), note


def check_latent(z: torch.Tensor, what: str) -> None:
    """Refuse, naming ``what``, a tensor that is no LATENT: not 4D / 5D, empty, or holding NaN/inf."""
    if z.ndim not in (4, 5) or z.numel() == 0:
        raise VAEFTError(f"{what} has shape {tuple(z.shape)}: a LATENT is (batch, channels, height, width), "
                         "or (batch, channels, frames, height, width) for a video VAE")
    if not torch.isfinite(z).all():
        raise VAEFTError(f"{what} holds NaN or infinite values (a sampler that diverged?): nothing to decode")


def _pick(held: dict, path: str) -> torch.Tensor:
    for key in ("latent_tensor", "samples"):
        if isinstance(held.get(key), torch.Tensor):
            return held[key]
    tensors = {k: v for k, v in held.items() if isinstance(v, torch.Tensor) and v.ndim >= 3}
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise VAEFTError(f"latents {path!r}: no 'latent_tensor' or 'samples' tensor among its keys "
                     f"({', '.join(sorted(map(str, held))[:8]) or 'none'}); give ComfyUI's .latent file or one tensor")


def read_latents(path: str | os.PathLike) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """([(file name, latents)], notes) of a latent file or of every latent file in a folder (see
    :func:`read_latent_file`); every file is read, and checked, before anything is decoded."""
    items, old = [], []
    for f in latent_files(path):
        z, note = read_latent_file(f)
        items.append((os.path.basename(f), z))
        if note:
            old.append(os.path.basename(f))
    if len(old) > 1:  # one line for many: a folder of old files is one fact
        return items, [f"{len(old)} old .latent files ({old[0]}, ...; no {VERSION_KEY}): divided by {OLD_SCALE} as "
                       "ComfyUI's Load Latent does"]
    return items, [f"{old[0]}: an old .latent file (no {VERSION_KEY}): divided by {OLD_SCALE} as ComfyUI's Load "
                   "Latent does"] if old else []


def held_channels(model: torch.nn.Module) -> tuple[int, int]:
    """(channels of the LATENT a VAE's users hold, pixels per latent each side): 4 and 8 for SD's kl-f8, 128
    and 16 for Flux.2."""
    family, c = family_of(model), family_of(model).latent_channels(model)
    p = next(model.parameters())
    probe = family.held_latent(model, torch.zeros(1, c, 2, 2, device=p.device, dtype=torch.float32))
    ratio = 2 // probe.shape[-1]
    return int(probe.shape[1]), family.downsampling(model) * ratio


def module_latents(model: torch.nn.Module, z: torch.Tensor, what: str, vae_name: str = "the VAE"
                   ) -> tuple[torch.Tensor, str | None]:
    """(held latents ``z`` (4D, or 5D for a video family) as ``model``'s decoder takes them (4D), a note or
    None): frame 0 of each 5D latent. A latent that does not fit (channels, dimensions) is refused naming both."""
    check_latent(z, what)
    family = family_of(model)
    channels, ratio = held_channels(model)
    if z.ndim == 5 and not family.video:
        raise VAEFTError(f"{what} is a video latent {tuple(z.shape)} (batch, channels, frames, height, width); "
                         f"{vae_name} is a {family.label}, whose latents are images (batch, {channels}, height, "
                         "width): it was made by another VAE family")
    if z.shape[1] != channels:
        raise VAEFTError(f"{what} has {z.shape[1]} latent channels (shape {tuple(z.shape)}); {vae_name} is a "
                         f"{family.label}, whose latents have {channels}: it was made by another VAE family (or "
                         "another model's VAE Encode); decode it with the VAE it came from")
    note = None
    if z.ndim == 5:
        if z.shape[2] > 1:
            note = (f"{what}: {z.shape[2]} latent frames; frame 0 compared (a video latent's first frame is one image; "
                    "each later one holds 4 frames that only the video decoder, in sequence, decodes)")
        z = z[:, :, 0]
    return family.module_latent(model, z.to(next(model.parameters()).device, torch.float32)), note
