"""Augmentation of training patches: random dihedral transforms and mild colour jitter.

Tensors are (B, 3, H, W) float in [-1, 1], or (B, 4, H, W) RGBA with straight alpha last
(:mod:`training.alpha`), on any device. The geometric transforms move alpha with the colours; colour
jitter changes the colours only, never alpha. Kornia-style: small pure functions
with explicit per-sample parameters (:func:`dihedral`, :func:`color_jitter`), plus
:func:`sample_params`, which draws those parameters, and :func:`augment`, which does both.

Why the parameters are drawn on the host, from an integer seed: on a GPU, drawing them there and
deciding on the host which transform each sample gets means reading device values back, a
host-device synchronisation every training step (the trainer's step is otherwise free of them).
Drawn with NumPy from ``seed``, they are known on the host at once, and the same seed gives the same
augmentation on any device, in an uninterrupted and in a resumed run. The trainer passes one seed
per optimizer step and process, derived from (TrainConfig.seed, step, rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .errors import VAEFTError

if TYPE_CHECKING:
    from .config import DataConfig  # for annotations only

_STREAM = 0xA06  # keeps augmentation's random stream apart from others seeded with the same integer


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample parameters of one batch, on the host.

    hflip, vflip: (B,) bool, mirror left-right / top-bottom. rot90: (B,) int in 0..3, quarter turns
    counter-clockwise (as ``torch.rot90`` over (H, W)), applied after the flips. jitter: (B, 3)
    float32 brightness, contrast, saturation factors (1 = unchanged), or None for no colour jitter.
    """

    hflip: np.ndarray
    vflip: np.ndarray
    rot90: np.ndarray
    jitter: np.ndarray | None = None

    @property
    def codes(self) -> np.ndarray:
        """(B,) int: hflip + 2·vflip + 4·rot90, one number per distinct geometric transform (0 = none)."""
        return _codes(self.hflip, self.vflip, self.rot90)


def _codes(hflip: np.ndarray, vflip: np.ndarray, rot90: np.ndarray) -> np.ndarray:
    return hflip.astype(np.int64) + 2 * vflip.astype(np.int64) + 4 * rot90.astype(np.int64)


def sample_params(batch_size: int, height: int, width: int, cfg: DataConfig, seed: int) -> AugmentParams:
    """Draw a batch's parameters from ``seed`` (an integer >= 0) for ``cfg``'s flip / rotate90 /
    color_jitter settings: flips with p = 0.5 each, k uniform in 0..3 quarter turns (non-square
    patches: 0 or 2, as only 180° keeps their shape), factors uniform in [1-c, 1+c]. The count of
    draws is fixed, so switching one setting does not change the others' choices."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise VAEFTError(f"augmentation seed must be a whole number >= 0, got {seed!r}")
    u = np.random.default_rng([int(seed), _STREAM]).random((batch_size, 6))
    off = np.zeros(batch_size, dtype=bool)
    k = np.minimum((u[:, 2] * 4).astype(np.int64), 3) if cfg.rotate90 else np.zeros(batch_size, dtype=np.int64)
    if height != width:
        k = (k // 2) * 2
    c = cfg.color_jitter
    jitter = (1 + c * (2 * u[:, 3:6] - 1)).astype(np.float32) if c > 0 else None
    return AugmentParams(hflip=u[:, 0] < 0.5 if cfg.flip else off, vflip=u[:, 1] < 0.5 if cfg.flip else off,
                         rot90=k, jitter=jitter)


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device: a plain copy from pageable
    memory synchronises with the GPU's queue, one from pinned memory with non_blocking does not."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def dihedral(x: torch.Tensor, hflip: np.ndarray, vflip: np.ndarray, rot90: np.ndarray) -> torch.Tensor:
    """Per-sample flips then quarter turns of ``x`` (B, C, H, W), any dtype and device -> same shape
    (rot90 must be even where H != W). Samples sharing a transform are gathered and transformed
    together: a handful of passes over the batch whatever its size, no kernel per sample; ``x`` is
    not modified."""
    # lazy: kornia takes a second to import, and only augmented runs use it
    from kornia.geometry.transform import hflip as kflip_h
    from kornia.geometry.transform import vflip as kflip_v

    b, _, h, w = x.shape
    codes = _codes(hflip, vflip, rot90)
    if len(codes) != b:
        raise VAEFTError(f"dihedral: {len(codes)} transforms for a batch of {b}")
    if h != w and (rot90 % 2).any():
        raise VAEFTError(f"dihedral: a quarter turn of a non-square {h}x{w} patch changes its shape")
    if not codes.any():
        return x
    order = np.argsort(codes, kind="stable")              # samples grouped by transform, on the host
    groups = np.flatnonzero(np.diff(codes[order])) + 1
    index = _to_device(order, x.device)
    xs, out = x.index_select(0, index), torch.empty_like(x)
    parts = []
    for sl, c in zip(np.split(np.arange(b), groups), codes[order][np.r_[0, groups]]):
        t = xs[sl[0]: sl[-1] + 1]
        if c & 1:
            t = kflip_h(t)
        if c & 2:
            t = kflip_v(t)
        if c >> 2:
            t = torch.rot90(t, int(c >> 2), dims=(-2, -1))
        parts.append(t)
    return out.index_copy_(0, index, torch.cat(parts) if len(parts) > 1 else parts[0])


def color_jitter(x: torch.Tensor, factors: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Brightness, contrast and saturation of ``x`` (B, 3, H, W) in [-1, 1] scaled per sample by
    ``factors`` (B, 3) (1 = unchanged) -> same shape, clamped to [-1, 1]. Brightness scales towards
    black (a black background stays black), contrast towards the sample's mean grey, saturation
    towards each pixel's grey (Rec. 601 luminance, kornia's rgb_to_grayscale). ``x`` is not modified."""
    from kornia.color import rgb_to_grayscale  # lazy: only augmented runs use kornia

    b = x.shape[0]
    if tuple(factors.shape) != (b, 3):
        raise VAEFTError(f"color_jitter: factors must be ({b}, 3), got {tuple(factors.shape)}")
    f = _to_device(factors, x.device) if isinstance(factors, np.ndarray) else factors.to(x.device)
    fb, fc, fs = (f[:, i].to(x.dtype).view(b, 1, 1, 1) for i in range(3))
    # brightness then contrast, both affine in y = (x + 1) / 2:
    #   y' = fc * (fb * y - m) + m with m = fb * mean grey of y
    m = (rgb_to_grayscale(x.mean(dim=(2, 3), keepdim=True)) + 1) / 2 * fb
    scale = fc * fb
    shift = 2 * (1 - fc) * m + scale - 1  # the same map written for x in [-1, 1]
    x = torch.addcmul(shift, x, scale).clamp_(-1, 1)
    grey = rgb_to_grayscale(x)  # saturation: blend with grey (grey is affine-invariant)
    return x.mul_(fs).add_(grey * (1 - fs)).clamp_(-1, 1)


def augment(batch: torch.Tensor, cfg: DataConfig, seed: int) -> torch.Tensor:
    """Random dihedral transforms and colour jitter per sample, on ``batch``'s device.

    batch: (B, 3, H, W) float in [-1, 1], or (B, 4, H, W) RGBA (alpha moves with the geometry and is never
    jittered) -> same shape and range (a new tensor, or ``batch``
    itself when nothing applies). ``cfg``: a DataConfig (flip, rotate90, color_jitter); ``seed``:
    an integer >= 0, the same seed giving the same result (see :func:`sample_params`). Reads no
    device value on the host.
    """
    if batch.ndim != 4 or batch.shape[1] not in (3, 4):
        raise VAEFTError(f"augment expects (B, 3, H, W) or RGBA (B, 4, H, W), got {tuple(batch.shape)}")
    b, c, h, w = batch.shape
    p = sample_params(b, h, w, cfg, seed)
    x = dihedral(batch, p.hflip, p.vflip, p.rot90)
    if p.jitter is not None:
        if c == 4:  # the colours only: alpha is not a colour
            x = torch.cat([color_jitter(x[:, :3], p.jitter), x[:, 3:]], dim=1)
        else:
            x = color_jitter(x, p.jitter)
    return x


def augmenter(cfg: DataConfig) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The trainer's ``augment`` hook for ``cfg``: ``(batch, seed) -> batch``, or None when nothing is
    augmented (which lets the trainer cache latents of a fixed grid patch set)."""
    if not cfg.augments:
        return None
    return lambda batch, seed: augment(batch, cfg, seed)
