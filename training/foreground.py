"""Which pixels count and where patches may sit: small pure functions over images and masks.

A pixel is foreground when its luminance (Rec. 601, [0, 1]) exceeds a threshold, or when the user's
mask says so. Per image a low-resolution map counts foreground pixels per 8×8 cell; patch corners lie
on that 8-pixel lattice, so a patch's foreground fraction is computed exactly from the map's
summed-area table, and the set of valid patch positions is known up front.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .alpha import over_black_pixels, resize
from .config import CELL
from .imageio import PIXEL_MAX, to_unit

LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights, as kornia.color.rgb_to_grayscale


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luminance of (..., 3, H, W) values in [0, 1] -> (..., H, W) in [0, 1]."""
    return LUMA[0] * rgb[..., 0, :, :] + LUMA[1] * rgb[..., 1, :, :] + LUMA[2] * rgb[..., 2, :, :]


def foreground_mask(pixels: torch.Tensor, threshold: float, rows: int = 512) -> torch.Tensor:
    """(3, H, W) uint8/uint16 -> (H, W) bool, luminance > threshold. RGBA (4, H, W), straight alpha: the
    luminance of the image over black (as the pack always judged transparent images). Row blocks bound
    the float copy."""
    out = torch.empty(pixels.shape[1:], dtype=torch.bool)
    for y in range(0, pixels.shape[1], rows):
        block = pixels[:, y:y + rows]
        out[y:y + rows] = luminance(to_unit(over_black_pixels(block) if block.shape[0] == 4 else block)) > threshold
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
    """Bicubic resize of a (3, H, W) uint8/uint16 image to ``size``, same dtype (RGBA (4, H, W), straight
    alpha: interpolated premultiplied, see :func:`training.alpha.resize`)."""
    maxval = PIXEL_MAX[pixels.dtype]
    x = resize(pixels.to(torch.float32)[None], size, mode="bicubic", antialias=True, maxval=maxval)[0]
    return x.clamp(0, maxval).round().to(pixels.dtype)
