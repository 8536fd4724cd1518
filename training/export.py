"""Write a fine-tuned VAE as an ldm-keyed safetensors file that stock loaders accept.

The key set and shapes are the base file's exactly (ComfyUI's Load VAE and
Automatic1111's strict ``load_state_dict`` both rely on them). The write is atomic
(:mod:`training.files`): a crash, a full disk or a racing writer never leaves a
half-written model, and an existing file is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re

import torch

from . import __version__
from .config import TrainConfig
from .errors import VAEFTError
from .files import atomic_write
from .options import to_metadata
from .trainer import TrainResult, check_frozen
from .vae import model_to_ldm

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
    cfg: TrainConfig = result.config
    recipe = cfg.recipe_label()
    meta = {
        "vaeft.version": __version__,
        "vaeft.recipe": recipe,
        "vaeft.steps": str(result.steps_done),
        "vaeft.stopped_early": str(result.stopped_early),
        "vaeft.weights": ("best-" if result.best_step is not None else "") + ("ema" if result.used_ema else "final"),
        "vaeft.base_sha256": result.layout.base_sha256,
        "vaeft.base_name": result.layout.base_name,
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
        meta["vaeft.dataset"] = json.dumps(_dataset_digest(dataset_summary))
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return meta


def _dataset_digest(summary: dict) -> dict:
    """The dataset summary without long per-file lists (metadata lives in the file header)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, list):
            out[k] = len(v)
        else:
            out[k] = v
    return out


def ldm_state_dict(result: TrainResult, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """Trained weights under the base's exact ldm keys and shapes, cast to ``dtype``."""
    if dtype not in DTYPES:
        raise VAEFTError(f"export dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    check_frozen(result)
    sd = model_to_ldm(result.model, result.layout)
    return {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in sd.items()}


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


def export_vae(result: TrainResult, path: str | os.PathLike, dtype: str | None = None,
               dataset_summary: dict | None = None, overwrite: bool = False,
               extra_metadata: dict[str, str] | None = None) -> str:
    """Write ``result`` as an ldm-keyed ``.safetensors``; returns the path written."""
    dtype = dtype or result.config.export_dtype
    tensors = ldm_state_dict(result, dtype)
    meta = build_metadata(result, dataset_summary, extra_metadata)
    meta["vaeft.dtype"] = dtype
    return write_safetensors(tensors, path, meta, overwrite=overwrite)
