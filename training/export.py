"""Write a fine-tuned VAE: an ldm-keyed safetensors file that stock loaders accept, or a diffusers folder.

The ldm file has the base file's key set and shapes (ComfyUI's Load VAE and Automatic1111's
strict ``load_state_dict`` rely on them; attention stored as matrices is written in the 1x1-conv
form they accept), each tensor by default in the base file's dtype, so the untrained ones are
byte-identical to the base (checked against its bytes). Every export decodes probe patches in
fp16 and bf16 (:func:`check_half_precision`), records private metadata (:func:`build_metadata`)
and the latent factors (:func:`latent_scaling`), and returns an :class:`ExportReport`. Writes
are atomic (:mod:`training.files`): a crash, a full disk or a racing writer never leaves a
half-written model, and an existing one is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import __version__
from .config import EXPORT_DTYPES, TrainConfig
from .errors import VAEFTError
from .files import atomic_write, atomic_write_dir
from .options import to_metadata
from .trainer import TRAINABLE_PREFIXES, TrainResult, check_frozen
from .vae import LdmLayout, _is_attention_weight, config_from_ldm, ldm_to_diffusers, model_to_ldm, tensor_sha256

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def safe_name(name: str) -> str:
    """A file-name stem that cannot leave its folder: only letters, digits, '-', '_', '.'.

    Rejects (rather than silently rewrites) names that try to climb out of the folder.
    """
    raw = name.strip()
    if not raw:
        raise VAEFTError("the save name is empty; give a name such as 'fundus'")
    if "/" in raw or "\\" in raw or raw.startswith(".") or ".." in raw or os.path.isabs(raw):
        raise VAEFTError(f"save name {name!r} must be a plain file name without folders, '..' or a leading '.'")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    stem = re.sub(r"\.safetensors$", "", stem)
    if not stem.strip("._-"):
        raise VAEFTError(f"save name {name!r} has no usable characters")
    return stem[:120]


def export_filename(name: str, steps: int) -> str:
    """``vae-ft-<name>-<steps>.safetensors``."""
    stem = safe_name(name)
    if stem.startswith("vae-ft-"):
        stem = stem[len("vae-ft-"):].strip("._-")
    return f"vae-ft-{stem}-{steps}.safetensors" if stem else f"vae-ft-{steps}.safetensors"


def build_metadata(result: TrainResult, dataset_summary: dict | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """The file's ``vaeft.*`` metadata: what was trained, from what, how. Private: no value holds
    an absolute path (folders appear by name, image lists as counts and a hash)."""
    cfg: TrainConfig = result.config
    recipe = cfg.recipe_label()
    meta = {
        "vaeft.version": __version__,
        "vaeft.recipe": recipe,
        "vaeft.steps": str(result.steps_done),
        "vaeft.precision": result.precision or "unknown",
        "vaeft.stopped_early": str(result.stopped_early),
        "vaeft.weights": ("best-" if result.best_step is not None else "") + ("ema" if result.used_ema else "final"),
        "vaeft.base_sha256": result.layout.base_sha256,
        "vaeft.base_name": _last_component(result.layout.base_name),
        "vaeft.latent_channels": str(result.model.config.latent_channels),
        "vaeft.train_seconds": f"{result.seconds:.1f}",
        **to_metadata(cfg, "vaeft.config"),
    }
    if result.history:
        last = result.history[-1]
        meta["vaeft.final_losses"] = json.dumps({k: round(v, 6) for k, v in last.items() if k not in ("step",)})
    if result.best_step is not None:  # export_best: the weights are this step's, not the last one's
        meta["vaeft.best_step"] = str(result.best_step)
        scores = [h for h in result.history if h["step"] == result.best_step and any(k.startswith("val_") for k in h)]
        if scores:
            meta["vaeft.best_validation"] = json.dumps({k: round(v, 6) for k, v in scores[-1].items()
                                                        if k.startswith("val_")})
    dataset_summary = dataset_summary if dataset_summary is not None else result.dataset_summary
    if dataset_summary is not None:
        meta["vaeft.dataset"] = json.dumps(dataset_digest(dataset_summary))
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return {k: private_value(v) for k, v in meta.items()}


# Absolute paths as they appear in text: POSIX (/a/b), home (~/a), Windows (C:\a, C:/a) and UNC (\\host\a),
# each starting a value or following a space, quote, bracket, '=', ':' or ','.
_ABS_PATH = re.compile(r"""(?:^|(?<=[\s'"(\[=:,]))(?:/|~[\\/]|[A-Za-z]:[\\/]|\\\\)[^\s'"()\[\],;]+""")


def _last_component(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path) if p and not re.fullmatch(r"[A-Za-z]:", p)]
    return parts[-1] if parts else ""


def strip_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (a folder or file name):
    metadata travels with a file people share, and must not reveal the user's directory layout."""
    return _ABS_PATH.sub(lambda m: _last_component(m.group(0)) or "…", text)


def private_value(value: str) -> str:
    """A metadata value without absolute paths: a value that is one path (a setting such as
    lpips_backbone, spaces and all) becomes its last component; paths inside text, see strip_paths."""
    if _ABS_PATH.match(value) and "\n" not in value:
        return _last_component(value)
    return strip_paths(value)


def dataset_digest(summary: dict) -> dict:
    """What the metadata says about the training data: the folder's name, counts, the patch setup,
    and ``files_sha256``, a hash of the relative file names (train and validation lists), which
    identifies the image set without listing (possibly private) names. Nothing else of the
    summary is kept; see PatchDataset.summary() for its keys."""
    out: dict = {}
    source = summary.get("source")
    if isinstance(source, str):
        out["folder"] = _last_component(source) if _ABS_PATH.match(source) or os.sep in source else source
    for key, count_of in (("images", "images_used"), ("skipped", "images_skipped"), ("notes", "notes")):
        if isinstance(summary.get(count_of), list):
            out[key] = len(summary[count_of])
    for key in ("train_images", "val_images", "patch_size", "sampling", "masking", "patches_per_epoch",
                "mean_foreground", "bit_depth", "seed"):
        if key in summary:
            out[key] = summary[key]
    if isinstance(out.get("masking"), str):  # "mask folder /abs/masks (...)": the folder by name only
        out["masking"] = re.sub(r"^mask folder (.+?) \(", lambda m: f"mask folder {_last_component(m.group(1))} (",
                                out["masking"])
    lists = {k: summary[k] for k in ("train_paths", "val_paths") if isinstance(summary.get(k), list)}
    if not lists and isinstance(summary.get("images_used"), list):
        lists = {"images_used": summary["images_used"]}
    if lists:
        out["files_sha256"] = hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(
        dtype, str(dtype).replace("torch.", ""))


def export_dtypes(layout: LdmLayout, dtype: str = "base") -> dict[str, torch.dtype]:
    """ldm key -> the dtype it is written in: the base file's own per tensor ('base'), or one for all."""
    if dtype not in EXPORT_DTYPES:
        raise VAEFTError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype!r}")
    if dtype != "base":
        return {k: DTYPES[dtype] for k in layout.shapes}
    # a layout without recorded dtypes (built by hand) has fp32 weights: build_vae upcasts to fp32
    return {k: layout.dtypes.get(k, torch.float32) for k in layout.shapes}


def frozen_keys(result: TrainResult) -> list[str]:
    """ldm keys the run did not train (encoder and quant_conv in decoder mode; none in full mode).
    ldm and diffusers names share their first component, so the trainer's prefixes apply."""
    trained = TRAINABLE_PREFIXES[result.config.trainable]
    return [k for k in result.layout.shapes if not k.startswith(trained)]


def check_frozen_against_base(result: TrainResult, fp32: dict[str, torch.Tensor]) -> None:
    """Raise unless every untrained tensor, stored in the base file's dtype, has the base file's
    exact bytes (compared with the per-tensor hashes taken when the base was loaded)."""
    check_frozen(result)  # the fp32 model against the fp32 copy training started from
    layout = result.layout
    changed = []
    for k in frozen_keys(result):
        want, dtype = layout.tensor_sha256.get(k), layout.dtypes.get(k)
        if want is None or dtype is None or dtype == torch.float64:
            continue  # nothing recorded, or a float64 base the fp32 model cannot hold exactly
        if tensor_sha256(fp32[k].to(dtype)) != want:
            changed.append(k)
    if changed:
        raise VAEFTError(f"internal check failed: untrained tensors differ from the base file "
                         f"({', '.join(changed[:5])}); refusing to export")


def ldm_state_dict(result: TrainResult, dtype: str = "base") -> dict[str, torch.Tensor]:
    """Trained weights under the base's exact ldm keys and shapes, each tensor in the base file's
    dtype (``dtype='base'``) or cast to ``dtype`` ('fp16', 'bf16', 'fp32'), contiguous on the CPU."""
    return _export_tensors(result, dtype)[0]


def matrix_attention_keys(layout: LdmLayout) -> list[str]:
    """Attention q/k/v/proj_out weights the base stores as (C, C) matrices rather than ldm's
    (C, C, 1, 1) convolutions (some converters write that; Automatic1111 and ComfyUI reject it)."""
    return [k for k, shape in layout.shapes.items() if _is_attention_weight(k) and len(shape) == 2]


def _export_tensors(result: TrainResult, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(exported tensors, the same in fp32) after checking the untrained ones against the base.
    Attention weights are always written as 1x1 convolutions, the form every stock loader takes."""
    dtypes = export_dtypes(result.layout, dtype)
    fp32 = {k: v.detach().to("cpu", torch.float32) for k, v in model_to_ldm(result.model, result.layout).items()}
    check_frozen_against_base(result, fp32)  # the hashes ignore shape: a matrix and its 1x1 conv hash alike
    for k in matrix_attention_keys(result.layout):
        fp32[k] = fp32[k][:, :, None, None]
    return {k: v.to(dtypes[k]).contiguous() for k, v in fp32.items()}, fp32


def frozen_rounding(result: TrainResult, tensors: dict[str, torch.Tensor],
                    fp32: dict[str, torch.Tensor]) -> str | None:
    """A warning when the export changes untrained tensors' values (a narrower dtype than the base's),
    else None. The encoder then no longer gives the base's latents exactly."""
    rounded, worst = [], 0.0
    for k in frozen_keys(result):
        diff = (tensors[k].float() - fp32[k]).abs().max().item() if fp32[k].numel() else 0.0
        if diff > 0:
            rounded.append(k)
            worst = max(worst, diff)
    if not rounded:
        return None
    stored = sorted({_dtype_name(tensors[k].dtype) for k in rounded})
    return (f"{'/'.join(stored)} export rounds {len(rounded)} of {len(frozen_keys(result))} untrained tensors "
            f"(the base file stores them in another dtype; largest change {worst:.2g}): the encoder is no longer "
            "bit-identical to the base, so latents move slightly. Export with dtype 'base' to keep it exact.")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None, overwrite: bool = False) -> str:
    """Atomically write ``tensors`` to ``path`` (see :func:`training.files.atomic_write`); never
    clobbers unless ``overwrite``. Refuses tensors holding NaN or infinity, naming them."""
    from safetensors.torch import save

    check_finite(tensors)
    return atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)), overwrite=overwrite,
                        what="VAE file")


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise VAEFTError naming the floating-point tensors that hold NaN or infinity.

    Such a file decodes to black or NaN images in every loader; a cast can cause it too (fp32
    values beyond fp16's ±65504 become infinite in an fp16 export)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        dtypes = sorted({str(tensors[k].dtype).replace("torch.", "") for k in bad})
        raise VAEFTError(
            f"refusing to write: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}; stored as {', '.join(dtypes)}). If training diverged, lower lr "
            "or raise grad_clip and train again; if only this dtype overflows, export as bf16 or fp32.")


# ----- half precision: does the exported decoder survive fp16 / bf16, as ComfyUI and A1111 often run it? -----

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504: anything larger becomes inf in fp16
_SATURATION_GAP = 0.1  # [-1, 1] units (~13 8-bit levels): rounding noise stays below it, breakage does not


@dataclass
class ExportProbe:
    """Patches the export decodes to check half precision, with the base VAE's figures on them.

    Made by :func:`make_probe` after training (the CLI and the fine-tune node do it) and kept on
    ``TrainResult.export_probe``, so the Save node needs nothing but the trained result.
    """

    patches: torch.Tensor   # (n, 3, h, w) in [-1, 1], fp32, CPU, as decoded (see probe_patches)
    held_out: bool          # True: validation images' patches; False: training patches (no validation split)
    base_report: dict       # half_precision_report of the base VAE on the base encoder's latents of ``patches``
    train_patches: torch.Tensor | None = None  # (m, 3, h, w) training patches for the latent statistics
    base_latents: dict | None = None           # latent_statistics of the base encoder on ``train_patches``


def probe_patches(patches: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The patches the check decodes on ``device``: fp16 convolutions on a CPU are slow (a full SD
    decoder takes minutes per 256² patch), so on a CPU at most 2 patches, centre-cropped to 64²."""
    if torch.device(device).type == "cpu":
        n, side = 2, 64
    else:
        n, side = 4, 256
    x = patches[:n]
    h, w = x.shape[-2:]
    th, tw = min(h, side) // 8 * 8, min(w, side) // 8 * 8
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw].contiguous()


def _as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

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


def stats_patches(patches: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The training patches the latent statistics are taken on: all of them (up to 16) on a GPU; on a
    CPU 4, centre-cropped to 128² (a full SD encoder takes seconds per 256² patch there)."""
    n, side = (4, 128) if torch.device(device).type == "cpu" else (16, 1 << 30)
    x = patches[:n]
    h, w = x.shape[-2:]
    th, tw = min(h, side) // 8 * 8, min(w, side) // 8 * 8
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw].contiguous()


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


def _figures_line(name: str, fig: dict, pixels: int) -> str:
    block, top = _peak(fig)
    verdict = "safe" if fig["safe"] else "UNSAFE"
    line = (f"{name}: {verdict}: {fig['nonfinite_pixels']} of {pixels} pixels NaN/inf, {fig['saturated_pixels']} "
            f"pushed past black/white; largest activation {_fmt(top)} ({block})")
    if "limit_used" in fig and fig["limit_used"] != float("inf"):
        line += f", {100 * fig['limit_used']:.2g}% of fp16's limit"
    return line


def _json_safe(obj):
    """inf/NaN as strings: metadata is strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else ("overflow" if obj == obj else "nan")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def _round_figures(fig: dict) -> dict:
    out = {k: v for k, v in fig.items() if k != "max_activation"}
    out["max_activation"] = {k: float(f"{v:.4g}") if v != float("inf") else v for k, v in fig["max_activation"].items()}
    for k in ("max_abs_error", "limit_used"):
        if k in out and out[k] != float("inf"):
            out[k] = float(f"{out[k]:.4g}")
    return out


def exported_model(result: TrainResult, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An AutoencoderKL (fp32, CPU) holding exactly the exported weights (``tensors``, ldm keys)."""
    import copy

    model = copy.deepcopy(result.model).cpu()
    model.load_state_dict({k: v.float() for k, v in ldm_to_diffusers(tensors).items()}, strict=True)
    return model.eval()


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


# ----- latent scaling: what a diffusion pipeline multiplies latents by -----

FAMILIES = {  # the published factors (diffusers' configs; ComfyUI's latent_formats.py)
    "sd": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None, "what": "SD 1.x/2.x"},
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None, "what": "SDXL"},
    "sd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "what": "SD3/3.5"},
    "flux": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "what": "Flux.1"},
}
FAMILY_CHOICES = ("auto",) + tuple(FAMILIES)
FORMATS = ("safetensors", "diffusers")
# Base file names that say their family (the 4-channel families share one architecture, so the name
# is the better witness there; the 16-channel ones differ 4x in latent scale, the statistics decide).
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
    name = _last_component(base_name).lower()
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


def latent_scaling(result: TrainResult, model: torch.nn.Module, probe: ExportProbe | None,
                   family: str = "auto", device: torch.device | str = "cpu") -> dict:
    """{"family", "why", "scaling_factor", "shift_factor", "source"} for the exported VAE.

    Decoder-only: the latent space is the base's, so the family's published factors. Full
    (encoder trained): re-estimated on the probe's training patches with the exported encoder, as
    latent diffusion's recipe does (scaling = 1/std of the latents; for 16-channel VAEs also shift =
    their mean, and scaling = 1/std around it)."""
    if family not in FAMILY_CHOICES:
        raise VAEFTError(f"family must be one of {', '.join(FAMILY_CHOICES)}; got {family!r}")
    channels = int(result.model.config.latent_channels)
    stats = probe.base_latents if probe is not None else None
    if family == "auto":
        family, why = pick_family(result.layout.base_name, channels, stats)
    else:
        why = "as given"
        if FAMILIES[family]["latent_channels"] != channels:
            raise VAEFTError(f"family {family!r} has {FAMILIES[family]['latent_channels']} latent channels, this VAE "
                             f"{channels}; choose one of " + ", ".join(f for f, v in FAMILIES.items()
                                                                      if v["latent_channels"] == channels))
    out = {"family": family, "why": why, "scaling_factor": FAMILIES[family]["scaling_factor"],
           "shift_factor": FAMILIES[family]["shift_factor"],
           "source": f"{FAMILIES[family]['what']}'s published factors (decoder-only: the latent space is the base's)"}
    if result.config.trainable == "full":
        if probe is None or probe.train_patches is None:
            out["source"] = (f"{FAMILIES[family]['what']}'s published factors: NOT re-estimated (no training "
                             "patches), though the encoder was trained")
            return out
        new = latent_statistics(model, probe.train_patches, device, seed=result.config.seed)
        shift = new["mean"] if channels == 16 else None
        out.update(scaling_factor=float(f"{1 / new['std']:.5g}"),
                   shift_factor=float(f"{shift:.5g}") if shift is not None else None,
                   source=f"re-estimated on {new['patches']} training patches with the trained encoder "
                          f"(1/std{' and mean' if shift is not None else ''} of {new['values']} latent values)")
    return out


@dataclass
class ExportReport:
    """What an export wrote and what the user should know about it (the CLI prints :meth:`text`,
    the Save node shows it)."""

    path: str
    format: str                     # 'safetensors' (one ldm-keyed file) or 'diffusers' (a model folder)
    dtype: str                      # as requested: 'base', 'fp16', 'bf16' or 'fp32'
    stored_dtypes: dict[str, int]   # dtype name -> number of tensors written in it
    frozen: str | None              # untrained tensors vs the base file: 'identical' (byte for byte),
                                    # 'widened' (values exact, wider dtype), 'rounded'; None in full mode
    metadata: dict[str, str]
    scaling: dict = field(default_factory=dict)  # see latent_scaling
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    half_precision: dict | None = None  # see check_half_precision; None: not checked (no probe)

    @property
    def fp16_safe(self) -> bool | None:
        return None if self.half_precision is None else self.half_precision["fine_tuned"]["fp16"]["safe"]

    @property
    def frozen_identical(self) -> bool | None:
        return None if self.frozen is None else self.frozen == "identical"

    def text(self) -> str:
        lines = [f"saved {self.path}" + (" (diffusers model folder)" if self.format == "diffusers" else ""),
                 "dtype: " + (f"base ({_counts(self.stored_dtypes)})" if self.dtype == "base" else self.dtype)]
        if self.frozen is not None:
            lines.append("untrained tensors (encoder, quant_conv): " + {
                "identical": "bit-identical to the base file", "widened": "values exact, stored wider",
                "rounded": "ROUNDED (see the warning)"}[self.frozen])
        sc = self.scaling
        if sc:
            shift = f", shift_factor {sc['shift_factor']}" if sc["shift_factor"] is not None else ""
            lines.append(f"latent scaling: scaling_factor {sc['scaling_factor']}{shift}: {sc['source']}; "
                         f"family {sc['family']} ({sc['why']})")
        hp = self.half_precision
        if hp is not None:
            lines.append(f"half precision, decoding {hp['patches']} with the exported weights:")
            for name in HALF:
                lines.append("  " + _figures_line(name, hp["fine_tuned"][name], hp["pixels"]))
                if name in hp["base"]:
                    lines.append("  " + _figures_line(f"{name} (base)", hp["base"][name], hp["pixels"]))
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def export_vae(result: TrainResult, path: str | os.PathLike, dtype: str | None = None,
               dataset_summary: dict | None = None, overwrite: bool = False,
               extra_metadata: dict[str, str] | None = None, probe: ExportProbe | None = None,
               device: torch.device | str = "cpu", format: str = "safetensors", family: str = "auto"
               ) -> ExportReport:
    """Write ``result`` and return what was written.

    format 'safetensors': one ldm-keyed file at ``path`` (the base's keys; loads in ComfyUI's Load VAE,
    Automatic1111, diffusers' from_single_file). 'diffusers': a model folder at ``path`` with
    config.json and diffusion_pytorch_model.safetensors (``AutoencoderKL.from_pretrained(path)``).
    dtype: default the config's ``export_dtype``; 'base' = the base file's dtype per tensor.
    probe: default ``result.export_probe``: patches decoded with the exported weights in fp16 and
    bf16 on ``device`` (the half-precision check), and training patches for the latent scaling;
    without one the check is skipped, and said so.
    family: the latent family whose scaling_factor/shift_factor go in the metadata and config.json
    ('auto': see pick_family); with trainable = 'full' they are re-estimated instead."""
    if format not in FORMATS:
        raise VAEFTError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    dtype = dtype or result.config.export_dtype
    tensors, fp32 = _export_tensors(result, dtype)
    check_finite(tensors)  # before the checks below spend time on a model that cannot be written
    report = ExportReport(path=os.fspath(path), format=format, dtype=dtype, metadata={},
                          stored_dtypes=dict(Counter(_dtype_name(v.dtype) for v in tensors.values())),
                          frozen=None)
    frozen = frozen_keys(result)
    if frozen:
        rounding = frozen_rounding(result, tensors, fp32)
        base = export_dtypes(result.layout, "base")
        widened = sorted({_dtype_name(base[k]) for k in frozen if tensors[k].dtype != base[k]})
        report.frozen = "rounded" if rounding else "widened" if widened else "identical"
        if rounding:
            report.warnings.append(rounding)
        elif widened:
            report.notes.append(f"untrained tensors are stored as {dtype} where the base file has "
                                f"{'/'.join(widened)}: values exact, bytes not (dtype 'base' keeps them identical)")
    converted = matrix_attention_keys(result.layout)
    if converted:
        report.notes.append(f"the base stores {len(converted)} attention weights as matrices; they are written as "
                            "1x1 convolutions (same values), the form Automatic1111 and ComfyUI load")
    probe = probe if probe is not None else getattr(result, "export_probe", None)
    model = exported_model(result, tensors)
    if probe is not None:
        report.half_precision, warnings, notes = check_half_precision(model, probe, device)
        report.warnings += warnings
        report.notes += notes
    else:
        report.notes.append("half precision not checked: no probe patches (make_probe after training)")
    report.scaling = latent_scaling(result, model, probe, family, device)
    meta = build_metadata(result, dataset_summary, extra_metadata)
    meta["vaeft.fp16_safe"] = "unchecked" if report.fp16_safe is None else str(report.fp16_safe).lower()
    if report.half_precision is not None:
        meta["vaeft.half_precision"] = json.dumps(_json_safe(report.half_precision))
    meta["vaeft.dtype"] = dtype
    meta["vaeft.attention_form"] = ("1x1 conv (converted from the base's matrices)" if converted else "1x1 conv")
    meta["vaeft.stored_dtypes"] = json.dumps(report.stored_dtypes, sort_keys=True)
    if report.frozen_identical is not None:
        meta["vaeft.frozen_identical"] = str(report.frozen_identical).lower()
    meta["vaeft.latent_family"] = report.scaling["family"]
    meta["vaeft.scaling_factor"] = str(report.scaling["scaling_factor"])
    if report.scaling["shift_factor"] is not None:
        meta["vaeft.shift_factor"] = str(report.scaling["shift_factor"])
    meta["vaeft.scaling_source"] = report.scaling["source"]
    meta = {k: private_value(v) for k, v in meta.items()}
    report.metadata = meta
    if format == "diffusers":
        write_diffusers(tensors, path, meta, report.scaling, overwrite=overwrite)
    else:
        write_safetensors(tensors, path, meta, overwrite=overwrite)
    return report


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_config(tensors: dict[str, torch.Tensor], scaling: dict) -> dict:
    """The ``AutoencoderKL`` config of ldm-keyed ``tensors`` with the latent factors of ``scaling``."""
    config = config_from_ldm(tensors)
    config.update(scaling_factor=scaling["scaling_factor"], shift_factor=scaling["shift_factor"])
    return config


def write_diffusers(tensors: dict[str, torch.Tensor], folder: str | os.PathLike, metadata: dict[str, str],
                    scaling: dict, overwrite: bool = False) -> str:
    """Atomically write a diffusers model folder: config.json (written by diffusers' own
    ``save_config``) and diffusion_pytorch_model.safetensors (diffusers keys, Linear attention,
    each tensor in the dtype it has in ``tensors``). Refuses NaN/inf tensors like write_safetensors."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save

    check_finite(tensors)
    config = diffusers_config(tensors, scaling)
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    weights = {k: v.contiguous() for k, v in ldm_to_diffusers(tensors).items()}
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:  # cannot happen for a layout build_vae accepted; never write a folder that fails to load
        raise VAEFTError(f"internal check failed: diffusers keys do not match (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    meta = {"format": "pt", **metadata}  # 'format' is what diffusers/transformers' own writer puts there

    def write(tmp):
        model.save_config(tmp)
        with open(os.path.join(tmp, DIFFUSERS_WEIGHTS), "wb") as f:
            f.write(save(weights, metadata=meta))

    return atomic_write_dir(folder, write, overwrite=overwrite, what="diffusers model folder")
