"""Reconstruct a large image in overlapping tiles, and measure seams along tile borders.

Tile layout (shared by :func:`reconstruct_tiled` and :func:`seam_error`), along each axis
of length ``size``: tiles of ``tile`` px start at 0, ``tile − overlap``, ``2·(tile −
overlap)``, … and the last one is aligned to the image's end, so every tile lies inside the
image (neighbours overlap by at least ``overlap`` px) and no padding is needed. An axis
shorter than ``tile`` is one tile: it is reflect-padded up to a multiple of the VAE's pixels per latent
(8 or 16) for the VAE and cropped back.

In the overlaps, tiles are blended with complementary raised-cosine weights (each tile's
weight ramps from ~0 at its inner edge to 1 over ``overlap`` px; at the image border
there is no ramp), so a pointwise model gives exactly its untiled result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .device import model_place
from .errors import VAEFTError
from .vae import check_patch_side, pixels_per_latent, reconstruct


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets (px) of the tiles along an axis of ``size`` px (see module docstring)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def tile_boundaries(size: int, tile: int, overlap: int) -> list[int]:
    """Positions (px) of the tile edges inside the image along one axis, sorted.

    Each is the first pixel after an edge: a tile's start (other than 0) or its end
    (other than ``size``). Empty when the axis is a single tile.
    """
    edges = set()
    for s in tile_starts(size, tile, overlap):
        if s > 0:
            edges.add(s)
        if s + tile < size:
            edges.add(s + tile)
    return sorted(edges)


def _check(tile: int, overlap: int) -> None:
    if tile < 8 or tile % 8:
        raise VAEFTError(f"tile must be a positive multiple of 8 px, got {tile}")
    if overlap < 0 or overlap >= tile:
        raise VAEFTError(f"overlap must be at least 0 and less than the tile ({tile} px), got {overlap}")


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, device, dtype) -> torch.Tensor:
    """1-D blend weight of a tile: raised-cosine ramps of ``overlap`` px at its inner edges.

    Ramps are sin²(π(i + ½) / (2·overlap)) rising, cos² falling: two tiles that overlap by
    exactly ``overlap`` px get weights summing to 1; all weights are > 0.
    """
    w = torch.ones(length, device=device, dtype=dtype)
    n = min(overlap, length)
    if n > 0:
        i = torch.arange(n, device=device, dtype=dtype)
        up = torch.sin(math.pi * (i + 0.5) / (2 * n)).pow(2)
        if ramp_start:
            w[:n] = w[:n] * up
        if ramp_end:
            w[length - n:] = w[length - n:] * up.flip(0)
    return w


def _pad_to(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int, int]:
    """``x`` padded at the bottom and right to multiples of ``n`` (the VAE's pixels per latent)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % n, (-w) % n
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


@torch.no_grad()
def reconstruct_tiled(model, image: torch.Tensor, tile: int = 512, overlap: int = 64) -> torch.Tensor:
    """Encode + decode an image of any size tile by tile, blending the overlaps.

    model: diffusers ``AutoencoderKL`` (or anything with ``.encode(x).latent_dist.mode()`` and
    ``.decode(z).sample``); posterior mode, no sampling. image: (B, C, H, W) in [-1, 1], C = 3 or
    4 (RGBA, for a VAE of RGBA images), any H, W >= 1. tile: tile side in px, a multiple of 8; overlap:
    px shared by neighbouring tiles (0 <= overlap < tile). Returns (B, C, H, W) float32 on the image's device,
    unclamped like :func:`training.vae.reconstruct`. Tiles are processed one at a time on the
    model's device (memory grows with ``tile``, not with H·W).
    """
    _check(tile, overlap)
    check_patch_side(model, tile, "tile")
    if image.ndim != 4 or image.shape[1] not in (3, 4):
        raise VAEFTError(f"reconstruct_tiled needs a (B, 3, H, W) image (RGBA: B, 4, H, W), got {tuple(image.shape)}")
    dev = model_place(model)[0] or image.device
    b, c, h, w = image.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float32, device=image.device)
    norm = torch.zeros(1, 1, h, w, dtype=torch.float32, device=image.device)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for yi, y0 in enumerate(ys):
        th = min(tile, h)
        wy = _ramp(th, overlap, yi > 0, yi < len(ys) - 1, image.device, torch.float32)
        for xi, x0 in enumerate(xs):
            tw = min(tile, w)
            wx = _ramp(tw, overlap, xi > 0, xi < len(xs) - 1, image.device, torch.float32)
            crop = image[:, :, y0:y0 + th, x0:x0 + tw]
            padded, ch, cw = _pad_to(crop, pixels_per_latent(model))
            rec = reconstruct(model, padded.to(dev))
            rec = rec[:, :, :ch, :cw].to(image.device, torch.float32)
            weight = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y0:y0 + th, x0:x0 + tw] += rec * weight
            norm[:, :, y0:y0 + th, x0:x0 + tw] += weight
    return out / norm


def seam_mask(height: int, width: int, tile: int, overlap: int, band: int = 4) -> torch.Tensor:
    """(H, W) bool: True within ``band`` px of a tile edge inside the image (see
    :func:`tile_boundaries`): pixels ``edge − band … edge + band − 1`` on either axis."""
    _check(tile, overlap)
    mask = torch.zeros(height, width, dtype=torch.bool)
    for e in tile_boundaries(height, tile, overlap):
        mask[max(0, e - band):e + band, :] = True
    for e in tile_boundaries(width, tile, overlap):
        mask[:, max(0, e - band):e + band] = True
    return mask


def seam_error(original: torch.Tensor, recon: torch.Tensor, tile: int = 512, overlap: int = 64,
               band: int = 4) -> dict:
    """Reconstruction error along tile borders vs inside tiles, in 0..255 units.

    original, recon: (B, C, H, W) in [-1, 1] (recon clipped; RGBA: alpha counts), with the tile layout of
    :func:`reconstruct_tiled` (same ``tile``, ``overlap``). Seam pixels are those within
    ``band`` px of a tile edge (:func:`seam_mask`); the rest are interior. Returns
    {"seam_mae", "interior_mae", "ratio" (seam / interior; None when undefined),
    "seam_pixels", "interior_pixels", "band", "unit": "0-255"}. A ratio near 1 means the
    tiles join invisibly; clearly above 1 means seams.
    """
    if original.shape != recon.shape or original.ndim != 4:
        raise VAEFTError(f"seam_error needs two (B, C, H, W) images of one shape, got "
                         f"{tuple(original.shape)} and {tuple(recon.shape)}")
    if band < 1:
        raise VAEFTError(f"band must be at least 1 px, got {band}")
    h, w = original.shape[-2:]
    mask = seam_mask(h, w, tile, overlap, band).to(original.device)
    err = ((recon.float().clamp(-1, 1) - original.float().clamp(-1, 1)).abs() * 127.5).mean(1)  # (B, H, W)
    n_seam, n_in = int(mask.sum()), int((~mask).sum())
    seam = err[:, mask].mean().item() if n_seam else None
    inside = err[:, ~mask].mean().item() if n_in else None
    ratio = seam / inside if seam is not None and inside else None
    return {"seam_mae": seam, "interior_mae": inside, "ratio": ratio, "seam_pixels": n_seam,
            "interior_pixels": n_in, "band": band, "unit": "0-255"}
