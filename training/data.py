"""Patch sampling and streaming over scanned images (:mod:`training.scan`).

Tensors here are BCHW float32 in [-1, 1] unless stated, with C = :attr:`PatchDataset.channels`: 3 (RGB)
by default, 4 (RGBA, straight alpha: :mod:`training.alpha`) for a VAE of RGBA images
(:meth:`PatchDataset.for_channels`). Images keep their transparency from the file to the patch; for RGB
patches a transparent image is composited over black (RGB × alpha), for RGBA patches an image without
transparency gets alpha 1 (opaque).

- Split: whole images go to validation (``val_fraction``, seeded), so no validation pixel is
  ever trained on.
- Random mode picks an image uniformly (so one huge image does not dominate), then a
  foreground-valid position uniformly (:mod:`training.foreground`). Grid mode visits every grid
  patch once per epoch in a seeded order.
- Stream: batch ``k`` of rank ``r`` is global batch ``g = k * world_size + r``; its content is a
  function of (seed, g) only, whatever the number of loader workers, so a run resumes exactly
  with ``start_batch`` and DDP ranks get disjoint shards.

Augmentation is separate (:mod:`training.augment`), applied by the trainer on the device.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .alpha import STRAIGHT, on_checkerboard, over_black_pixels, resize
from .config import CELL, DataConfig
from .errors import VAEFTError
from .files import FolderLock
from .foreground import box_fraction, integral, luminance, resize_pixels
from .imageio import ALPHA_POLICY, PIXEL_MAX, ImageMemoryError, ImageReadError, read_image, signed_to_unit, to_unit
from .memory import check_cpu_memory, out_of_memory_named
from .plot import image_grid
from .scan import ImageRecord, read_mask, scan_folder, scan_tensor

# Stream tags: independent random streams derived from one seed.
_SPLIT, _TRAIN, _EPOCH, _VAL, _PREVIEW, _SUMMARY = 1, 2, 3, 4, 5, 6


class _Spec(NamedTuple):
    """One patch: a square ``size`` crop of image ``img`` at (top, left), resized to the patch."""

    img: int
    top: int
    left: int
    size: int
    fg: float


class PatchDataset:
    """Scanned images, a by-image train/validation split and a deterministic patch stream.

    Build with :func:`build_dataset`. Picklable (loader workers get a copy). Patches have
    :attr:`channels` channels: 3 until a VAE's are chosen with :meth:`for_channels`.
    """

    channels = 3     # the patches' channels: 3 (RGB) or 4 (RGBA, straight alpha)
    chosen = False   # whether they were chosen for a VAE (for_channels); before that the summary speaks of both

    def __init__(self, cfg: DataConfig, source: str, images: list[ImageRecord], skipped: list[dict],
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

    # -- channels ----------------------------------------------------------------------------

    def for_channels(self, channels: int) -> "PatchDataset":
        """This dataset (images, split, patch stream) giving ``channels``-channel patches, as a VAE of that
        many image channels takes them: 3, transparent images composited over black (RGB × alpha); 4, RGBA
        with straight alpha, images without transparency opaque (alpha 1, as ComfyUI pads them). Itself
        when it was chosen for those already, else a copy sharing the images."""
        if channels not in (3, 4):
            raise VAEFTError(f"a VAE of {channels}-channel images: patches are RGB (3 channels) or RGBA (4)")
        if channels == self.channels and self.chosen:
            return self
        out = copy.copy(self)
        out.channels, out.chosen, out._summary, out._epoch_cache = channels, True, None, {}
        return out

    @property
    def alpha_images(self) -> int:
        """How many of the images have transparency (an alpha channel)."""
        return sum(r.alpha for r in self._images)

    def alpha_note(self) -> str | None:
        """What the patches' channels do to the images, said once to the user (None when nothing, or before
        they were chosen for a VAE): for RGBA patches the images without alpha made opaque, for RGB patches
        the transparent ones composited."""
        n, k = len(self._images), self.alpha_images
        if not self.chosen:
            return None
        if self.channels == 4 and k < n:
            return (f"{n - k} of {n} images have no alpha channel: given alpha 1.0 (opaque) for this VAE of RGBA "
                    "images, as ComfyUI pads them")
        if self.channels == 3 and k:
            return (f"{k} of {n} images have an alpha channel: {ALPHA_POLICY} for this VAE of RGB images (the "
                    "transparency is not trained)")
        return None

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
            t = read_image(rec.path, min_side=self.cfg.patch_size if rec.upscale else 0, alpha=True).pixels
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
        mask = read_mask(rec.mask_path)
        if rec.upscale is not None:
            mask = F.interpolate(mask[None, None].float(), size=rec.upscale, mode="nearest")[0, 0] > 0.5
        return mask

    def _extract(self, specs: list[_Spec]) -> torch.Tensor:
        """Specs -> (n, C, P, P) float32 in [-1, 1] (C = :attr:`channels`); each uncached image is read once.
        A crop is composited over black (RGB patches of a transparent image: integer arithmetic, as when the
        pack composited right after decoding) or made opaque (RGBA patches of an image without alpha), and
        resized where the patch was scaled (RGBA premultiplied, see :func:`training.alpha.resize`)."""
        p, c = self.cfg.patch_size, self.channels
        what = f"building a batch of {len(specs)} patches of {p}×{p}"
        hint = "use fewer patches at a time (batch_size, val_patches or --count) or a smaller patch_size"
        check_cpu_memory(len(specs) * c * p * p * 4, what, hint)
        with out_of_memory_named(what, hint):
            out = torch.empty((len(specs), c, p, p), dtype=torch.float32)
        for i in sorted(set(s.img for s in specs)):
            with out_of_memory_named(f"reading {self._images[i].name}", "close other programs or lower cache_mb"):
                pix = self._pixels(i)
            for j, s in enumerate(specs):
                if s.img != i:
                    continue
                crop = pix[:, s.top:s.top + s.size, s.left:s.left + s.size]
                if crop.shape[0] > c:
                    crop = over_black_pixels(crop)
                dst = out[j, :crop.shape[0]]
                if s.size != p:
                    crop = resize(to_unit(crop)[None], (p, p), mode="bilinear", antialias=True)[0].clamp_(0, 1)
                    torch.addcmul(torch.tensor(-1.0), crop, torch.tensor(2.0), out=dst)
                else:  # in place: integer -> float copy, scale, shift (max / (max / 2) is exactly 2)
                    dst.copy_(crop).div_(PIXEL_MAX[pix.dtype] / 2).sub_(1.0)
                if crop.shape[0] < c:
                    out[j, 3] = 1.0  # no alpha in the image: opaque
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
        if self.channels != 3:  # (absent for RGB patches: checkpoints written before RGBA existed still resume)
            sig["image_channels"] = self.channels
        sig["train_images"] = [f"{self._images[i].name} {self._images[i].width}x{self._images[i].height}"
                               for i in self._train]
        return sig

    def train_batches(self, batch_size: int, *, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                      num_workers: int | None = None, pin_memory: bool = False,
                      with_keys: bool = False, start_method: str | None = None) -> Iterator:
        """Endless stream of training batches, (batch_size, C, P, P) float32 in [-1, 1], CPU, not augmented.
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
        ``train_batches(count)``): (count, C, P, P) float32 in [-1, 1], not augmented, read here
        (no loader workers)."""
        return self._train_batch(batch, count)

    def inspect_batch(self, batch: int, count: int) -> dict:
        """Training batch ``batch`` at batch size ``count`` with what each patch was cut from:
        {"patches": (n, C, P, P) in [-1, 1], "foreground": (n, P, P) bool or None when masking is
        off, "images": relative name per patch}."""
        specs = self._batch_specs(batch, count)
        x = self._extract(specs)
        return {"patches": x, "foreground": self._patch_masks(specs, _over_black01(signed_to_unit(x))),
                "images": [self._images[s.img].name for s in specs]}

    def val_patches(self, count: int, *, seed: int | None = None) -> torch.Tensor:
        """(n, C, P, P) float32 in [-1, 1] from validation images only, n <= count.

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
        foreground mask's outline (morphological gradient) drawn in red. When images have transparency
        it is shown over a grey checkerboard (what the files hold; an RGB VAE trains on them over black)."""
        import kornia  # lazy: kornia takes a second to import, and only the preview uses it here

        specs = self._sample_specs(max(1, count), seed, _PREVIEW)
        x = signed_to_unit((self.for_channels(4) if self.alpha_images else self)._extract(specs))
        masks = self._patch_masks(specs, _over_black01(x))
        x = on_checkerboard(x)
        if masks is not None:
            edge = kornia.morphology.gradient(masks[:, None].float(), torch.ones(3, 3))[:, 0] > 0
            red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
            x = torch.where(edge[:, None], red, x)
        return image_grid(x, pad=2, margin=2)

    def _patch_masks(self, specs: list[_Spec], x01: torch.Tensor) -> torch.Tensor | None:
        """(n, P, P) bool foreground of extracted patches (``x01``: RGB in [0, 1], transparent ones over
        black), or None when masking is off."""
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

        Keys: source, patch_size, sampling, image_channels (of the patches: 3 RGB, 4 RGBA), alpha (how
        transparency is handled, in words), alpha_images (how many have it), masking,
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
            "image_channels": self.channels,
            "alpha": self._alpha_text(),
            "alpha_images": self.alpha_images,
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

    def _alpha_text(self) -> str:
        """The summary's "alpha": the convention, and what happened to this dataset's images."""
        if not self.chosen:  # no VAE yet (the dataset node, `patches`): what either kind of VAE will get
            k, n = self.alpha_images, len(self._images)
            return (f"{k} of {n} images have transparency, kept as {STRAIGHT}: a VAE of RGBA images trains on it "
                    f"(images without it get alpha 1.0), a VAE of RGB images on the images {ALPHA_POLICY}")
        if self.channels == 4:
            text = f"RGBA patches: {STRAIGHT}"
        else:
            text = f"RGB patches: transparent images are {ALPHA_POLICY}"
        note = self.alpha_note()
        return f"{text}; {note}" if note else text

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
    FolderLock.close_inherited()  # a forked worker must not keep the run folder's lock alive


def _masking_text(cfg: DataConfig) -> str:
    if cfg.mask_dir:
        return f"mask folder {cfg.mask_dir} (> 0.5 = foreground), patch kept if >= {cfg.min_foreground:g} foreground"
    if cfg.foreground_threshold > 0:
        return (f"automatic: luminance > {cfg.foreground_threshold:g}, patch kept if >= "
                f"{cfg.min_foreground:g} foreground")
    return "off"


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def from_folder(path: str | os.PathLike, cfg: DataConfig) -> PatchDataset:
    """A dataset of the images in folder ``path`` (see :func:`training.scan.scan_folder`)."""
    return PatchDataset(cfg, *scan_folder(path, cfg))


def from_tensor(images: torch.Tensor, cfg: DataConfig | None = None) -> PatchDataset:
    """A dataset of an in-memory batch (see :func:`training.scan.scan_tensor`)."""
    return PatchDataset(cfg or DataConfig(), *scan_tensor(images, cfg or DataConfig()))


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


def _over_black01(x01: torch.Tensor) -> torch.Tensor:
    """(n, 3 or 4, H, W) in [0, 1] -> RGB, RGBA composited over black (what foreground is judged on)."""
    return x01[:, :3] * x01[:, 3:] if x01.shape[1] == 4 else x01


def preview_patches(data: PatchDataset, count: int = 4, seed: int = 0) -> torch.Tensor:
    """Fixed patches to watch during training, (n, C, P, P) in [-1, 1]: held-out ones when the dataset
    has validation images, else patches from far along the training stream (rarely trained on early)."""
    if data.summary().get("val_images"):
        return data.val_patches(count, seed=seed)
    return data.patches_at(10**6, count)
