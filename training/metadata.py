"""What an exported file says about itself: the ``vaeft.*`` safetensors metadata, kept private.

Metadata travels with a file people share, so no value holds an absolute path (folders appear by
name, image lists as counts and a hash of the relative names).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING

from . import __version__
from .files import json_safe, last_component
from .alpha import STRAIGHT
from .families import has_family
from .options import to_metadata
from .vae import image_channels, latent_channels

if TYPE_CHECKING:
    from .trained import Trained  # for annotations only


def build_metadata(trained: Trained, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``vaeft.*`` metadata of what was trained, from what and how (the export adds what it
    wrote, see :func:`export_metadata`). Private: no value holds an absolute path."""
    cfg = trained.config
    channels = image_channels(trained.model) if has_family(trained.model) else 3
    meta = {
        "vaeft.version": __version__,
        "vaeft.recipe": cfg.recipe_label(),
        "vaeft.steps": str(trained.steps_done),
        "vaeft.precision": trained.precision or "unknown",
        "vaeft.stopped_early": str(trained.stopped_early),
        "vaeft.weights": trained.weights,
        "vaeft.base_sha256": trained.layout.base_sha256,
        "vaeft.base_name": last_component(trained.layout.base_name),
        "vaeft.vae_family": trained.layout.family.name,
        "vaeft.latent_channels": str(latent_channels(trained.model)),
        "vaeft.image_channels": str(channels),
        "vaeft.train_seconds": f"{trained.seconds:.1f}",
        **to_metadata(cfg, "vaeft.config"),
    }
    if channels == 4:  # what its pixels mean: the convention it was trained in
        meta["vaeft.alpha"] = (f"RGBA: {STRAIGHT}, in [-1, 1] like the colours, as ComfyUI's 4-channel IMAGE and "
                               "diffusers' RGBA pipelines (QwenImageLayeredPipeline) give it")
    if trained.history:
        last = trained.history[-1]
        meta["vaeft.final_losses"] = json.dumps(json_safe({k: round(v, 6) for k, v in last.items() if k != "step"}))
    if trained.best_step is not None:  # export_best: the weights are this step's, not the last one's
        meta["vaeft.best_step"] = str(trained.best_step)
        scores = [h for h in trained.history if h["step"] == trained.best_step and any(k.startswith("val_") for k in h)]
        if scores:
            meta["vaeft.best_validation"] = json.dumps(json_safe({k: round(v, 6) for k, v in scores[-1].items()
                                                                  if k.startswith("val_")}))
    if trained.fp16_fix is not None:  # the fp16-fix settings: rescaling, penalty, the safe stop
        meta["vaeft.fp16_fix"] = json.dumps(json_safe(trained.fp16_fix, infinity="overflow"))
    if trained.dataset is not None:
        meta["vaeft.dataset"] = json.dumps(dataset_digest(trained.dataset))
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return {k: private_value(v) for k, v in meta.items()}


def export_metadata(trained: Trained, report, extra: dict[str, str] | None = None) -> dict[str, str]:
    """:func:`build_metadata` plus what the export wrote and found (``report``: an
    :class:`training.export.ExportReport`): dtypes, attention form, whether the untrained tensors
    are the base's, the half-precision check, the latent scaling."""
    meta = build_metadata(trained, extra)
    meta["vaeft.fp16_safe"] = "unchecked" if report.fp16_safe is None else str(report.fp16_safe).lower()
    if report.fp16_vs_base_db is not None:  # how far the fp16 decode moved from the base's, next to the verdict
        meta["vaeft.fp16_vs_base_db"] = str(report.fp16_vs_base_db)
        if report.fp16_bound_db is not None:
            meta["vaeft.fp16_bound_db"] = f"{report.fp16_bound_db:g}"
    if report.half_precision is not None:
        meta["vaeft.half_precision"] = json.dumps(json_safe(report.half_precision, infinity="overflow"))
        if report.encoder_trained and "latent_drift" in report.half_precision:
            meta["vaeft.latent_drift"] = str(report.half_precision["latent_drift"])
    meta["vaeft.dtype"] = report.dtype
    meta["vaeft.attention_form"] = ("1x1 conv (converted from the base's matrices)" if report.converted_attention
                                    else "1x1 conv")
    meta["vaeft.stored_dtypes"] = json.dumps(report.stored_dtypes, sort_keys=True)
    if report.frozen_identical is not None:
        meta["vaeft.frozen_identical"] = str(report.frozen_identical).lower()
    sc = report.scaling
    meta["vaeft.latent_family"] = sc["family"]
    if "scaling_factor" in sc:
        meta["vaeft.scaling_factor"] = str(sc["scaling_factor"])
        if sc["shift_factor"] is not None:
            meta["vaeft.shift_factor"] = str(sc["shift_factor"])
    else:  # per-channel statistics (the Wan family)
        meta["vaeft.latents_mean"] = json.dumps(sc["latents_mean"])
        meta["vaeft.latents_std"] = json.dumps(sc["latents_std"])
    meta["vaeft.scaling_source"] = sc["source"]
    meta.update(trained.layout.family.extra_metadata)
    return {k: private_value(v) for k, v in meta.items()}


# Absolute paths as they appear in text: POSIX (/a/b), home (~/a), Windows (C:\a, C:/a) and UNC (\\host\a),
# each starting a value or following a space, quote, bracket, '=', ':' or ','.
_ABS_PATH = re.compile(r"""(?:^|(?<=[\s'"(\[=:,]))(?:/|~[\\/]|[A-Za-z]:[\\/]|\\\\)[^\s'"()\[\],;]+""")


def strip_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (a folder or file name):
    metadata travels with a file people share, and must not reveal the user's directory layout."""
    return _ABS_PATH.sub(lambda m: last_component(m.group(0)) or "…", text)


def private_value(value: str) -> str:
    """A metadata value without absolute paths: a value that is one path (a setting such as
    lpips_backbone, spaces and all) becomes its last component; paths inside text, see strip_paths."""
    if _ABS_PATH.match(value) and "\n" not in value:
        return last_component(value)
    return strip_paths(value)


def dataset_digest(summary: dict) -> dict:
    """What the metadata says about the training data: the folder's name, counts, the patch setup,
    and ``files_sha256``, a hash of the relative file names (train and validation lists), which
    identifies the image set without listing (possibly private) names. Nothing else of the
    summary is kept; see PatchDataset.summary() for its keys."""
    out: dict = {}
    source = summary.get("source")
    if isinstance(source, str):
        out["folder"] = last_component(source) if _ABS_PATH.match(source) or os.sep in source else source
    for key, count_of in (("images", "images_used"), ("skipped", "images_skipped"), ("notes", "notes")):
        if isinstance(summary.get(count_of), list):
            out[key] = len(summary[count_of])
    for key in ("train_images", "val_images", "patch_size", "sampling", "masking", "patches_per_epoch",
                "mean_foreground", "bit_depth", "seed", "image_channels", "alpha", "alpha_images"):
        if key in summary:
            out[key] = summary[key]
    if isinstance(out.get("masking"), str):  # "mask folder /abs/masks (...)": the folder by name only
        out["masking"] = re.sub(r"^mask folder (.+?) \(", lambda m: f"mask folder {last_component(m.group(1))} (",
                                out["masking"])
    lists = {k: summary[k] for k in ("train_paths", "val_paths") if isinstance(summary.get(k), list)}
    if not lists and isinstance(summary.get("images_used"), list):
        lists = {"images_used": summary["images_used"]}
    if lists:
        out["files_sha256"] = hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()
    return out
