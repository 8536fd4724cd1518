"""Patch dataset: square patches from a folder of (large) images or an in-memory batch.

Tensors here are BCHW float32 in [-1, 1] unless stated. The pipeline:

1. Scan: every file is decoded in full (:mod:`training.imageio`) so a corrupt file is
   reported now, never mid-training. Each unusable file is listed with a reason. Only regular
   files are opened (FIFOs, sockets, devices and links to them are listed, not read), and an
   image's size is checked from its header, before decoding or upscaling, against
   :data:`training.imageio.MAX_PIXELS`.
2. Foreground: a pixel is foreground when its luminance (Rec. 601, [0, 1]) exceeds
   ``foreground_threshold``, or when the user's mask is > 0.5. Per image a low-res map
   counts foreground pixels per 8×8 cell; patch corners lie on that 8-pixel lattice, so a
   patch's foreground fraction is computed exactly from the map, and the set of patch
   positions with at least ``min_foreground`` is known up front (an image with none is
   skipped with a reason).
3. Split: whole images go to validation (``val_fraction``, seeded), so no validation
   pixel is ever trained on.
4. Stream: batch ``k`` of rank ``r`` is global batch ``g = k * world_size + r``; its content
   is a function of (seed, g) only, whatever the number of loader workers, so a run resumes
   exactly with ``start_batch`` and DDP ranks get disjoint shards.

Random mode picks an image uniformly (so one huge image does not dominate), then a
foreground-valid position uniformly. Grid mode visits every grid patch once per epoch in a
seeded order. Augmentation is separate (:mod:`training.augment`), applied by the trainer on device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import VAEFTError
from .imageio import (
    ALPHA_POLICY, IMAGE_EXTENSIONS, PIXEL_MAX, Decoded, ImageMemoryError, ImageReadError, check_regular_file,
    check_size, describe_path, is_image_name, is_out_of_memory, read_image, signed_to_unit, to_unit, upscaled_size,
)
from .options import option, validate
from .plot import image_grid

CELL = 8  # foreground-map cell and patch-corner lattice, in pixels (the VAE's downsampling factor)
LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights, as kornia.color.rgb_to_grayscale
_MAX_LISTED = 12  # files named in an error message before "... and N more"

# Stream tags: independent random streams derived from one seed.
_SPLIT, _TRAIN, _EPOCH, _VAL, _PREVIEW, _SUMMARY = 1, 2, 3, 4, 5, 6


@dataclass
class DataConfig:
    """How patches are cut from the images. Every field is a CLI flag and a node input (essential ones on
    VAE Patch Dataset, the rest on VAE Patch Options)."""

    patch_size: int = option(256, "patch side in pixels (a multiple of 8)", min=8, max=4096, essential=True)
    sampling: str = option("random", "'random' patches (image picked uniformly, then position) or a "
                                     "'grid' covering every image once per epoch", choices=("random", "grid"),
                         essential=True)
    grid_overlap: int = option(0, "overlap of neighbouring grid patches, pixels (grid sampling)", min=0)
    scale_jitter: float = option(0.0, "random scale: crop patch×s, s in [1-j, 1+j], resized to the patch "
                                      "(0 = off; random sampling only)", min=0.0, max=0.9)
    foreground_threshold: float = option(0.04, "a pixel is foreground when its luminance (0..1) is above "
                                               "this (0 = no automatic masking)", min=0.0, max=1.0,
                                         essential=True)
    min_foreground: float = option(0.5, "keep a patch only if at least this fraction is foreground",
                                   min=0.0, max=1.0)
    mask_dir: str | None = option(None, "folder of masks with the images' relative names (white = use); "
                                        "replaces the automatic foreground")
    upscale_small: bool = option(False, "upscale images smaller than the patch (else they are skipped)")
    val_fraction: float = option(0.1, "fraction of images held out for validation (at least 1 when there "
                                      "are 2 or more images; 0 = none)", min=0.0, max=0.9,
                                 essential=True)
    flip: bool = option(True, "augment: random horizontal and vertical flips")
    rotate90: bool = option(True, "augment: random 90° rotations")
    color_jitter: float = option(0.0, "augment: brightness/contrast/saturation factors in [1-c, 1+c] "
                                      "(0 = off)", min=0.0, max=0.5)
    cache_mb: int = option(4096, "keep decoded images in memory up to this many MiB; the rest are "
                                 "re-read from disk when sampled", min=0)
    num_workers: int = option(0, "data loader worker processes (0 = in the training process)", min=0, max=64)
    seed: int = option(0, "seed for the split, patch positions and augmentation", min=0, max=2**63 - 1,
                       essential=True)
    recursive: bool = option(True, "search subfolders of the data folder")
    fg_tries: int = option(16, "tries per patch to find a jittered crop with enough foreground before "
                               "falling back to an unjittered one", min=1, max=1000)

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def augments(self) -> bool:
        """Whether :func:`training.augment.augment` changes anything (else a grid patch set is fixed)."""
        return self.flip or self.rotate90 or self.color_jitter > 0


def check_config(cfg: DataConfig) -> None:
    """Raise VAEFTError for an invalid setting (bounds, patch size multiple of 8, overlap < patch)."""
    validate(cfg)
    p = cfg.patch_size
    if p % CELL:
        lo, hi = max(CELL, p // CELL * CELL), (p // CELL + 1) * CELL
        raise VAEFTError(f"patch_size must be a positive multiple of 8 (the VAE downsamples by 8); "
                         f"got {p}: use {lo} or {hi}")
    if cfg.grid_overlap >= p:
        raise VAEFTError(f"grid_overlap ({cfg.grid_overlap}) must be smaller than patch_size ({p})")


# ---------------------------------------------------------------------------------------------
# Small pure functions


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luminance of (..., 3, H, W) values in [0, 1] -> (..., H, W) in [0, 1]."""
    return LUMA[0] * rgb[..., 0, :, :] + LUMA[1] * rgb[..., 1, :, :] + LUMA[2] * rgb[..., 2, :, :]


def foreground_mask(pixels: torch.Tensor, threshold: float, rows: int = 512) -> torch.Tensor:
    """(3, H, W) uint8/uint16 -> (H, W) bool, luminance > threshold. Row blocks bound the float copy."""
    out = torch.empty(pixels.shape[1:], dtype=torch.bool)
    for y in range(0, pixels.shape[1], rows):
        out[y:y + rows] = luminance(to_unit(pixels[:, y:y + rows])) > threshold
    return out


def cell_counts(mask: torch.Tensor) -> np.ndarray:
    """(H, W) bool -> (H // 8, W // 8) uint8: foreground pixels in each 8×8 cell (0..64)."""
    h8, w8 = mask.shape[0] // CELL, mask.shape[1] // CELL
    m = mask[:h8 * CELL, :w8 * CELL].reshape(h8, CELL, w8, CELL)
    return m.sum(dim=(1, 3), dtype=torch.int32).to(torch.uint8).numpy()


def integral(counts: np.ndarray) -> np.ndarray:
    """Summed-area table of ``counts`` with a zero first row/column: (h+1, w+1) int64."""
    s = np.zeros((counts.shape[0] + 1, counts.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = counts.astype(np.int64).cumsum(0).cumsum(1)
    return s


def box_fraction(sat: np.ndarray, top: int, left: int, size: int) -> float:
    """Foreground fraction of the ``size``-cell square at cell (top, left), from :func:`integral`."""
    n = sat[top + size, left + size] - sat[top, left + size] - sat[top + size, left] + sat[top, left]
    return float(n) / float(size * size * CELL * CELL)


def valid_positions(counts: np.ndarray, patch: int, min_foreground: float) -> np.ndarray:
    """(h - p + 1, w - p + 1) bool: a ``patch``-pixel square at pixel (8y, 8x) is foreground enough."""
    p = patch // CELL
    sat = integral(counts)
    n = sat[p:, p:] - sat[:-p, p:] - sat[p:, :-p] + sat[:-p, :-p]
    return (n.astype(np.float64) / float(patch * patch)) >= min_foreground


def grid_positions(length: int, patch: int, overlap: int) -> list[int]:
    """Start offsets of ``patch``-long windows with ``overlap`` covering ``length``; the last
    window is shifted back to end at the edge (so it may overlap more)."""
    stride = patch - overlap
    n = max(1, math.ceil((length - patch) / stride) + 1)
    return sorted({min(i * stride, length - patch) for i in range(n)})


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (3, H, W) uint8/uint16 image to ``size``, same dtype."""
    maxval = PIXEL_MAX[pixels.dtype]
    x = F.interpolate(pixels.to(torch.float32)[None], size=size, mode="bicubic", align_corners=False,
                      antialias=True)[0]
    return x.clamp(0, maxval).round().to(pixels.dtype)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass
class _Image:
    """One usable image. Pixel positions are after EXIF orientation and any upscaling."""

    name: str                       # relative path (posix) or "image_0003" for tensor sources
    path: str | None                # file to re-read when not cached; None for tensor sources
    mask_path: str | None
    height: int
    width: int
    bits: int
    upscale: tuple[int, int] | None  # size the decoded image is resized to, if it was too small
    pixels: torch.Tensor | None      # cached (3, H, W) uint8/uint16
    counts: np.ndarray | None = None  # (H//8, W//8) uint8 foreground per cell; None = masking off
    valid: np.ndarray | None = None   # random mode: bool map of foreground-valid patch corners
    grid: np.ndarray | None = None    # grid mode: (N, 2) int64 kept (top, left) in pixels
    grid_fg: np.ndarray | None = None  # grid mode: (N,) foreground fraction of each kept patch


class _Spec(NamedTuple):
    """One patch: a square ``size`` crop of image ``img`` at (top, left), resized to the patch."""

    img: int
    top: int
    left: int
    size: int
    fg: float


class PatchDataset:
    """Scanned images, a by-image train/validation split and a deterministic patch stream.

    Build with :func:`build_dataset`. Picklable (loader workers get a copy).
    """

    def __init__(self, cfg: DataConfig, source: str, images: list[_Image], skipped: list[dict],
                 notes: list[dict]):
        self.cfg = cfg
        self.source = source
        self._images = images
        self._skipped = skipped
        self._notes = notes
        self._split()
        self._build_grid_index()
        self._summary: dict | None = None
        self._epoch_cache: dict[int, np.ndarray] = {}

    # -- split -------------------------------------------------------------------------------

    def _split(self) -> None:
        n = len(self._images)
        f = self.cfg.val_fraction
        if n < 2:
            n_val, why = 0, "none: only 1 usable image (validation needs at least 2)"
        elif f == 0:
            n_val, why = 0, "none: val_fraction is 0"
        else:
            n_val = min(n - 1, max(1, round(n * f)))
            why = f"{n_val} of {n} images held out (val_fraction {f}, seed {self.cfg.seed})"
        chosen = set(_rng(self.cfg.seed, _SPLIT).permutation(n)[:n_val].tolist())
        self._val = [i for i in range(n) if i in chosen]
        self._train = [i for i in range(n) if i not in chosen]
        self._validation_note = why

    def _build_grid_index(self) -> None:
        self._train_grid = self._val_grid = None
        if self.cfg.sampling != "grid":
            return

        def index(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
            rows = [np.column_stack([np.full(len(self._images[i].grid), i), self._images[i].grid])
                    for i in ids]
            fg = [self._images[i].grid_fg for i in ids]
            if not rows:
                return np.zeros((0, 3), np.int64), np.zeros(0, np.float64)
            return np.concatenate(rows).astype(np.int64), np.concatenate(fg).astype(np.float64)

        self._train_grid = index(self._train)
        self._val_grid = index(self._val)

    # -- pixels ------------------------------------------------------------------------------

    def _pixels(self, i: int) -> torch.Tensor:
        rec = self._images[i]
        if rec.pixels is not None:
            return rec.pixels
        try:
            t = read_image(rec.path, min_side=self.cfg.patch_size if rec.upscale else 0).pixels
        except ImageMemoryError as e:
            raise VAEFTError(f"{rec.name}: {e}") from None
        except ImageReadError as e:
            raise VAEFTError(f"{rec.name}: could not be read again ({e}); it was readable when the "
                             "dataset was built - was it changed or deleted? Rebuild the dataset.") from None
        if rec.upscale is not None:
            t = resize_pixels(t, rec.upscale)
        if tuple(t.shape[1:]) != (rec.height, rec.width):
            raise VAEFTError(f"{rec.name}: its size changed since the dataset was built; rebuild the dataset")
        return t

    def _user_mask(self, i: int) -> torch.Tensor:
        """(H, W) bool mask of image ``i`` from mask_dir (re-read; used for previews only)."""
        rec = self._images[i]
        mask = _read_mask(rec.mask_path)
        if rec.upscale is not None:
            mask = F.interpolate(mask[None, None].float(), size=rec.upscale, mode="nearest")[0, 0] > 0.5
        return mask

    def _extract(self, specs: list[_Spec]) -> torch.Tensor:
        """Specs -> (n, 3, P, P) float32 in [-1, 1]; each uncached image is read once."""
        p = self.cfg.patch_size
        what = f"building a batch of {len(specs)} patches of {p}×{p}"
        hint = "use fewer patches at a time (batch_size, val_patches or --count) or a smaller patch_size"
        _check_cpu_memory(len(specs) * 3 * p * p * 4, what, hint)
        with _named_oom(what, hint):
            out = torch.empty((len(specs), 3, p, p), dtype=torch.float32)
        for i in sorted(set(s.img for s in specs)):
            with _named_oom(f"reading {self._images[i].name}", "close other programs or lower cache_mb"):
                pix = self._pixels(i)
            for j, s in enumerate(specs):
                if s.img != i:
                    continue
                crop = pix[:, s.top:s.top + s.size, s.left:s.left + s.size]
                if s.size != p:
                    crop = F.interpolate(to_unit(crop)[None], size=(p, p), mode="bilinear", align_corners=False,
                                         antialias=True)[0].clamp_(0, 1)
                    torch.addcmul(torch.tensor(-1.0), crop, torch.tensor(2.0), out=out[j])
                else:  # in place: integer -> float copy, scale, shift (max / (max / 2) is exactly 2)
                    out[j].copy_(crop).div_(PIXEL_MAX[pix.dtype] / 2).sub_(1.0)
        return out

    # -- sampling ----------------------------------------------------------------------------

    def _random_spec(self, i: int, rng: np.random.Generator, ctx: dict, jitter: float) -> _Spec:
        """One random patch of image ``i``: corner on the 8-pixel lattice, foreground-valid."""
        rec = self._images[i]
        p8 = self.cfg.patch_size // CELL
        h8, w8 = rec.height // CELL, rec.width // CELL
        cmax = min(h8, w8)

        def jittered() -> int:
            s = rng.uniform(1 - jitter, 1 + jitter)
            return int(min(cmax, max(1, round(p8 * s))))

        if rec.valid is None:  # masking off: any lattice position
            c = jittered() if jitter > 0 else p8
            top, left = int(rng.integers(0, h8 - c + 1)), int(rng.integers(0, w8 - c + 1))
            return _Spec(i, top * CELL, left * CELL, c * CELL, 1.0)

        if i not in ctx:  # per batch, per image: valid corners and the summed-area table
            ctx[i] = (np.flatnonzero(rec.valid), integral(rec.counts))
        idx, sat = ctx[i]
        vw = rec.valid.shape[1]
        y = x = 0
        tries = self.cfg.fg_tries if jitter > 0 else 1
        for _ in range(tries):
            y, x = divmod(int(idx[rng.integers(0, len(idx))]), vw)
            if jitter == 0:
                return _Spec(i, y * CELL, x * CELL, p8 * CELL, box_fraction(sat, y, x, p8))
            c = jittered()
            # same centre as a valid patch, clamped into the image
            top = min(max(0, round(y + (p8 - c) / 2)), h8 - c)
            left = min(max(0, round(x + (p8 - c) / 2)), w8 - c)
            fg = box_fraction(sat, top, left, c)
            if fg >= self.cfg.min_foreground:
                return _Spec(i, top * CELL, left * CELL, c * CELL, fg)
        # no jittered crop was foreground enough: the last valid patch unscaled is (exactly)
        return _Spec(i, y * CELL, x * CELL, p8 * CELL, box_fraction(sat, y, x, p8))

    def _random_specs(self, ids: list[int], n: int, rng: np.random.Generator, jitter: float) -> list[_Spec]:
        picks = rng.integers(0, len(ids), size=n)  # image first, uniformly: per-image balancing
        ctx: dict = {}
        return [self._random_spec(ids[int(k)], rng, ctx, jitter) for k in picks]

    def _grid_specs(self, grid: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> list[_Spec]:
        pos, fg = grid
        p = self.cfg.patch_size
        return [_Spec(int(pos[r, 0]), int(pos[r, 1]), int(pos[r, 2]), p, float(fg[r])) for r in rows]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:
                self._epoch_cache.clear()
            self._epoch_cache[epoch] = _rng(self.cfg.seed, _EPOCH, epoch).permutation(len(self._train_grid[0]))
        return self._epoch_cache[epoch]

    def _batch_specs(self, g: int, batch_size: int) -> list[_Spec]:
        """Patches of global batch ``g``: a pure function of (seed, g, batch_size, dataset)."""
        if self.cfg.sampling == "grid":
            return self._grid_specs(self._train_grid, self._batch_keys(g, batch_size).numpy())
        return self._random_specs(self._train, batch_size, _rng(self.cfg.seed, _TRAIN, g), self.cfg.scale_jitter)

    def _train_batch(self, g: int, batch_size: int) -> torch.Tensor:
        return self._extract(self._batch_specs(g, batch_size))

    def _batch_keys(self, g: int, batch_size: int) -> torch.Tensor | None:
        """Grid mode: the training-grid row of each patch of global batch ``g`` (a stable id of
        the patch for the whole run). Random mode: None (patches are not repeated)."""
        if self.cfg.sampling != "grid":
            return None
        n = len(self._train_grid[0])
        flat = g * batch_size + np.arange(batch_size, dtype=np.int64)
        return torch.from_numpy(np.array([self._epoch_order(int(e))[int(r)] for e, r in zip(flat // n, flat % n)],
                                         dtype=np.int64))

    def _sample_specs(self, count: int, seed: int, tag: int) -> list[_Spec]:
        """``count`` seeded patches of training images (a seeded subset of the grid in grid mode)."""
        rng = _rng(seed, tag)
        if self.cfg.sampling == "grid":
            n = len(self._train_grid[0])
            rows = rng.choice(n, size=min(count, n), replace=False)
            return self._grid_specs(self._train_grid, np.sort(rows))
        return self._random_specs(self._train, count, rng, self.cfg.scale_jitter)

    # -- public ------------------------------------------------------------------------------

    # settings that do not choose or change patches (and where the masks are kept)
    _ORDER_FREE = ("cache_mb", "num_workers", "mask_dir")

    def order_signature(self) -> dict:
        """What fixes the training patch stream, JSON-like: the data settings that choose or change
        patches, whether masks are used, and the training images (relative name, size). Checkpoints
        keep it so that a resume on other data is refused; speed settings and folder locations are
        left out (a moved data folder still resumes)."""
        sig = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg)
               if f.name not in self._ORDER_FREE}
        sig["masked"] = self.cfg.mask_dir is not None
        sig["train_images"] = [f"{self._images[i].name} {self._images[i].width}x{self._images[i].height}"
                               for i in self._train]
        return sig

    def train_batches(self, batch_size: int, *, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                      num_workers: int | None = None, pin_memory: bool = False,
                      with_keys: bool = False, start_method: str | None = None) -> Iterator:
        """Endless stream of training batches, (batch_size, 3, P, P) float32 in [-1, 1], CPU, not augmented.
        With ``with_keys``: (batch, keys) pairs, keys an int64 id per patch in grid mode (the same
        patch has the same id all run: the trainer's latent cache uses it) and None in random mode.

        Batch ``k`` (counting from 0 at ``start_batch=0``) of ``rank`` is global batch
        ``k * world_size + rank``, a function of (seed, that number) only: resuming with
        ``start_batch=k`` yields exactly the rest of the uninterrupted stream, for any
        ``num_workers`` (default ``cfg.num_workers``). ``pin_memory`` only acts when CUDA is
        available. ``start_method``: the workers' multiprocessing start method (default: Python's;
        see :func:`worker_start_method`).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise VAEFTError(f"batch_size must be a positive whole number, got {batch_size!r}")
        if start_batch < 0:
            raise VAEFTError(f"start_batch must be >= 0, got {start_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise VAEFTError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
        workers = self.cfg.num_workers if num_workers is None else int(num_workers)
        if workers < 0:
            raise VAEFTError(f"num_workers must be >= 0, got {workers}")
        stream = _BatchStream(self, batch_size, start_batch, rank, world_size, with_keys)
        pin = pin_memory and torch.cuda.is_available()
        if workers == 0:
            if not pin:
                return iter(stream)
            return ((b[0].pin_memory(), b[1]) if with_keys else b.pin_memory() for b in stream)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin,
                            worker_init_fn=_worker_init, prefetch_factor=2,
                            multiprocessing_context=start_method)
        return iter(loader)

    def patches_at(self, batch: int, count: int) -> torch.Tensor:
        """Training batch ``batch`` at batch size ``count`` (the ``batch``-th item of
        ``train_batches(count)``): (count, 3, P, P) float32 in [-1, 1], not augmented, read here
        (no loader workers)."""
        return self._train_batch(batch, count)

    def inspect_batch(self, batch: int, count: int) -> dict:
        """Training batch ``batch`` at batch size ``count`` with what each patch was cut from:
        {"patches": (n, 3, P, P) in [-1, 1], "foreground": (n, P, P) bool or None when masking is
        off, "images": relative name per patch}."""
        specs = self._batch_specs(batch, count)
        x = self._extract(specs)
        return {"patches": x, "foreground": self._patch_masks(specs, signed_to_unit(x)),
                "images": [self._images[s.img].name for s in specs]}

    def val_patches(self, count: int, *, seed: int | None = None) -> torch.Tensor:
        """(n, 3, P, P) float32 in [-1, 1] from validation images only, n <= count.

        Random mode: a seeded sample (``seed`` defaults to ``cfg.seed``), images in turn, no
        scale jitter. Grid mode: evenly spaced grid patches of the validation images.
        """
        if not self._val:
            raise VAEFTError(f"no validation images: {self._validation_note}. Add images or set val_fraction "
                             "above 0 (validation is split by image).")
        if count < 1:
            raise VAEFTError(f"val_patches count must be at least 1, got {count}")
        if self.cfg.sampling == "grid":
            n = len(self._val_grid[0])
            rows = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
            return self._extract(self._grid_specs(self._val_grid, rows))
        rng = _rng(self.cfg.seed if seed is None else seed, _VAL)
        ctx: dict = {}
        specs = [self._random_spec(self._val[k % len(self._val)], rng, ctx, 0.0) for k in range(count)]
        return self._extract(specs)

    def preview(self, count: int = 16, *, seed: int = 0) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1]: a grid of ``count`` seeded training patches with the
        foreground mask's outline (morphological gradient) drawn in red."""
        import kornia

        specs = self._sample_specs(max(1, count), seed, _PREVIEW)
        x = signed_to_unit(self._extract(specs))
        masks = self._patch_masks(specs, x)
        if masks is not None:
            edge = kornia.morphology.gradient(masks[:, None].float(), torch.ones(3, 3))[:, 0] > 0
            red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
            x = torch.where(edge[:, None], red, x)
        return image_grid(x, pad=2, margin=2)

    def _patch_masks(self, specs: list[_Spec], x01: torch.Tensor) -> torch.Tensor | None:
        """(n, P, P) bool foreground of extracted patches, or None when masking is off."""
        if self.cfg.mask_dir:
            p = self.cfg.patch_size
            out = torch.zeros((len(specs), p, p), dtype=torch.bool)
            for i in sorted(set(s.img for s in specs)):
                full = self._user_mask(i)
                for j, s in enumerate(specs):
                    if s.img == i:
                        m = full[s.top:s.top + s.size, s.left:s.left + s.size].float()
                        out[j] = F.interpolate(m[None, None], size=(p, p), mode="nearest")[0, 0] > 0.5
            return out
        if self.cfg.foreground_threshold > 0:
            return luminance(x01) > self.cfg.foreground_threshold
        return None

    def summary(self) -> dict:
        """JSON-serialisable description of what will be trained on (a fresh copy each call).

        Keys: source, patch_size, sampling, alpha (how transparency is handled), masking,
        images_used (relative paths), images_skipped ([{path, reason}]), notes ([{path, note}]:
        orientation, ICC conversion, alpha, upscaling), train_images / val_images (counts),
        train_paths / val_paths, validation (why that many), patches_per_epoch (+ _definition),
        mean_foreground (mean foreground fraction of 256 seeded training patches; of all grid
        patches in grid mode; 1.0 when masking is off), bit_depth, cached_images, cache_mb_used, seed.
        """
        if self._summary is not None:
            return json.loads(json.dumps(self._summary))
        cfg = self.cfg
        p = cfg.patch_size
        if cfg.sampling == "grid":
            ppe = int(len(self._train_grid[0]))
            ppe_def = "number of grid patches (with enough foreground) in the training images"
        else:
            ppe = int(sum((self._images[i].height * self._images[i].width) // (p * p) for i in self._train))
            ppe_def = "sum over training images of floor(area / patch_size²)"
        masking = _masking_text(cfg)
        if masking == "off":
            mean_fg = 1.0
        elif cfg.sampling == "grid":
            mean_fg = float(self._train_grid[1].mean()) if len(self._train_grid[1]) else 0.0
        else:
            mean_fg = float(np.mean([s.fg for s in self._sample_specs(256, cfg.seed, _SUMMARY)]))
        cached = [r for r in self._images if r.pixels is not None]
        self._summary = {
            "source": self.source,
            "patch_size": p,
            "sampling": cfg.sampling,
            "alpha": f"transparent images are {ALPHA_POLICY}",
            "masking": masking,
            "images_used": [r.name for r in self._images],
            "images_skipped": list(self._skipped),
            "notes": list(self._notes),
            "train_images": len(self._train),
            "val_images": len(self._val),
            "train_paths": [self._images[i].name for i in self._train],
            "val_paths": [self._images[i].name for i in self._val],
            "validation": self._validation_note,
            "patches_per_epoch": ppe,
            "patches_per_epoch_definition": ppe_def,
            "mean_foreground": round(mean_fg, 4),
            "bit_depth": {str(b): sum(r.bits == b for r in self._images) for b in (8, 16)},
            "cached_images": len(cached),
            "cache_mb_used": round(sum(r.pixels.numel() * r.pixels.element_size() for r in cached) / 2**20, 1),
            "seed": cfg.seed,
        }
        return self.summary()

    def __repr__(self) -> str:
        return (f"PatchDataset({self.source!r}, {len(self._train)} train + {len(self._val)} val images, "
                f"patch {self.cfg.patch_size}, {self.cfg.sampling})")


class _BatchStream(IterableDataset):
    """Whole batches; worker w of W yields batches start+w, start+w+W, ... (DataLoader
    interleaves workers round-robin, so the order is the single-process order)."""

    def __init__(self, data: PatchDataset, batch_size: int, start: int, rank: int, world_size: int,
                 with_keys: bool = False):
        self.data, self.batch_size, self.start = data, batch_size, start
        self.rank, self.world_size, self.with_keys = rank, world_size, with_keys

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + w
        while True:
            g = k * self.world_size + self.rank
            batch = self.data._train_batch(g, self.batch_size)
            yield (batch, self.data._batch_keys(g, self.batch_size)) if self.with_keys else batch
            k += nw


def worker_start_method(importable: bool, methods: list[str] | None = None) -> str | None:
    """How loader workers can start, or None when they cannot (load in the main process then).

    ``importable``: whether a fresh interpreter can import this package by its module name. Spawned
    (or forkserver) workers re-import it; ComfyUI loads custom nodes under a file-path module name
    that no other process can import, so there only "fork" works, and Windows has no fork.
    """
    if importable:
        return None  # Python's default start method is fine
    methods = multiprocessing.get_all_start_methods() if methods is None else methods
    return "fork" if "fork" in methods else None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; avoid oversubscribing cores


def _masking_text(cfg: DataConfig) -> str:
    if cfg.mask_dir:
        return f"mask folder {cfg.mask_dir} (> 0.5 = foreground), patch kept if >= {cfg.min_foreground:g} foreground"
    if cfg.foreground_threshold > 0:
        return (f"automatic: luminance > {cfg.foreground_threshold:g}, patch kept if >= "
                f"{cfg.min_foreground:g} foreground")
    return "off"


# ---------------------------------------------------------------------------------------------
# Building


def _read_mask(path: str, min_side: int = 0) -> torch.Tensor:
    """(H, W) bool: mask image > half its range (colour masks: mean of channels)."""
    dec = read_image(path, min_side)
    return to_unit(dec.pixels).mean(0) > 0.5


def _available_memory() -> int | None:
    """Bytes of CPU memory the kernel can give without swapping (Linux MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_cpu_memory(nbytes: int, what: str, hint: str) -> None:
    """VAEFTError before allocating ``nbytes`` that cannot fit: Linux overcommits, so such an
    allocation often "succeeds" and the process is killed later while filling it."""
    if nbytes < 256 << 20:  # small: not worth reading /proc per batch
        return
    avail = _available_memory()
    if avail is not None and nbytes > avail:
        raise VAEFTError(f"out of CPU memory {what}: it needs {nbytes / 2**30:.1f} GiB, "
                         f"{avail / 2**30:.1f} GiB is available; {hint}")


@contextlib.contextmanager
def _named_oom(what: str, hint: str):
    """Turn an allocator failure (MemoryError, torch's CPU allocator error) into a VAEFTError."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise VAEFTError(f"out of CPU memory {what} ({detail}); {hint}") from None


def _prepare(name: str, path: str | None, dec: Decoded, mask_path: str | None, cfg: DataConfig
             ) -> tuple[_Image | None, str | None, list[str]]:
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
            mask = _read_mask(mask_path, p if cfg.upscale_small else 0)
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
    rec = _Image(name, path, mask_path, h, w, dec.bits, upscale, pixels)

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


def _list_folder(root: str, cfg: DataConfig) -> tuple[list[tuple[str, str]], list[dict]]:
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


def _find_masks(files: list[tuple[str, str]], mask_dir: str) -> dict[str, str]:
    """Image relative path -> mask file with the same relative path and stem (any image extension)."""
    if not os.path.isdir(mask_dir):
        what = describe_path(mask_dir)
        if what is None:
            raise VAEFTError(f"mask folder not found: {mask_dir}")
        raise VAEFTError(f"mask folder {mask_dir} is {what}, not a folder; give the folder that holds the masks")
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


def from_folder(path: str | os.PathLike, cfg: DataConfig) -> PatchDataset:
    """Scan ``path`` (recursively when ``cfg.recursive``); see :func:`build_dataset`."""
    check_config(cfg)
    root = os.fspath(path)
    if not os.path.isdir(root):
        what = describe_path(root)
        if what is None:
            raise VAEFTError(f"data folder not found: {root}")
        raise VAEFTError(f"data folder {root} is {what}, not a folder; give the folder that holds the images")
    files, skipped = _list_folder(root, cfg)
    if not files and not skipped:
        raise VAEFTError(f"data folder {root} is empty; put PNG, JPEG, WebP or TIFF images in it")
    masks = _find_masks(files, cfg.mask_dir) if cfg.mask_dir else {}
    min_side = cfg.patch_size if cfg.upscale_small else 0

    def load(item: tuple[str, str]):
        rel, full = item
        try:
            dec = read_image(full, min_side)
        except ImageMemoryError as e:  # the machine's state, not the file's: stop, do not skip
            raise VAEFTError(f"{rel}: {e}") from None
        except ImageReadError as e:
            return rel, full, None, str(e), []
        h, w = dec.pixels.shape[1:]
        try:
            with _named_oom(f"preparing {rel} ({w}×{h} pixels)", "close other programs, lower cache_mb, "
                                                                   "or downscale the image"):
                return (rel, full) + _prepare(rel, full, dec, masks.get(rel), cfg)
        except ImageMemoryError as e:  # reading its mask
            raise VAEFTError(f"{rel}: {e}") from None

    images: list[_Image] = []
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
    return PatchDataset(cfg, root, images, skipped, notes)


def from_tensor(images: torch.Tensor, cfg: DataConfig | None = None) -> PatchDataset:
    """An in-memory batch, (B, C, H, W) float in [0, 1] with C = 1, 3 or 4 (RGBA composited over
    black), as the dataset's images ``image_0000``, ... (stored as uint16, all kept in memory)."""
    cfg = cfg or DataConfig()
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
    _check_cpu_memory(images.numel() * 4, what, hint)
    with _named_oom(what, hint):
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
            img = img[:3] * img[3:]
            note.append("alpha " + ALPHA_POLICY)
        elif img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        name = f"image_{b:04d}"
        with _named_oom(f"preparing {name} of the image batch", hint):
            dec = Decoded((img * 65535).round().to(torch.uint16).contiguous(), 16, note)
            rec, reason, rec_notes = _prepare(name, None, dec, None, cfg)
        notes += [{"path": name, "note": n} for n in rec_notes]
        if rec is None:
            skipped.append({"path": name, "reason": reason})
        else:
            recs.append(rec)
    if not recs:
        raise VAEFTError("no usable image in the batch: " + "; ".join(f"{s['path']}: {s['reason']}"
                                                                         for s in skipped[:_MAX_LISTED]))
    return PatchDataset(cfg, f"tensor ({x.shape[0]} images)", recs, skipped, notes)


def build_dataset(source: str | os.PathLike | torch.Tensor, cfg: DataConfig) -> PatchDataset:
    """A :class:`PatchDataset` from a folder (path) or an image batch (BCHW float in [0, 1]).

    Raises VAEFTError for a missing/empty folder or when no image is usable (with each file's
    reason); otherwise unusable files are listed in ``summary()["images_skipped"]``.
    """
    if isinstance(source, torch.Tensor):
        return from_tensor(source, cfg)
    if isinstance(source, (str, os.PathLike)):
        return from_folder(source, cfg)
    raise VAEFTError(f"data source must be a folder path or an image tensor, got {type(source).__name__}")


def preview_patches(data: PatchDataset, count: int = 4, seed: int = 0) -> torch.Tensor:
    """Fixed patches to watch during training, (n, 3, P, P) in [-1, 1]: held-out ones when the dataset
    has validation images, else patches from far along the training stream (rarely trained on early)."""
    if data.summary().get("val_images"):
        return data.val_patches(count, seed=seed)
    return data.patches_at(10**6, count)
