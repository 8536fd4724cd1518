"""What an export checks and records about the exported decoder and its latents.

- Half precision: does the decoder survive fp16 / bf16, as ComfyUI and Automatic1111 often run it?
  :func:`half_precision_report` decodes probe patches in fp32, fp16 and bf16 and watches each decoder
  block's largest activation; :func:`check_half_precision` compares the fine-tune with the base.
- Latent scaling: the factors a diffusion pipeline multiplies latents by (:func:`latent_scaling`):
  the family's published ones, or re-estimated when the encoder was trained.

:func:`make_probe` takes what both need right after training (the session does it), so the Save
node needs nothing but the trained result.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import VAEFTError
from .metadata import last_component

if TYPE_CHECKING:
    from .trained import Trained

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504: anything larger becomes inf in fp16


_SATURATION_GAP = 0.1  # [-1, 1] units (~13 8-bit levels): rounding noise stays below it, breakage does not


@dataclass
class ExportProbe:
    """Patches the export decodes to check half precision, with the base VAE's figures on them.

    Made by :func:`make_probe` after training (the session does it) and kept on ``Trained.probe``,
    so the Save node needs nothing but the trained result.
    """

    patches: torch.Tensor   # (n, 3, h, w) in [-1, 1], fp32, CPU, as decoded (see probe_patches)
    held_out: bool          # True: validation images' patches; False: training patches (no validation split)
    base_report: dict       # half_precision_report of the base VAE on the base encoder's latents of ``patches``
    train_patches: torch.Tensor | None = None  # (m, 3, h, w) training patches for the latent statistics
    base_latents: dict | None = None           # latent_statistics of the base encoder on ``train_patches``


def centre_crop(patches: torch.Tensor, count: int, side: int) -> torch.Tensor:
    """The first ``count`` of (n, C, H, W) ``patches``, each centre-cropped to at most ``side``² (sides
    rounded down to multiples of 8), contiguous."""
    x = patches[:count]
    h, w = x.shape[-2:]
    th, tw = min(h, side) // 8 * 8, min(w, side) // 8 * 8
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw].contiguous()


def probe_patches(patches: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The patches the half-precision check decodes on ``device``: fp16 convolutions on a CPU are slow
    (a full SD decoder takes minutes per 256² patch), so on a CPU at most 2 patches, cropped to 64²;
    on a GPU 4 patches of up to 256²."""
    return centre_crop(patches, *((2, 64) if torch.device(device).type == "cpu" else (4, 256)))


def stats_patches(patches: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The training patches the latent statistics are taken on: all of them (up to 16) on a GPU; on a
    CPU 4, cropped to 128² (a full SD encoder takes seconds per 256² patch there)."""
    return centre_crop(patches, *((4, 128) if torch.device(device).type == "cpu" else (16, 1 << 30)))


def _as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    m = copy.deepcopy(model)
    torch.nn.Module.to(m, dtype)  # (diffusers' ModelMixin.to would warn about fp32 modules it has none of)
    return m.eval()


def _block_of(name: str) -> str | None:
    """Decoder block of a module name: 'conv_in', 'mid_block', 'up_blocks.2', 'conv_norm_out', ..."""
    parts = name.split(".")
    if parts[0] == "post_quant_conv":
        return "post_quant_conv"
    if parts[0] != "decoder" or len(parts) < 2:
        return None
    if parts[1] == "conv_act":  # the SiLU between conv_norm_out and conv_out
        return "conv_norm_out"
    return ".".join(parts[1:3]) if parts[1] == "up_blocks" and len(parts) > 2 else parts[1]


@torch.no_grad()
def _decode_watched(model: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(decoded images in fp32, largest |output| of any layer per decoder block; inf where one overflowed)."""
    peaks: dict[str, float] = {}
    hooks = []

    def watch(block):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                peak = float(out.detach().abs().amax())
                peaks[block] = max(peaks.get(block, 0.0), float("inf") if peak != peak else peak)  # NaN: overflowed
        return hook

    for name, module in model.named_modules():
        block = _block_of(name)
        if block is not None and not list(module.children()):
            hooks.append(module.register_forward_hook(watch(block)))
    try:
        out = model.decode(latents).sample.float()
    finally:
        for h in hooks:
            h.remove()
    return out, peaks


@torch.no_grad()
def half_precision_report(model: torch.nn.Module, latents: torch.Tensor, device: torch.device | str = "cpu") -> dict:
    """Decode ``latents`` (n, C, h, w) with ``model``'s decoder in fp32, fp16 and bf16.

    Returns {"pixels": n·H·W, "fp16": figures, "bf16": figures}; figures:
      nonfinite_pixels   pixels with NaN or inf in any channel (black or broken in a viewer)
      saturated_pixels   finite pixels pushed past white or black (|x| > 1, so a viewer clips them) and
                         more than 0.1 away from the fp32 decode of the same weights (so not rounding noise)
      max_abs_error      largest |half - fp32| over finite pixels, in [-1, 1] units
      max_activation     decoder block -> largest |output| of any of its layers (inf: overflowed)
      limit_used         fp16 only: the largest activation / 65504 (fp16's largest value); inf: overflowed
      safe               no non-finite and no saturated pixels
    """
    device = torch.device(device)
    z = latents.to(device, torch.float32)
    ref, _ = _decode_watched(_as_dtype(model, torch.float32).to(device), z)
    out = {"pixels": int(ref.shape[0] * ref.shape[2] * ref.shape[3])}
    for name, dtype in HALF.items():
        img, peaks = _decode_watched(_as_dtype(model, dtype).to(device), z.to(dtype))
        finite = torch.isfinite(img)
        nonfinite = int((~finite).any(1).sum())
        saturated = int(((img.abs() > 1) & finite & ((img - ref).abs() > _SATURATION_GAP)).any(1).sum())
        err = (img - ref).abs()[finite]
        fig = {"nonfinite_pixels": nonfinite, "saturated_pixels": saturated,
               "max_abs_error": float(err.max()) if err.numel() else float("inf"),
               "max_activation": peaks, "safe": nonfinite == 0 and saturated == 0}
        if name == "fp16":
            fig["limit_used"] = max(peaks.values(), default=0.0) / FP16_MAX
        out[name] = fig
    return out


@torch.no_grad()
def encode_latents(model: torch.nn.Module, patches: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The encoder's posterior means of ``patches`` (n, 3, P, P) in [-1, 1], in fp32, on the CPU."""
    m = _as_dtype(model, torch.float32).to(device)
    return m.encode(patches.to(device, torch.float32)).latent_dist.mode().cpu()


@torch.no_grad()
def latent_statistics(model: torch.nn.Module, patches: torch.Tensor, device: torch.device | str = "cpu",
                      seed: int = 0) -> dict:
    """Mean and standard deviation of the encoder's posterior samples of ``patches`` (m, 3, P, P) in
    [-1, 1], over all values, as latent diffusion's scale-factor recipe takes them (scale = 1/std).
    Returns {"mean", "std", "patches", "values"}."""
    device = torch.device(device)
    m = _as_dtype(model, torch.float32).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    zs = [m.encode(chunk.to(device, torch.float32)).latent_dist.sample(gen).float().cpu() for chunk in patches.split(4)]
    z = torch.cat(zs)
    return {"mean": float(z.mean()), "std": float(z.std()), "patches": int(patches.shape[0]), "values": z.numel()}


def make_probe(base, data, *, seed: int = 0, device: torch.device | str = "cpu", count: int = 4,
               train_count: int = 16) -> ExportProbe:
    """What the export checks against, taken right after training: ``count`` held-out patches of
    ``data`` (a PatchDataset; training patches when it has no validation images) with the base VAE's
    (``base``: a LoadedVAE or an AutoencoderKL) half-precision figures on them, and ``train_count``
    training patches with the base encoder's latent statistics. ``data`` may also be a BCHW tensor
    in [-1, 1], used for both."""
    if isinstance(data, torch.Tensor):
        patches, held_out, train = data[:count], False, data[:train_count]
    else:
        from .data import preview_patches

        patches, held_out = preview_patches(data, count, seed=seed), bool(data.summary().get("val_images"))
        train = next(iter(data.train_batches(train_count, start_batch=0, num_workers=0)))
    # cropped for ``device`` once, here: the export decodes exactly these, so its figures compare with the base's
    patches = probe_patches(patches.detach().to("cpu", torch.float32), device)
    train = stats_patches(train.detach().to("cpu", torch.float32), device)
    model = base.model if hasattr(base, "model") else base
    return ExportProbe(patches=patches, held_out=held_out,
                       base_report=half_precision_report(model, encode_latents(model, patches, device), device),
                       train_patches=train, base_latents=latent_statistics(model, train, device, seed))


def _peak(fig: dict) -> tuple[str, float]:
    return max(fig["max_activation"].items(), key=lambda kv: kv[1], default=("-", 0.0))


def _fmt(value: float) -> str:
    return "overflow" if value == float("inf") else f"{value:.3g}"


def figures_line(name: str, fig: dict, pixels: int) -> str:
    block, top = _peak(fig)
    verdict = "safe" if fig["safe"] else "UNSAFE"
    line = (f"{name}: {verdict}: {fig['nonfinite_pixels']} of {pixels} pixels NaN/inf, {fig['saturated_pixels']} "
            f"pushed past black/white; largest activation {_fmt(top)} ({block})")
    if "limit_used" in fig and fig["limit_used"] != float("inf"):
        line += f", {100 * fig['limit_used']:.2g}% of fp16's limit"
    return line


def _round_figures(fig: dict) -> dict:
    out = {k: v for k, v in fig.items() if k != "max_activation"}
    out["max_activation"] = {k: float(f"{v:.4g}") if v != float("inf") else v for k, v in fig["max_activation"].items()}
    for k in ("max_abs_error", "limit_used"):
        if k in out and out[k] != float("inf"):
            out[k] = float(f"{out[k]:.4g}")
    return out


def check_half_precision(model: torch.nn.Module, probe: ExportProbe,
                         device: torch.device | str = "cpu") -> tuple[dict, list[str], list[str]]:
    """Decode the probe with ``model`` (the exported weights, see exported_model) in fp16 and bf16.

    Returns (summary for the report and metadata, warnings, notes). Warns when the fine-tuned
    decoder overflows or saturates in a half precision where the base decoder did not."""
    x = probe.patches
    fine = half_precision_report(model, encode_latents(model, x, device), device)
    base = probe.base_report
    summary = {"patches": f"{x.shape[0]} {'held-out' if probe.held_out else 'training'} patches of "
                          f"{x.shape[-1]}x{x.shape[-2]}",
               "pixels": fine["pixels"],
               "fine_tuned": {k: _round_figures(fine[k]) for k in HALF},
               "base": {k: _round_figures(base[k]) for k in HALF if k in base}}
    warnings, notes = [], []
    for name in HALF:
        if fine[name]["safe"]:
            continue
        block, top = _peak(fine[name])
        what = (f"{fine[name]['nonfinite_pixels']} of {fine['pixels']} probe pixels NaN/inf, "
                f"{fine[name]['saturated_pixels']} pushed past black/white; largest activation {_fmt(top)} in {block}")
        if base.get(name, {}).get("safe", True):
            instead = ("bf16 or fp32 (ComfyUI --bf16-vae or --fp32-vae; Automatic1111 --no-half-vae)"
                       if name == "fp16" and fine["bf16"]["safe"] else
                       "fp32 (ComfyUI --fp32-vae; Automatic1111 --no-half-vae)")
            warnings.append(
                f"the fine-tuned decoder breaks in {name} where the base decoder did not ({what}). Tools that run "
                f"the VAE in {name} will give black, NaN or blown-out images: run it in {instead}, or train "
                "again with a lower lr or fewer steps.")
        else:
            notes.append(f"the base decoder breaks in {name} too, and so does the fine-tune ({what}); run it in "
                         "fp32 or a higher precision, as with the base")
    return summary, warnings, notes


FAMILIES = {  # the published factors (diffusers' configs; ComfyUI's latent_formats.py)
    "sd": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None, "what": "SD 1.x/2.x"},
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None, "what": "SDXL"},
    "sd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "what": "SD3/3.5"},
    "flux": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "what": "Flux.1"},
}


FAMILY_CHOICES = ("auto",) + tuple(FAMILIES)


_NAME_HINTS = (("sdxl", r"(^|[^a-z])(sd[_-]?)?xl([^a-z]|$)"), ("flux", r"flux|^ae\.(safetensors|sft|ckpt)$"),
               ("sd3", r"sd[_-]?3"), ("sd", r"vae-ft-(mse|ema)|sd[_-]?(v?1|v?2)([^0-9]|$)|v1-5|v2-1"))


def pick_family(base_name: str, latent_channels: int, stats: dict | None = None) -> tuple[str, str]:
    """(family, why) for a base VAE: its file name's hint when there is one for its channel count,
    else the family whose published scaling_factor is nearest to the measured 1/std of its latents,
    else the common one (sd for 4 channels, flux for 16)."""
    fits = [f for f, v in FAMILIES.items() if v["latent_channels"] == latent_channels]
    if not fits:
        raise VAEFTError(f"no known latent family has {latent_channels} latent channels; pass the scaling "
                         "yourself (families: " + ", ".join(f"{k} ({v['latent_channels']} ch)"
                                                            for k, v in FAMILIES.items()) + ")")
    name = last_component(base_name).lower()
    for family, pattern in _NAME_HINTS:
        if family in fits and re.search(pattern, name):
            return family, f"from the base file's name {name!r}"
    if stats and stats.get("std", 0) > 0:
        scale = 1 / stats["std"]
        family = min(fits, key=lambda f: abs(math.log(scale / FAMILIES[f]["scaling_factor"])))
        return family, (f"the base encoder's latents have 1/std {scale:.4g} on the training patches, nearest to "
                        f"{family}'s {FAMILIES[family]['scaling_factor']}; pass the family to be sure")
    family = "sd" if latent_channels == 4 else "flux"
    return family, "a guess from the channel count alone (nothing measured); pass the family to be sure"


def latent_scaling(trained: Trained, model: torch.nn.Module, probe: ExportProbe | None,
                   family: str = "auto", device: torch.device | str = "cpu") -> dict:
    """{"family", "why", "scaling_factor", "shift_factor", "source"} for the exported VAE.

    Decoder-only: the latent space is the base's, so the family's published factors. Full
    (encoder trained): re-estimated on the probe's training patches with the exported encoder, as
    latent diffusion's recipe does (scaling = 1/std of the latents; for 16-channel VAEs also shift =
    their mean, and scaling = 1/std around it)."""
    if family not in FAMILY_CHOICES:
        raise VAEFTError(f"family must be one of {', '.join(FAMILY_CHOICES)}; got {family!r}")
    channels = int(trained.model.config.latent_channels)
    stats = probe.base_latents if probe is not None else None
    if family == "auto":
        family, why = pick_family(trained.layout.base_name, channels, stats)
    else:
        why = "as given"
        if FAMILIES[family]["latent_channels"] != channels:
            raise VAEFTError(f"family {family!r} has {FAMILIES[family]['latent_channels']} latent channels, this VAE "
                             f"{channels}; choose one of " + ", ".join(f for f, v in FAMILIES.items()
                                                                      if v["latent_channels"] == channels))
    out = {"family": family, "why": why, "scaling_factor": FAMILIES[family]["scaling_factor"],
           "shift_factor": FAMILIES[family]["shift_factor"],
           "source": f"{FAMILIES[family]['what']}'s published factors (decoder-only: the latent space is the base's)"}
    if trained.config.trainable == "full":
        if probe is None or probe.train_patches is None:
            out["source"] = (f"{FAMILIES[family]['what']}'s published factors: NOT re-estimated (no training "
                             "patches), though the encoder was trained")
            return out
        new = latent_statistics(model, probe.train_patches, device, seed=trained.config.seed)
        shift = new["mean"] if channels == 16 else None
        out.update(scaling_factor=float(f"{1 / new['std']:.5g}"),
                   shift_factor=float(f"{shift:.5g}") if shift is not None else None,
                   source=f"re-estimated on {new['patches']} training patches with the trained encoder "
                          f"(1/std{' and mean' if shift is not None else ''} of {new['values']} latent values)")
    return out
