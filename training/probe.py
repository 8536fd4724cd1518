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
from dataclasses import dataclass
import torch

from .data import preview_patches
from .errors import VAEFTError
from .families import LATENT_CHOICES, family_of

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
    base_decoded: torch.Tensor | None = None   # the base's fp32 decode of ``patches``' latents, clamped, CPU
    base_latents: dict | None = None           # latent_statistics of the base encoder on ``train_patches``
    base_z: torch.Tensor | None = None         # the base encoder's latents (posterior means) of ``patches``, CPU


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


def as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype``, in eval mode (the model itself is left as it is)."""
    m = copy.deepcopy(model)
    torch.nn.Module.to(m, dtype)  # (diffusers' ModelMixin.to would warn about fp32 modules it has none of)
    return m.eval()


@torch.no_grad()
def decode_with_peaks(model: torch.nn.Module, latents: torch.Tensor, watched: list[tuple[object, torch.nn.Module]]
                      ) -> tuple[torch.Tensor, dict[object, float]]:
    """(the family's raw decode of ``latents`` in fp32, {key: largest |output| of the modules watched under
    that key}; inf where one overflowed). ``watched``: (key, module) pairs, several modules may share a key."""
    peaks: dict[object, float] = {}
    hooks = []

    def watch(key):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                peak = float(out.detach().abs().amax())
                peaks[key] = max(peaks.get(key, 0.0), float("inf") if peak != peak else peak)  # NaN: overflowed
        return hook

    for key, module in watched:
        hooks.append(module.register_forward_hook(watch(key)))
    try:
        out = family_of(model).raw_decode(model, latents).float()
    finally:
        for h in hooks:
            h.remove()
    return out, peaks


def decode_watched(model: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(decoded images in fp32, largest |output| of any layer per decoder block; inf where one overflowed).
    The layers are the leaves and the modules made of them (a residual block's output is the stream's sum,
    which none of its leaves shows)."""
    block_of = family_of(model).decoder_block
    return decode_with_peaks(model, latents, [(block_of(n), m) for n, m in model.named_modules()
                                              if block_of(n) is not None])


@torch.no_grad()
def half_precision_report(model: torch.nn.Module, latents: torch.Tensor, device: torch.device | str = "cpu",
                          reference: torch.Tensor | None = None) -> dict:
    """Decode ``latents`` (n, C, h, w) with ``model``'s decoder in fp32, fp16 and bf16.

    Returns {"pixels": n·H·W, "fp16": figures, "bf16": figures}; figures:
      nonfinite_pixels   pixels with NaN or inf in any channel (black or broken in a viewer)
      saturated_pixels   finite pixels pushed past white or black (|x| > 1, so a viewer clips them) and
                         more than 0.1 away from the fp32 decode of the same weights (so not rounding noise)
      max_abs_error      largest |half - fp32| over finite pixels, in [-1, 1] units
      max_activation     decoder block -> largest |output| of any of its layers (inf: overflowed)
      limit_used         fp16 only: the largest activation / 65504 (fp16's largest value); inf: overflowed
      safe               no non-finite and no saturated pixels
      psnr               dB against this model's own fp32 decode (what the half precision costs), both
                         clamped to [-1, 1], NaN/inf pixels counted as black
      psnr_vs_base       the same against ``reference`` (the base VAE's fp32 decode; default: this model's own)
    and "fp32_decoded": the fp32 decode, clamped (CPU), which a later report can take as ``reference``.
    """
    device = torch.device(device)
    z = latents.to(device, torch.float32)
    ref, _ = decode_watched(as_dtype(model, torch.float32).to(device), z)
    out = {"pixels": int(ref.shape[0] * ref.shape[2] * ref.shape[3]), "fp32_decoded": ref.clamp(-1, 1).cpu()}
    target = (ref if reference is None else reference.to(device, torch.float32)).clamp(-1, 1)
    for name, dtype in HALF.items():
        img, peaks, nonfinite, shown = decode_in(model, z, dtype)
        finite = torch.isfinite(img)
        saturated = int(((img.abs() > 1) & finite & ((img - ref).abs() > _SATURATION_GAP)).any(1).sum())
        err = (img - ref).abs()[finite]
        fig = {"nonfinite_pixels": nonfinite, "saturated_pixels": saturated,
               "max_abs_error": float(err.max()) if err.numel() else float("inf"),
               "max_activation": peaks, "safe": nonfinite == 0 and saturated == 0,
               "psnr": psnr(shown, ref.clamp(-1, 1)), "psnr_vs_base": psnr(shown, target)}
        if name == "fp16":
            fig["limit_used"] = max(peaks.values(), default=0.0) / FP16_MAX
        out[name] = fig
    return out


@torch.no_grad()
def decode_in(model: torch.nn.Module, latents: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, dict[str, float], int, torch.Tensor]:
    """``model``'s decoder run in ``dtype`` on ``latents`` (on their device), as a tool that casts the VAE
    does: (the images in fp32, the largest activation per decoder block, pixels with NaN/inf in any channel,
    the images as a viewer shows them: NaN/inf as black, clamped to [-1, 1])."""
    img, peaks = decode_watched(as_dtype(model, dtype).to(latents.device), latents.to(dtype))
    nonfinite = int((~torch.isfinite(img)).any(1).sum())
    return img, peaks, nonfinite, torch.nan_to_num(img, nan=-1.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB between two [-1, 1] images as [0, 1] ones (100 when equal)."""
    mse = float(((a.float() - b.float()) / 2).square().mean())
    return 10 * math.log10(1.0 / mse) if mse > 0 else 100.0


@torch.no_grad()
def encode_latents(model: torch.nn.Module, patches: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The encoder's posterior means of ``patches`` (n, 3, P, P) in [-1, 1], in fp32, on the CPU."""
    m = as_dtype(model, torch.float32).to(device)
    return m.encode(patches.to(device, torch.float32)).latent_dist.mode().cpu()


@torch.no_grad()
def latent_statistics(model: torch.nn.Module, patches: torch.Tensor, device: torch.device | str = "cpu",
                      seed: int = 0, per_channel: bool = False) -> dict:
    """Mean and standard deviation of the encoder's posterior samples of ``patches`` (m, 3, P, P) in
    [-1, 1], over all values, as latent diffusion's scale-factor recipe takes them (scale = 1/std).
    Returns {"mean", "std", "patches", "values"}, and with ``per_channel`` "channel_mean" and
    "channel_std" (lists, one value per latent channel)."""
    device = torch.device(device)
    m = as_dtype(model, torch.float32).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    zs = [m.encode(chunk.to(device, torch.float32)).latent_dist.sample(gen).float().cpu() for chunk in patches.split(4)]
    z = torch.cat(zs)
    out = {"mean": float(z.mean()), "std": float(z.std()), "patches": int(patches.shape[0]), "values": z.numel()}
    if per_channel:
        per = z.transpose(0, 1).reshape(z.shape[1], -1)
        out.update(channel_mean=per.mean(1).tolist(), channel_std=per.std(1).tolist())
    return out


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
        patches, held_out = preview_patches(data, count, seed=seed), bool(data.summary().get("val_images"))
        train = next(iter(data.train_batches(train_count, start_batch=0, num_workers=0)))
    # cropped for ``device`` once, here: the export decodes exactly these, so its figures compare with the base's
    patches = probe_patches(patches.detach().to("cpu", torch.float32), device)
    train = stats_patches(train.detach().to("cpu", torch.float32), device)
    model = base.model if hasattr(base, "model") else base
    z = encode_latents(model, patches, device)
    report = half_precision_report(model, z, device)
    return ExportProbe(patches=patches, held_out=held_out, base_decoded=report.pop("fp32_decoded"), base_report=report,
                       train_patches=train, base_latents=latent_statistics(model, train, device, seed), base_z=z)


def latent_drift(z: torch.Tensor, base_z: torch.Tensor) -> float:
    """How far latents moved from the base encoder's: RMS of the change over the base latents' std."""
    return float((z.float() - base_z.float()).square().mean().sqrt() / base_z.float().std().clamp_min(1e-12))


def _peak(fig: dict) -> tuple[str, float]:
    return max(fig["max_activation"].items(), key=lambda kv: kv[1], default=("-", 0.0))


def format_peak(value: float) -> str:
    """An activation for people: 3 significant digits, or "overflow" for inf."""
    return "overflow" if value == float("inf") else f"{value:.3g}"


def figures_line(name: str, fig: dict, pixels: int, against_base: bool = False) -> str:
    """One line of the export report. ``against_base``: also the PSNR against the base's fp32 decode (what
    the fp16-fix settings aim at; an ordinary fine-tune differs from the base by design)."""
    block, top = _peak(fig)
    verdict = "safe" if fig["safe"] else "UNSAFE"
    line = (f"{name}: {verdict}: {fig['nonfinite_pixels']} of {pixels} pixels NaN/inf, {fig['saturated_pixels']} "
            f"pushed past black/white; largest activation {format_peak(top)} ({block})")
    if "limit_used" in fig and fig["limit_used"] != float("inf"):
        line += f", {100 * fig['limit_used']:.2g}% of fp16's limit"
    if "psnr" in fig:
        line += f"; PSNR {fig['psnr']:.1f} dB against its own fp32 decode"
    if against_base and "psnr_vs_base" in fig:
        line += f", {fig['psnr_vs_base']:.1f} dB against the base's"
    return line


def _round_figures(fig: dict) -> dict:
    out = {k: v for k, v in fig.items() if k != "max_activation"}
    out["max_activation"] = {k: float(f"{v:.4g}") if v != float("inf") else v for k, v in fig["max_activation"].items()}
    for k in ("max_abs_error", "limit_used", "psnr", "psnr_vs_base"):
        if k in out and out[k] != float("inf"):
            out[k] = float(f"{out[k]:.4g}")
    return out


def check_half_precision(model: torch.nn.Module, probe: ExportProbe,
                         device: torch.device | str = "cpu") -> tuple[dict, list[str], list[str]]:
    """Decode the probe with ``model`` (the exported weights, see exported_model) in fp16 and bf16.

    Returns (summary for the report and metadata, warnings, notes). Warns when the fine-tuned
    decoder overflows or saturates in a half precision where the base decoder did not."""
    x = probe.patches
    z = encode_latents(model, x, device)
    fine = half_precision_report(model, z, device, reference=probe.base_decoded)
    fine.pop("fp32_decoded")
    base = probe.base_report
    summary = {"patches": f"{x.shape[0]} {'held-out' if probe.held_out else 'training'} patches of "
                          f"{x.shape[-1]}x{x.shape[-2]}",
               "pixels": fine["pixels"],
               "fine_tuned": {k: _round_figures(fine[k]) for k in HALF},
               "base": {k: _round_figures(base[k]) for k in HALF if k in base}}
    if probe.base_z is not None and probe.base_z.shape == z.shape:
        summary["latent_drift"] = float(f"{latent_drift(z, probe.base_z):.4g}")
    warnings, notes = [], []
    for name in HALF:
        if fine[name]["safe"]:
            continue
        block, top = _peak(fine[name])
        what = (f"{fine[name]['nonfinite_pixels']} of {fine['pixels']} probe pixels NaN/inf, "
                f"{fine[name]['saturated_pixels']} pushed past black/white; largest activation {format_peak(top)} in {block}")
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


def half_precision_check(vaes: dict[str, torch.nn.Module], patches: torch.Tensor,
                         device: torch.device | str = "cpu") -> dict:
    """{name: {"patches", "pixels", "fp16", "bf16"}}: :func:`half_precision_report` of each VAE on its own
    encoder's latents of ``patches`` (cropped as :func:`probe_patches` does), PSNR against the first VAE's
    fp32 decode (``eval --half``: check a VAE before training or after)."""
    x = probe_patches(patches.detach().to("cpu", torch.float32), device)
    out, reference = {}, None
    for name, model in vaes.items():
        rep = half_precision_report(model, encode_latents(model, x, device), device, reference=reference)
        decoded = rep.pop("fp32_decoded")
        reference = decoded if reference is None else reference
        out[name] = {"patches": f"{x.shape[0]} of {x.shape[-1]}x{x.shape[-2]}", "pixels": rep["pixels"],
                     **{k: _round_figures(rep[k]) for k in HALF}}
    return out


def latent_scaling(trained, model: torch.nn.Module, probe: ExportProbe | None,
                   family: str = "auto", device: torch.device | str = "cpu") -> dict:
    """How the exported VAE's latents are scaled for a diffusion model, as its VAE family says (see
    ``Family.latents``) for ``trained`` (a :class:`training.trained.Trained`): {"family", "why", "source"}
    and either "scaling_factor" / "shift_factor" (kl-f8) or per-channel "latents_mean" / "latents_std"
    (Wan 2.1, Flux.2). ``family``: a latent family the VAE's family knows (``families.LATENT_CHOICES``) or "auto"."""
    if family not in LATENT_CHOICES:
        raise VAEFTError(f"family must be one of {', '.join(LATENT_CHOICES)}; got {family!r}")
    return trained.layout.family.latents(trained, model, probe, family, device, measure=latent_statistics)
