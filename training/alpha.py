"""Transparency: one convention for the whole library, and the few ways alpha is composited.

**Straight (not premultiplied) alpha.** An RGBA image is (..., 4, H, W): R, G, B are the colours as they
are (not multiplied by alpha, so a fully transparent pixel keeps whatever colour the file holds) and the
4th channel is the opacity, all four in the library's [-1, 1] (alpha -1 = transparent, 1 = opaque). This
is what the RGBA VAEs are fed: ComfyUI's 4-channel IMAGE (JoinImageWithAlpha concatenates the colours and
``1 - mask`` unchanged, and its Load VAE pads an RGB image with alpha 1.0 for a 4-channel Wan 2.1 VAE) and
diffusers' QwenImageLayeredPipeline (a PIL ``RGBA`` image, straight by definition, scaled to [-1, 1] as
it is). Files with premultiplied ("associated") alpha are un-premultiplied when read.

Composites, where something needs 3 channels:

- over black (``RGB × alpha``): what an RGB VAE trains on when given RGBA images (as this pack always did);
- over black **and** over white, both: what LPIPS and the colour metrics see of an RGBA image (an error
  in alpha shows against at least one of the two whatever the colour; either one alone hides it where the
  colour matches the background);
- over a grey checkerboard: what previews and comparison images show, so transparency is visible.

Pure torch, no other import from the library (the ground floor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# What the metadata, summaries and documents say about the convention (one wording everywhere).
STRAIGHT = "straight (not premultiplied) alpha as the 4th channel"
# The background values (in [0, 1]) of the two composites LPIPS and the colour metrics score.
BACKGROUNDS = (0.0, 1.0)
CHECKER_CELL = 8                # px per checkerboard square
CHECKER_GREYS = (0.6, 0.8)      # the two greys of the checkerboard, in [0, 1]


def has_alpha(x: torch.Tensor) -> bool:
    """Whether (..., C, H, W) images carry alpha (C = 4)."""
    return x.ndim >= 3 and x.shape[-3] == 4


def over(x: torch.Tensor, background: float | torch.Tensor) -> torch.Tensor:
    """RGBA (..., 4, H, W) in [-1, 1] composited over ``background`` (a value in [0, 1], or a tensor
    that broadcasts against (..., 3, H, W) in [0, 1]) -> RGB (..., 3, H, W) in [-1, 1]. Differentiable;
    alpha is clipped to [0, 1] first. RGB input is returned as it is."""
    if not has_alpha(x):
        return x
    rgb = (x[..., :3, :, :] + 1) * 0.5
    a = ((x[..., 3:, :, :] + 1) * 0.5).clamp(0, 1)
    return (rgb * a + background * (1 - a)) * 2 - 1


def over_black_and_white(x: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) -> (2B, 3, H, W): the images over black, then the same images over white (see
    :data:`BACKGROUNDS`). Average per-image scores of the result with :func:`pair_mean`."""
    return torch.cat([over(x, b) for b in BACKGROUNDS])


def pair_mean(values: torch.Tensor) -> torch.Tensor:
    """(2B, ...) scores of :func:`over_black_and_white` images -> (B, ...): each image's mean over the two
    backgrounds."""
    return values.reshape(len(BACKGROUNDS), values.shape[0] // len(BACKGROUNDS), *values.shape[1:]).mean(0)


def opaque(x: torch.Tensor) -> torch.Tensor:
    """RGB (..., 3, H, W) in [-1, 1] -> RGBA with alpha 1 everywhere (an RGB image given to an RGBA VAE,
    as ComfyUI pads it)."""
    return torch.cat([x, torch.ones_like(x[..., :1, :, :])], dim=-3)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """[-1, 1] images (..., 3 or 4, H, W) as ``channels`` (3 or 4) channels: RGBA over black for 3, RGB
    made opaque for 4, unchanged when they already have them."""
    if x.shape[-3] == channels:
        return x
    return over(x, 0.0) if channels == 3 else opaque(x)


def over_black_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Integer RGBA pixels (4, H, W) (uint8 or uint16, straight alpha) -> RGB (3, H, W) over black, same
    dtype: ``RGB × alpha / max``, rounded half up. Integer arithmetic, so that crop, composite and resize
    commute with what the pack did before it kept alpha (it composited right after decoding)."""
    maxval = 255 if pixels.dtype == torch.uint8 else 65535
    rgb, a = pixels[:3].to(torch.int64), pixels[3:4].to(torch.int64)
    return ((rgb * a + maxval // 2) // maxval).to(pixels.dtype)


def checkerboard(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, H, W) grey checkerboard in [0, 1] (:data:`CHECKER_CELL` px squares of :data:`CHECKER_GREYS`)."""
    ys = torch.arange(height, device=device) // CHECKER_CELL
    xs = torch.arange(width, device=device) // CHECKER_CELL
    odd = ((ys[:, None] + xs[None, :]) % 2).to(dtype)
    lo, hi = CHECKER_GREYS
    return (lo + (hi - lo) * odd)[None]


def on_checkerboard(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to show, (..., 3 or 4, H, W) -> (..., 3, H, W): RGBA composited over the
    checkerboard (transparency visible), RGB as it is."""
    if not has_alpha(images):
        return images
    h, w = images.shape[-2:]
    board = checkerboard(h, w, device=images.device, dtype=images.dtype)
    a = images[..., 3:, :, :].clamp(0, 1)
    return images[..., :3, :, :] * a + board * (1 - a)


def resize(x: torch.Tensor, size: tuple[int, int], *, mode: str, antialias: bool, maxval: float = 1.0
           ) -> torch.Tensor:
    """``F.interpolate`` of (N, C, H, W) float images with values in [0, ``maxval``]. RGBA (straight alpha)
    is interpolated premultiplied, so the colours of transparent pixels do not bleed into visible edges,
    and un-premultiplied after; where the result is transparent (alpha below half an 16-bit step) its
    colour is the straight interpolation's. Values may overshoot [0, maxval] (bicubic): callers clamp."""
    kw = dict(size=size, mode=mode, align_corners=False, antialias=antialias)
    if not has_alpha(x):
        return F.interpolate(x, **kw)
    rgb, a = x[:, :3], x[:, 3:]
    both = F.interpolate(torch.cat([rgb * (a / maxval).clamp(0, 1), rgb, a], dim=1), **kw)
    pre, straight, alpha = both[:, :3], both[:, 3:6], both[:, 6:]
    frac = (alpha / maxval).clamp(0, 1)
    visible = frac > 0.5 / 65535
    colour = torch.where(visible, (pre / frac.clamp_min(0.5 / 65535)).clamp(0, maxval), straight)
    return torch.cat([colour, alpha], dim=1)
