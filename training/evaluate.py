"""``eval``: compare VAEs on the same seeded patches; comparison grids and a metrics table.

    python -m training eval --vae base.safetensors --vae tuned.safetensors --data DIR \
        [--general DIR2] [--patch-size 256 --count 64 --seed 0] [--full-image BIG.png]

Prints one JSON object (see :func:`run_eval`). Every VAE encodes and decodes the very same
patches. Patches of ``--data`` come from the held-out validation images of the split that
``fit`` makes with the same ``--seed`` and ``--val-fraction`` (so a fine-tuned VAE is judged
on images it was not trained on); when the folder has no validation split (fewer than 2
images, or val_fraction 0) they come from all images, and the JSON says so. ``--general``
is a folder of other images, none of them trained on, used whole to measure harm: metric
changes of each VAE relative to the first ``--vae`` (the base).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

import torch

from .errors import VAEFTError
from .metrics import evaluate_vaes, image_metrics, latent_channels, load_inception, try_load_lpips
from .tiling import reconstruct_tiled, seam_error

# Metrics in tables and deltas: (key, label, higher is better?)
METRICS = (("psnr", "PSNR dB", True), ("ssim", "SSIM", True), ("lpips", "LPIPS", False),
           ("delta_e2000", "dE2000", False), ("shift_r", "shift R", None), ("shift_g", "shift G", None),
           ("shift_b", "shift B", None))
# Data settings the eval command exposes (the rest keep DataConfig's defaults).
_DATA_FLAGS = ("patch_size", "seed", "val_fraction", "foreground_threshold", "min_foreground", "mask_dir",
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

    original: (B, 3, H, W) or (3, H, W) in [-1, 1]; recons: same shape each, in [-1, 1]
    (clipped). The heat map shows |last recon − original| averaged over RGB in [0, 1] units,
    black = 0 and pale yellow = ``heat_max`` or more (0.1 ≈ 26/255). ``gap`` px of white
    between cells. Returns (3, B·H + (B−1)·gap, (len(recons)+2)·W + (len(recons)+1)·gap) in [0, 1].
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
    unit = lambda x: ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)  # noqa: E731
    orig = unit(original)
    cells = [orig] + [unit(r) for r in recons]
    err = (cells[-1] - orig).abs().mean(1) / heat_max
    cells.append(heat_map(err))
    b, _, h, w = orig.shape
    k = len(cells)
    out = torch.ones(3, b * h + (b - 1) * gap, k * w + (k - 1) * gap)
    for i in range(b):
        for j, c in enumerate(cells):
            y, x = i * (h + gap), j * (w + gap)
            out[:, y:y + h, x:x + w] = c[i]
    return out


# ----------------------------------------------------------------------------- table

def _fmt(v: Any, key: str) -> str:
    if not isinstance(v, dict):
        return "-"
    if "mean" not in v:
        return "n/a"
    digits = {"psnr": 2, "ssim": 4, "lpips": 4, "delta_e2000": 3}.get(key, 2)
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


# ----------------------------------------------------------------------------- command

def add_eval_command(subparsers) -> None:
    """Register ``eval`` on an argparse subparsers object; dispatch with ``args.func(args)``."""
    from .data import DataConfig
    from .options import add_arguments

    p = subparsers.add_parser(
        "eval", help="compare VAEs on the same seeded patches (PSNR, SSIM, LPIPS, CIEDE2000, colour shift)",
        description="Encode and decode the same seeded patches with every --vae and print one JSON "
                    "object of metrics (mean and std over patches). Use the --seed and --val-fraction "
                    "of the fit run to evaluate on its held-out validation images.")
    p.add_argument("--vae", action="append", required=True, metavar="PATH",
                   help="VAE file; repeat to compare several (each named by its file stem; the first is "
                        "the reference for --general deltas)")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images like those fine-tuned on")
    p.add_argument("--general", metavar="DIR", help="optional folder of other (general) images, to measure harm")
    p.add_argument("--count", type=int, default=64, help="patches per folder (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="patches per forward pass (default: 8)")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default: alex)")
    p.add_argument("--lpips-backbone", metavar="PATH",
                   help="torchvision ImageNet weights for LPIPS (default: torchvision's cache); never downloaded")
    p.add_argument("--inception", metavar="PATH",
                   help="Inception v3 weights for rFID (default: torch hub cache); rFID is skipped without them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the JSON object to PATH (stdout is always one JSON object; a bare --json "
                        "is accepted for symmetry with other commands)")
    p.add_argument("--grid", metavar="PATH", help="also write a PNG: original | each VAE | error heat map "
                                                   "for the first 4 patches of --data")
    p.add_argument("--full-image", metavar="PATH", help="also reconstruct this whole image in tiles and report "
                                                         "seams along tile borders")
    p.add_argument("--tile", type=int, default=512, help="tile size for --full-image, px (default: 512)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap for --full-image, px (default: 64)")
    skip = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name not in _DATA_FLAGS)
    add_arguments(p, DataConfig, skip=skip)
    p.set_defaults(func=run_eval)


def _vae_names(paths: list[str]) -> dict[str, str]:
    """name (file stem, made unique with -2, -3, ...) -> path."""
    names: dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "vae"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names[name] = path
    return names


def eval_patches(folder: str, cfg, count: int, use_validation: bool = True) -> tuple[torch.Tensor, dict]:
    """Seeded patches of ``folder`` and a description of where they came from.

    use_validation: take them from the validation split of ``cfg`` (as ``fit`` makes it) when
    there is one, else from all images; False: from all images (``val_fraction`` 0).
    Returns ((n, 3, P, P) in [-1, 1], info dict for the JSON).
    """
    from .data import build_dataset

    if not use_validation:
        cfg = dataclasses.replace(cfg, val_fraction=0.0)
    ds = build_dataset(folder, cfg)
    summary = ds.summary()
    info: dict[str, Any] = {"folder": folder, "images_used": len(summary["images_used"]),
                            "images_skipped": summary["images_skipped"]}
    split_ok = use_validation and summary["val_images"] > 0
    if split_ok:
        x = ds.val_patches(count, seed=cfg.seed)
        info.update(split="validation", images=summary["val_images"], image_names=summary["val_paths"],
                    note=f"validation split: {summary['validation']}")
    else:
        x = next(iter(ds.train_batches(count, num_workers=0)))
        info.update(split="all", images=summary["train_images"], image_names=summary["train_paths"])
        if use_validation:
            info["note"] = (f"no held-out validation images ({summary['validation']}); patches come from "
                            "all images, which a fine-tuned VAE may have been trained on")
        else:
            info["note"] = "all images of the folder (none of them held out for, or trained on, by design)"
    info["patches"] = int(x.shape[0])
    return x, info


def _deltas(per_vae: dict, reference: str) -> dict:
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


def _read_full_image(path: str) -> torch.Tensor:
    from .imageio import ImageReadError, read_image

    try:
        dec = read_image(path)
    except ImageReadError as e:
        raise VAEFTError(f"--full-image {path!r}: {e}") from None
    px = dec.pixels
    scale = 255.0 if px.dtype == torch.uint8 else 65535.0
    return (px.to(torch.float32) / scale * 2 - 1)[None]


def _finite(obj):
    """JSON-safe: NaN/inf floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run_eval(args: argparse.Namespace) -> int:
    """Run ``eval``: print one JSON object on stdout; VAEFTError propagates to the CLI's handler.

    The object: {"patch_size", "seed", "count", "vaes": {name: path}, "sources": {"data": {...},
    "general": {...}}, "data": {name: {metric: {"mean", "std"}, "patches": n, ...}},
    "general": {...} (with --general), "general_delta": {...} (with --general and 2+ VAEs),
    "lpips": availability, "rfid": availability, "full_image": {...} (with --full-image),
    "notes": [...]}.
    """
    from .data import DataConfig
    from .options import from_arguments
    from .device import pick_device
    from .vae import load_vae, reconstruct

    cfg = from_arguments(DataConfig, args)
    if args.count < 1:
        raise VAEFTError(f"--count must be at least 1, got {args.count}")
    if args.batch_size < 1:
        raise VAEFTError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.full_image and not os.path.isfile(args.full_image):
        raise VAEFTError(f"--full-image {args.full_image!r} does not exist")
    for flag, path in (("--json", args.json), ("--grid", args.grid)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise VAEFTError(f"the folder of {flag} {path!r} does not exist")
    device = pick_device(args.device)
    names = _vae_names(args.vae)
    vaes = {name: load_vae(path).model for name, path in names.items()}

    lpips_net, lpips_info = try_load_lpips(args.lpips_net, args.lpips_backbone)
    inception, rfid_info = load_inception(args.inception)
    if inception is not None:
        rfid_info["note"] = ("rFID over few patches is biased upward (it is meant for thousands); compare "
                             "values only between VAEs of this run")
    common = dict(lpips_net=lpips_net, lpips_unavailable='see "lpips" at the top level', inception=inception,
                  rfid_unavailable='see "rfid" at the top level', batch_size=args.batch_size, device=device)

    out: dict[str, Any] = {"patch_size": cfg.patch_size, "seed": cfg.seed, "count": args.count,
                           "vaes": names, "sources": {}, "lpips": lpips_info, "rfid": rfid_info}
    notes: list[str] = []
    latents = {n: latent_channels(m) for n, m in vaes.items()}
    if len(set(latents.values())) > 1:
        notes.append(f"the VAEs have different latent layouts ({latents} latent channels): each encodes and "
                     "decodes its own latents, so these reconstruction metrics are comparable, but their "
                     "latents are not interchangeable and cannot be compared with each other")

    patches, info = eval_patches(args.data, cfg, args.count, use_validation=True)
    out["sources"]["data"] = info
    out["data"] = evaluate_vaes(vaes, patches, **common)
    if args.general:
        # the masks of --mask-dir belong to --data's images
        gpatches, ginfo = eval_patches(args.general, dataclasses.replace(cfg, mask_dir=None), args.count,
                                       use_validation=False)
        out["sources"]["general"] = ginfo
        out["general"] = evaluate_vaes(vaes, gpatches, **common)
        if len(vaes) > 1:
            out["general_delta"] = _deltas(out["general"], next(iter(vaes)))
    if len(vaes) > 1:
        out["data_delta"] = _deltas(out["data"], next(iter(vaes)))

    if args.grid:
        from .plot import save_png

        sample = patches[:4]
        recons = []
        with torch.no_grad():
            for m in vaes.values():
                m.to(device)
                try:
                    recons.append(reconstruct(m, sample.to(device)).cpu())
                finally:
                    m.to("cpu")
        save_png(comparison_grid(sample, recons, gap=2), args.grid)
        out["grid"] = {"path": args.grid, "columns": ["original"] + list(vaes) + [f"|{list(vaes)[-1]} - original|"]}

    if args.full_image:
        image = _read_full_image(args.full_image)
        fi: dict[str, Any] = {"path": args.full_image, "size": list(image.shape[-2:]), "tile": args.tile,
                              "overlap": args.overlap, "vaes": {}}
        for name, m in vaes.items():
            m.to(device)
            try:
                recon = reconstruct_tiled(m, image, tile=args.tile, overlap=args.overlap)
            finally:
                m.to("cpu")
            mets = image_metrics(recon.clamp(-1, 1), image)
            fi["vaes"][name] = {k: v.item() for k, v in mets.items()}
            fi["vaes"][name]["seam"] = seam_error(image, recon, args.tile, args.overlap)
        fi["meaning"] = ("seam.ratio = mean abs error within seam.band px of tile borders / elsewhere; "
                         "near 1: tiles join invisibly, clearly above 1: visible seams")
        out["full_image"] = fi
    out["notes"] = notes
    text = json.dumps(_finite(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (the package CLI registers the same command)."""
    parser = argparse.ArgumentParser(prog="python -m training.evaluate")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except VAEFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
