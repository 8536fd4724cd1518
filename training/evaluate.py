"""Comparing VAEs on the same seeded patches: the one evaluation path of the ``eval`` command
(training/cli.py) and the Evaluate node: which patches (:func:`evaluation_patches`), scores and
comparison rows (:func:`compare`), tables, whole images in tiles.

Every VAE encodes and decodes the very same
patches. Patches of ``--data`` come from the held-out validation images of the split that
``fit`` makes with the same ``--seed`` and ``--val-fraction`` (so a fine-tuned VAE is judged
on images it was not trained on); when the folder has no validation split (fewer than 2
images, or val_fraction 0) they come from all images, and the JSON says so. ``--general``
is a folder of other images, none of them trained on, used whole to measure harm: metric
changes of each VAE relative to the first ``--vae`` (the base).

VAEs of RGBA images (4 image channels) are scored on RGBA patches (straight alpha; images without
transparency opaque), with the alpha counted as :mod:`training.metrics` says, and shown over a
checkerboard; VAEs of RGB and of RGBA images are not compared with each other (refused by name).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .alpha import on_checkerboard
from .data import build_dataset
from .device import model_place
from .errors import VAEFTError
from .imageio import signed_to_unit
from .metrics import evaluate_vaes, image_metrics
from .plot import image_grid
from .tiling import reconstruct_tiled, seam_error
from .families import has_family
from .vae import image_channels, reconstruct

# Metrics in tables and deltas: (key, label, higher is better?)
METRICS = (("psnr", "PSNR dB", True), ("ssim", "SSIM", True), ("lpips", "LPIPS", False),
           ("delta_e2000", "dE2000", False), ("shift_r", "shift R", None), ("shift_g", "shift G", None),
           ("shift_b", "shift B", None), ("alpha_psnr", "alpha PSNR dB", True))
# Data settings the eval command exposes (the rest keep DataConfig's defaults).
DATA_FLAGS = ("patch_size", "seed", "val_fraction", "foreground_threshold", "min_foreground", "mask_dir",
              "upscale_small", "recursive")


# ----------------------------------------------------------------------------- pictures

# An inferno-like colour ramp (black -> purple -> red -> orange -> pale yellow), RGB in [0, 1].
_HEAT = torch.tensor([
    [0.001, 0.000, 0.014], [0.087, 0.044, 0.224], [0.258, 0.039, 0.406], [0.416, 0.090, 0.433],
    [0.578, 0.148, 0.404], [0.735, 0.216, 0.330], [0.865, 0.317, 0.226], [0.955, 0.494, 0.098],
    [0.988, 0.998, 0.645]])


def heat_map(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] (clipped) -> (..., 3, H, W) RGB in [0, 1] through an inferno-like ramp."""
    v = values.float().clamp(0, 1) * (len(_HEAT) - 1)
    lo = v.floor().long().clamp(max=len(_HEAT) - 2)
    t = (v - lo.float()).unsqueeze(-1)
    lut = _HEAT.to(values.device)
    rgb = lut[lo] * (1 - t) + lut[lo + 1] * t  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def comparison_grid(original: torch.Tensor, recons: list[torch.Tensor], heat_max: float = 0.1,
                    gap: int = 0) -> torch.Tensor:
    """Rows of original | recon 1 | recon 2 | ... | error heat map, as one image.

    original: (B, C, H, W) or (C, H, W) in [-1, 1]; recons: same shape each, in [-1, 1]
    (clipped). The heat map shows |last recon − original| averaged over the channels (RGBA: alpha
    too) in [0, 1] units, black = 0 and pale yellow = ``heat_max`` or more (0.1 ≈ 26/255). RGBA
    images are shown over a grey checkerboard. ``gap`` px of white between cells.
    Returns (3, B·H + (B−1)·gap, (len(recons)+2)·W + (len(recons)+1)·gap) in [0, 1].
    """
    if not recons:
        raise VAEFTError("comparison_grid needs at least one reconstruction")
    if original.ndim == 3:
        original = original[None]
        recons = [r[None] if r.ndim == 3 else r for r in recons]
    for r in recons:
        if r.shape != original.shape:
            raise VAEFTError(f"reconstruction shape {tuple(r.shape)} differs from the original's "
                             f"{tuple(original.shape)}")
    if heat_max <= 0:
        raise VAEFTError(f"heat_max must be > 0, got {heat_max}")
    orig = signed_to_unit(original.detach().float().cpu())
    cells = [orig] + [signed_to_unit(r.detach().float().cpu()) for r in recons]
    err = (cells[-1] - orig).abs().mean(1) / heat_max
    cells = [on_checkerboard(c) for c in cells]
    cells.append(heat_map(err))
    return image_grid(torch.stack(cells, 1).flatten(0, 1), rows=orig.shape[0], pad=gap)


# ----------------------------------------------------------------------------- table

def _fmt(v: Any, key: str) -> str:
    if not isinstance(v, dict):
        return "-"
    if "mean" not in v:
        return "n/a"
    digits = {"psnr": 2, "alpha_psnr": 2, "ssim": 4, "lpips": 4, "delta_e2000": 3}.get(key, 2)
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


def format_table(results: dict) -> str:
    """Plain-text table of mean ± std per VAE and metric.

    results: the JSON object of :func:`run_eval` (sections "data" and "general") or the
    dict of :func:`training.metrics.evaluate_vaes` ({vae: {metric: {"mean", "std"}}}).
    Unavailable metrics show "n/a" and their reason below the table.
    """
    full = any(isinstance(results.get(k), dict) for k in ("data", "general"))
    sections = [(k, results[k]) for k in ("data", "general") if isinstance(results.get(k), dict)] if full \
        else [("", results)]
    lines: list[str] = []
    reasons: dict[str, str] = {}
    rfid: list[str] = []
    for title, per_vae in sections:
        if not per_vae:
            continue
        cols = [m for m in METRICS if any(isinstance(r.get(m[0]), dict) for r in per_vae.values())]
        if title:
            lines.append(f"{title} ({next(iter(per_vae.values())).get('patches', '?')} patches)")
        header = ["VAE"] + [c[1] for c in cols]
        rows = [[name] + [_fmt(r.get(key), key) for key, _, _ in cols] for name, r in per_vae.items()]
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        lines.append("  ".join(h.ljust(wd) for h, wd in zip(header, widths)).rstrip())
        lines.append("  ".join("-" * wd for wd in widths))
        lines += ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in rows]
        lines.append("")
        for name, r in per_vae.items():
            for key in ("lpips", "rfid"):
                v = r.get(key)
                if isinstance(v, dict) and v.get("available") is False:
                    reasons[key] = v.get("reason", "")
            v = r.get("rfid")
            if isinstance(v, dict) and "value" in v:
                rfid.append(f"rFID {title + ' ' if title else ''}{name}: {v['value']:.2f}")
    lines += rfid
    for key in ("lpips", "rfid"):  # run_eval's top-level availability holds the full reason
        top = results.get(key) if full else None
        if key in reasons and isinstance(top, dict) and top.get("available") is False:
            reasons[key] = top.get("reason", "")
    lines += [f"{key}: n/a - {why}" for key, why in reasons.items()]
    fi = results.get("full_image") if full else None
    if isinstance(fi, dict):
        lines.append(f"full image {fi.get('path')} ({fi.get('size')}, tile {fi.get('tile')}, "
                     f"overlap {fi.get('overlap')}):")
        for name, r in fi.get("vaes", {}).items():
            ratio = r["seam"]["ratio"]
            ratio = "n/a" if ratio is None else f"{ratio:.3f}"
            lines.append(f"  {name}: PSNR {r['psnr']:.2f} dB, seam/interior error ratio {ratio}")
    if full:
        lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- patches, scores, rows

def image_channels_of(vaes: dict[str, torch.nn.Module]) -> int:
    """The image channels the VAEs take (3 RGB, 4 RGBA), the same for all of them: refused, naming each,
    when they differ (an RGB and an RGBA VAE cannot be scored on the same patches). Models that belong to
    no family (an identity baseline) take whatever they are given, 3 when nothing else says."""
    channels = {name: image_channels(m) for name, m in vaes.items() if has_family(m)}
    if len(set(channels.values())) > 1:
        raise VAEFTError("these VAEs take images of different channels ("
                         + ", ".join(f"{n}: {c}" for n, c in channels.items())
                         + "): VAEs of RGB and of RGBA images cannot be scored on the same patches; compare "
                           "them in separate runs")
    return next(iter(channels.values()), 3)


def evaluation_patches(ds, count: int, seed: int, use_validation: bool = True, channels: int | None = None
                       ) -> tuple[torch.Tensor, dict]:
    """Seeded patches of a PatchDataset to score VAEs on, and where they came from.

    use_validation: from the held-out validation images (as ``fit`` splits them) when the dataset
    has any, else from all images (and the info says so); False: from all images. channels: 3 or 4
    (:meth:`training.data.PatchDataset.for_channels`; None: the dataset's own).
    Returns ((n, C, P, P) in [-1, 1], {"split": "validation" | "all", "images", "image_names",
    "note", "patches"}, and "alpha" when the images' transparency changed for these channels).
    """
    ds = ds.for_channels(channels) if channels is not None else ds
    summary = ds.summary()
    info: dict[str, Any] = {}
    if use_validation and summary["val_images"] > 0:
        x = ds.val_patches(count, seed=seed)
        info.update(split="validation", images=summary["val_images"], image_names=summary["val_paths"],
                    note=f"validation split: {summary['validation']}")
    else:
        x = ds.patches_at(0, count)
        info.update(split="all", images=summary["train_images"], image_names=summary["train_paths"])
        info["note"] = (f"no held-out validation images ({summary['validation']}); patches come from all images, "
                        "which a fine-tuned VAE may have been trained on") if use_validation else \
            "all images of the folder (none of them held out for, or trained on, by design)"
    info["patches"] = int(x.shape[0])
    if ds.alpha_note():
        info["alpha"] = ds.alpha_note()
    return x, info


def eval_patches(folder: str, cfg, count: int, use_validation: bool = True, channels: int = 3
                 ) -> tuple[torch.Tensor, dict]:
    """:func:`evaluation_patches` of a folder read with DataConfig ``cfg`` (``channels``-channel patches);
    the info also names the folder and the files skipped."""
    if not use_validation:
        cfg = dataclasses.replace(cfg, val_fraction=0.0)
    ds = build_dataset(folder, cfg)
    x, info = evaluation_patches(ds, count, cfg.seed, use_validation, channels)
    summary = ds.summary()
    return x, {"folder": folder, "images_used": len(summary["images_used"]),
               "images_skipped": summary["images_skipped"], **info}


def compare(vaes: dict[str, torch.nn.Module], patches: torch.Tensor, *, rows: int = 0,
            device: torch.device | str | None = None, **metric_options) -> tuple[dict, torch.Tensor | None]:
    """Scores of every VAE on ``patches`` (:func:`training.metrics.evaluate_vaes`; ``metric_options``
    are passed on) and, with ``rows`` > 0, the comparison image of the first ``rows`` patches
    (:func:`comparison_grid`: original | each VAE | error map of the last). Returns (scores, grid or None)."""
    results = evaluate_vaes(vaes, patches, device=device, **metric_options)
    if rows <= 0:
        return results, None
    shown = patches[:rows]
    recons = []
    with torch.no_grad():
        for model in vaes.values():
            home = model_place(model)[0]
            model.to(device or home)
            try:
                recons.append(reconstruct(model, shown.to(device or home)).float().cpu())
            finally:
                model.to(home)
    return results, comparison_grid(shown, recons, gap=2)


def metric_deltas(per_vae: dict, reference: str) -> dict:
    """Each VAE's mean metric minus the reference VAE's."""
    ref = per_vae[reference]
    out: dict[str, Any] = {"reference": reference}
    for name, r in per_vae.items():
        if name == reference:
            continue
        out[name] = {k: r[k]["mean"] - ref[k]["mean"] for k, _, better in METRICS
                     if better is not None and "mean" in r.get(k, {}) and "mean" in ref.get(k, {})}
    out["meaning"] = ("mean of the VAE minus mean of the reference; psnr/ssim: positive is better, "
                      "lpips/delta_e2000: negative is better")
    return out


def full_image_report(vaes: dict[str, torch.nn.Module], image: torch.Tensor, path: str, tile: int, overlap: int,
                      device: torch.device | str) -> dict:
    """Each VAE on a whole (1, C, H, W) [-1, 1] image in tiles (C: the VAEs' image channels): PSNR/SSIM/...
    and the seam error along tile borders."""
    out: dict[str, Any] = {"path": path, "size": list(image.shape[-2:]), "tile": tile, "overlap": overlap,
                           "vaes": {}}
    for name, m in vaes.items():
        home = model_place(m)[0]
        m.to(device)
        try:
            recon = reconstruct_tiled(m, image, tile=tile, overlap=overlap)
        finally:
            m.to(home)
        out["vaes"][name] = {k: v.item() for k, v in image_metrics(recon.clamp(-1, 1), image).items()}
        out["vaes"][name]["seam"] = seam_error(image, recon, tile, overlap)
    out["meaning"] = ("seam.ratio = mean abs error within seam.band px of tile borders / elsewhere; "
                      "near 1: tiles join invisibly, clearly above 1: visible seams")
    return out
