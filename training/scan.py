"""Scanning: a folder of images (or an image batch) into checked, decoded image records.

Every file is decoded in full (:mod:`training.imageio`) so a corrupt file is reported now, never
mid-training; each unusable file is listed with a reason. Only regular files are opened (FIFOs,
sockets, devices and links to them are listed, not read), and an image's size is checked from its
header, before decoding or upscaling, against :data:`training.imageio.MAX_PIXELS`. Masks are found
by the image's relative name. Each usable image gets its foreground map (see
:mod:`training.foreground`) and its valid patch positions; :class:`training.data.PatchDataset`
samples patches from the records.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig, check_config
from .errors import VAEFTError
from .files import check_folder
from .foreground import cell_counts, foreground_mask, grid_positions, integral, resize_pixels, valid_positions
from .imageio import (ALPHA_KEPT, IMAGE_EXTENSIONS, Decoded, ImageMemoryError, ImageReadError, check_regular_file,
                      check_size, is_image_name, read_image, to_unit, upscaled_size)
from .memory import check_cpu_memory, out_of_memory_named

_MAX_LISTED = 12  # files named in an error message before "... and N more"


class Scan(NamedTuple):
    """What a scan found: the usable images, the skipped files ({"path", "reason"}) and notes
    ({"path", "note"}: orientation, ICC conversion, alpha, upscaling)."""

    source: str
    images: list
    skipped: list[dict]
    notes: list[dict]


@dataclass
class ImageRecord:
    """One usable image. Pixel positions are after EXIF orientation and any upscaling."""

    name: str                       # relative path (posix) or "image_0003" for tensor sources
    path: str | None                # file to re-read when not cached; None for tensor sources
    mask_path: str | None
    height: int
    width: int
    bits: int
    upscale: tuple[int, int] | None  # size the decoded image is resized to, if it was too small
    pixels: torch.Tensor | None      # cached (3, H, W) uint8/uint16, or (4, H, W) with straight alpha
    counts: np.ndarray | None = None  # (H//8, W//8) uint8 foreground per cell; None = masking off
    valid: np.ndarray | None = None   # random mode: bool map of foreground-valid patch corners
    grid: np.ndarray | None = None    # grid mode: (N, 2) int64 kept (top, left) in pixels
    grid_fg: np.ndarray | None = None  # grid mode: (N,) foreground fraction of each kept patch
    alpha: bool = False               # the image has transparency: its pixels carry alpha as a 4th channel


def read_mask(path: str, min_side: int = 0) -> torch.Tensor:
    """(H, W) bool: mask image > half its range (colour masks: mean of channels)."""
    dec = read_image(path, min_side)
    return to_unit(dec.pixels).mean(0) > 0.5


def image_record(name: str, path: str | None, dec: Decoded, mask_path: str | None, cfg: DataConfig
             ) -> tuple[ImageRecord | None, str | None, list[str]]:
    """Decoded image -> (record, None, notes) or (None, skip reason, notes)."""
    p = cfg.patch_size
    notes = list(dec.notes)
    pixels = dec.pixels
    h, w = pixels.shape[1:]
    upscale = None
    mask = None
    try:  # the folder path checked this before decoding; a tensor source is checked here
        check_size(w, h, p if cfg.upscale_small else 0)
    except ImageReadError as e:
        return None, str(e), notes
    if mask_path is not None:
        try:
            mask = read_mask(mask_path, p if cfg.upscale_small else 0)
        except ImageMemoryError:
            raise
        except ImageReadError as e:
            return None, f"mask {os.path.basename(mask_path)}: {e}", notes
        if tuple(mask.shape) != (h, w):
            return None, (f"mask {os.path.basename(mask_path)} is {mask.shape[1]}×{mask.shape[0]}, the image is "
                          f"{w}×{h}; masks must match their image's size"), notes
    if min(h, w) < p:
        if not cfg.upscale_small:
            return None, (f"smaller than the patch ({w}×{h} < {p}×{p}); set upscale_small to upscale it, "
                          "or use a smaller patch_size"), notes
        upscale = upscaled_size(h, w, p)
        pixels = resize_pixels(pixels, upscale)
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=upscale, mode="nearest")[0, 0] > 0.5
        notes.append(f"upscaled from {w}×{h} to {upscale[1]}×{upscale[0]}")
        h, w = upscale
    rec = ImageRecord(name, path, mask_path, h, w, dec.bits, upscale, pixels, alpha=pixels.shape[0] == 4)

    if mask is None and cfg.foreground_threshold > 0:
        mask = foreground_mask(pixels, cfg.foreground_threshold)
    what = "mask" if mask_path else f"luminance > {cfg.foreground_threshold:g}"
    if cfg.sampling == "grid":
        ys = grid_positions(h, p, cfg.grid_overlap)
        xs = grid_positions(w, p, cfg.grid_overlap)
        pos = np.array([(y, x) for y in ys for x in xs], dtype=np.int64)
        if mask is None:
            fg = np.ones(len(pos))
        else:
            fg = np.array([float(mask[y:y + p, x:x + p].sum()) / (p * p) for y, x in pos.tolist()])
        keep = fg >= cfg.min_foreground
        if not keep.any():
            return None, (f"no grid patch is at least {cfg.min_foreground:.0%} foreground ({what}; best "
                          f"{fg.max():.0%}); lower min_foreground or foreground_threshold"), notes
        rec.grid, rec.grid_fg = pos[keep], fg[keep]
    elif mask is not None:
        rec.counts = cell_counts(mask)
        rec.valid = valid_positions(rec.counts, p, cfg.min_foreground)
        if not rec.valid.any():
            best = float(integral(rec.counts)[-1, -1]) / (h * w)
            return None, (f"no {p}×{p} patch is at least {cfg.min_foreground:.0%} foreground ({what}; the "
                          f"whole image is {best:.0%}); lower min_foreground or foreground_threshold"), notes
    return rec, None, notes


def list_images(root: str, cfg: DataConfig) -> tuple[list[tuple[str, str]], list[dict]]:
    """Sorted (relative posix path, absolute path) of image files, and skipped entries.

    Image names that are not regular files (FIFOs, sockets, devices, links to them, broken
    links) are skipped with what they are, found by ``stat`` alone: they are never opened."""
    files: list[tuple[str, str]] = []
    skipped: list[dict] = []
    mask_real = os.path.realpath(cfg.mask_dir) if cfg.mask_dir else None
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                skipped.append({"path": rel_dir + d + "/", "reason": "hidden folder, not scanned"})
            elif mask_real and os.path.realpath(full) == mask_real:
                skipped.append({"path": rel_dir + d + "/", "reason": "the mask folder, not scanned for images"})
            elif not cfg.recursive:
                skipped.append({"path": rel_dir + d + "/", "reason": "subfolder not scanned (recursive is off)"})
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = rel_dir + f
            if is_image_name(f):
                full = os.path.join(dirpath, f)
                try:
                    check_regular_file(full)
                except ImageReadError as e:
                    skipped.append({"path": rel, "reason": str(e)})
                    continue
                files.append((rel, full))
            else:
                ext = os.path.splitext(f)[1].lower() or "none"
                skipped.append({"path": rel, "reason": f"not an image file (extension {ext}; supported: "
                                                       f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"})
    files.sort()
    return files, skipped


def find_masks(files: list[tuple[str, str]], mask_dir: str) -> dict[str, str]:
    """Image relative path -> mask file with the same relative path and stem (any image extension)."""
    check_folder(mask_dir, f"mask folder {mask_dir}", "give the folder that holds the masks")
    if not os.path.isdir(mask_dir):
        raise VAEFTError(f"mask folder not found: {mask_dir}")
    found: dict[str, str] = {}
    missing = []
    for rel, _ in files:
        stem = os.path.splitext(rel)[0]
        folder = os.path.join(mask_dir, os.path.dirname(stem))
        base = os.path.basename(stem)
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        cands = [n for n in names if os.path.splitext(n)[0] == base and is_image_name(n)]
        same_ext = [n for n in cands if os.path.splitext(n)[1].lower() == os.path.splitext(rel)[1].lower()]
        pick = (same_ext or cands or [None])[0]
        if pick is None:
            missing.append(rel)
        else:
            found[rel] = os.path.join(folder, pick)
    if missing:
        raise VAEFTError(f"{len(missing)} image(s) have no mask in {mask_dir} (a mask needs the image's "
                         f"relative path and name, any image extension): {_listing(missing)}")
    return found


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def scan_folder(path: str | os.PathLike, cfg: DataConfig) -> Scan:
    """Scan ``path`` (recursively when ``cfg.recursive``). Raises VAEFTError for a missing or empty
    folder and when no image is usable (naming each file's reason)."""
    check_config(cfg)
    root = os.fspath(path)
    check_folder(root, f"data folder {root}", "give the folder that holds the images")
    if not os.path.isdir(root):
        raise VAEFTError(f"data folder not found: {root}")
    files, skipped = list_images(root, cfg)
    if not files and not skipped:
        raise VAEFTError(f"data folder {root} is empty; put PNG, JPEG, WebP or TIFF images in it")
    masks = find_masks(files, cfg.mask_dir) if cfg.mask_dir else {}
    min_side = cfg.patch_size if cfg.upscale_small else 0

    def load(item: tuple[str, str]):
        rel, full = item
        try:
            dec = read_image(full, min_side, alpha=True)  # kept; each VAE takes what it can (PatchDataset)
        except ImageMemoryError as e:  # the machine's state, not the file's: stop, do not skip
            raise VAEFTError(f"{rel}: {e}") from None
        except ImageReadError as e:
            return rel, full, None, str(e), []
        h, w = dec.pixels.shape[1:]
        try:
            with out_of_memory_named(f"preparing {rel} ({w}×{h} pixels)", "close other programs, lower cache_mb, "
                                                                   "or downscale the image"):
                return (rel, full) + image_record(rel, full, dec, masks.get(rel), cfg)
        except ImageMemoryError as e:  # reading its mask
            raise VAEFTError(f"{rel}: {e}") from None

    images: list[ImageRecord] = []
    notes: list[dict] = []
    budget = cfg.cache_mb * 2**20
    used = 0
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        for start in range(0, len(files), 2 * workers):  # chunks bound decoded images in flight
            for rel, full, rec, reason, rec_notes in pool.map(load, files[start:start + 2 * workers]):
                notes += [{"path": rel, "note": n} for n in rec_notes]
                if rec is None:
                    skipped.append({"path": rel, "reason": reason})
                    continue
                size = rec.pixels.numel() * rec.pixels.element_size()
                if used + size <= budget:
                    used += size
                else:
                    rec.pixels = None  # re-read on demand (validated above, so it decodes)
                images.append(rec)
    skipped.sort(key=lambda s: s["path"])
    if not images:
        why = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:_MAX_LISTED])
        more = f"; ... and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        raise VAEFTError(f"no usable image in {root} ({len(skipped)} file(s) checked): {why}{more}")
    return Scan(root, images, skipped, notes)


def scan_tensor(images: torch.Tensor, cfg: DataConfig) -> Scan:
    """An in-memory batch, (B, C, H, W) float in [0, 1] with C = 1, 3 or 4 (RGBA with straight alpha, as
    ComfyUI's IMAGE holds it: kept), as images ``image_0000``, ... (stored as uint16, all kept in memory)."""
    check_config(cfg)
    if cfg.mask_dir:
        raise VAEFTError("mask_dir works with a folder of images only, not with an image batch")
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
        raise VAEFTError("images must be a float tensor (B, C, H, W) in [0, 1]")
    if images.ndim == 3:
        images = images[None]
    if images.shape[1] not in (1, 3, 4):
        hint = " (it looks like B, H, W, C: permute it to B, C, H, W)" if images.shape[-1] in (1, 3, 4) else ""
        raise VAEFTError(f"images must be (B, C, H, W) with 1, 3 or 4 channels, got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise VAEFTError("the image batch is empty")
    what, hint = f"reading the image batch {tuple(images.shape)}", "use fewer or smaller images"
    check_cpu_memory(images.numel() * 4, what, hint)
    with out_of_memory_named(what, hint):
        x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise VAEFTError("the image batch contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise VAEFTError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    x = x.clamp(0, 1)
    recs, skipped, notes = [], [], []
    for b in range(x.shape[0]):
        img, note = x[b], []
        if img.shape[0] == 4:
            note.append("alpha " + ALPHA_KEPT)
        elif img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        name = f"image_{b:04d}"
        with out_of_memory_named(f"preparing {name} of the image batch", hint):
            dec = Decoded((img * 65535).round().to(torch.uint16).contiguous(), 16, note)
            rec, reason, rec_notes = image_record(name, None, dec, None, cfg)
        notes += [{"path": name, "note": n} for n in rec_notes]
        if rec is None:
            skipped.append({"path": name, "reason": reason})
        else:
            recs.append(rec)
    if not recs:
        raise VAEFTError("no usable image in the batch: " + "; ".join(f"{s['path']}: {s['reason']}"
                                                                         for s in skipped[:_MAX_LISTED]))
    return Scan(f"tensor ({x.shape[0]} images)", recs, skipped, notes)
