"""Write a fine-tuned VAE as an ldm-keyed safetensors file that stock loaders accept.

The key set and shapes are the base file's exactly (ComfyUI's Load VAE and
Automatic1111's strict ``load_state_dict`` both rely on them). The write is atomic
(:mod:`training.files`): a crash, a full disk or a racing writer never leaves a
half-written model, and an existing file is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import __version__
from .config import EXPORT_DTYPES, TrainConfig
from .errors import VAEFTError
from .files import atomic_write
from .options import to_metadata
from .trainer import TRAINABLE_PREFIXES, TrainResult, check_frozen
from .vae import LdmLayout, model_to_ldm, tensor_sha256

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


def _export_tensors(result: TrainResult, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(exported tensors, the same in fp32) after checking the untrained ones against the base."""
    dtypes = export_dtypes(result.layout, dtype)
    fp32 = {k: v.detach().to("cpu", torch.float32) for k, v in model_to_ldm(result.model, result.layout).items()}
    check_frozen_against_base(result, fp32)
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
            f"(the base file stores them in higher precision; largest change {worst:.2g}): the encoder is no longer "
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


@dataclass
class ExportReport:
    """What an export wrote and what the user should know about it (the CLI prints :meth:`text`,
    the Save node shows it)."""

    path: str
    dtype: str                      # as requested: 'base', 'fp16', 'bf16' or 'fp32'
    stored_dtypes: dict[str, int]   # dtype name -> number of tensors written in it
    frozen: str | None              # untrained tensors vs the base file: 'identical' (byte for byte),
                                    # 'widened' (values exact, wider dtype), 'rounded'; None in full mode
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def frozen_identical(self) -> bool | None:
        return None if self.frozen is None else self.frozen == "identical"

    def text(self) -> str:
        lines = [f"saved {self.path}",
                 "dtype: " + (f"base ({_counts(self.stored_dtypes)})" if self.dtype == "base" else self.dtype)]
        if self.frozen is not None:
            lines.append("untrained tensors (encoder, quant_conv): " + {
                "identical": "bit-identical to the base file", "widened": "values exact, stored wider",
                "rounded": "ROUNDED (see the warning)"}[self.frozen])
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def export_vae(result: TrainResult, path: str | os.PathLike, dtype: str | None = None,
               dataset_summary: dict | None = None, overwrite: bool = False,
               extra_metadata: dict[str, str] | None = None) -> ExportReport:
    """Write ``result`` as an ldm-keyed ``.safetensors`` (``dtype`` default: the config's
    ``export_dtype``, 'base' = the base file's dtype per tensor); returns what was written."""
    dtype = dtype or result.config.export_dtype
    tensors, fp32 = _export_tensors(result, dtype)
    report = ExportReport(path=os.fspath(path), dtype=dtype, metadata={},
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
    meta = build_metadata(result, dataset_summary, extra_metadata)
    meta["vaeft.dtype"] = dtype
    meta["vaeft.stored_dtypes"] = json.dumps(report.stored_dtypes, sort_keys=True)
    if report.frozen_identical is not None:
        meta["vaeft.frozen_identical"] = str(report.frozen_identical).lower()
    report.metadata = meta
    write_safetensors(tensors, path, meta, overwrite=overwrite)
    return report
