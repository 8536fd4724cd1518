"""Loss curves and image grids as tensors, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .alpha import on_checkerboard

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
# History keys worth drawing as curves, in legend order.
HISTORY_CURVES = ("total", "mse", "l1", "lpips", "kl", "latent", "g_loss", "d_loss", "val_mse", "val_lpips",
                  "val_noisy_mse", "val_noisy_lpips",
                  "gen_mse", "gen_lpips")


def history_curves(history: list[dict]) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """(values, steps) per HISTORY_CURVES key present in a training history (its lines: {"step", ...}):
    training terms over the logged steps, validation scores over the steps they were scored at
    (validation may run on steps that log no training loss, so the two sets of rows differ)."""
    train = [h for h in history if "total" in h]
    val = [h for h in history if any(k.startswith(("val_", "gen_")) for k in h)]
    values, steps = {}, {}
    for key in HISTORY_CURVES:
        rows = val if key.startswith(("val_", "gen_")) else train
        if any(key in h for h in rows):
            values[key] = [h.get(key, float("nan")) for h in rows]
            steps[key] = [h["step"] for h in rows]
    return values, steps


def curve_image(series: dict[str, list[float]], steps: list[int] | dict[str, list[int] | None] | None = None,
                width: int = 768, height: int = 384, title: str = "loss", log_y: bool = True) -> torch.Tensor:
    """Line chart of named series against ``steps`` (one list for all, or one per series name;
    missing: 1, 2, ...). Non-finite values are gaps. Returns (3, height, width) float in [0, 1].

    A series with a point at step 0 (validation scores: the base VAE, before the first step)
    also gets a dashed line at that level across the chart: above or below it is better or
    worse than the base.

    A log y axis (the default) shows the slow late decrease of reconstruction losses;
    series with non-positive values fall back to a linear axis.
    """
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 16, 28, 32
    pw, ph = width - left - right, height - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0))
    series = {k: [float(v) for v in vals] for k, vals in series.items() if vals}
    if not series:
        d.text((left + 8, top + 8), "no data", fill=(0, 0, 0))
        return _to_tensor(img)
    per = steps if isinstance(steps, dict) else {k: steps for k in series}
    xs = {k: list(per.get(k) or range(1, len(v) + 1)) for k, v in series.items()}
    all_steps = sorted({s for v in xs.values() for s in v})
    values = [x for v in series.values() for x in v if math.isfinite(x)]
    use_log = log_y and values and min(values) > 0
    f = (lambda y: math.log10(y)) if use_log else (lambda y: y)
    ys = [f(y) for y in values] or [0.0]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = all_steps[0], all_steps[-1] if all_steps[-1] != all_steps[0] else all_steps[0] + 1

    def px(step, y):
        return (left + (step - x0) / (x1 - x0) * pw, top + (1 - (f(y) - lo) / (hi - lo)) * ph)

    for i in range(5):  # y ticks
        yv = lo + (hi - lo) * i / 4
        label = 10 ** yv if use_log else yv
        yp = top + (1 - i / 4) * ph
        d.line([left - 4, yp, left, yp], fill=(0, 0, 0))
        d.text((2, yp - 6), f"{label:.3g}", fill=(0, 0, 0))
    d.text((left, top + ph + 8), f"step {x0}", fill=(0, 0, 0))
    d.text((left + pw - 70, top + ph + 8), f"step {all_steps[-1]}", fill=(0, 0, 0))
    for ci, (name, vals) in enumerate(series.items()):
        colour = COLOURS[ci % len(COLOURS)]
        if xs[name] and xs[name][0] == 0 and math.isfinite(vals[0]) and (not use_log or vals[0] > 0):
            _, yb = px(x0, vals[0])
            for xa in range(left, left + pw, 8):  # the base VAE's level, dashed
                d.line([xa, yb, min(xa + 4, left + pw), yb], fill=colour, width=1)
        pts = [px(s, v) for s, v in zip(xs[name], vals) if math.isfinite(v) and (not use_log or v > 0)]
        if len(pts) == 1:
            x, y = pts[0]
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        elif pts:
            d.line(pts, fill=colour, width=2)
        label = f"-- {name}" + (" (- - base)" if xs[name] and xs[name][0] == 0 else "")
        d.text((left + pw - 150, top + 6 + 14 * ci), label, fill=colour)
    return _to_tensor(img)


def image_grid(images: torch.Tensor, rows: int | None = None, pad: int = 2, margin: int = 0,
               value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images row-major into ``rows`` rows (None: a near-square grid), ``pad`` px
    of ``value`` between cells and ``margin`` px around. Returns (C, H', W')."""
    n, c, h, w = images.shape
    cols = math.ceil(n / rows) if rows else max(1, math.ceil(math.sqrt(n)))
    rows = rows or max(1, math.ceil(n / cols))
    out = torch.full((c, rows * h + (rows - 1) * pad + 2 * margin, cols * w + (cols - 1) * pad + 2 * margin),
                     value, dtype=images.dtype if images.is_floating_point() else torch.float32)
    for i in range(n):
        y, x = margin + (i // cols) * (h + pad), margin + (i % cols) * (w + pad)
        out[:, y:y + h, x:x + w] = images[i]
    return out


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) [0, 1] tensor as an 8-bit RGB Pillow image (RGBA, (4, H, W): over a grey checkerboard,
    so that transparency shows)."""
    arr = (on_checkerboard(image.detach().clamp(0, 1)).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def save_png(image: torch.Tensor, path: str) -> None:
    """Write a (3, H, W) [0, 1] tensor as PNG (RGBA over a checkerboard, see :func:`to_pil`)."""
    to_pil(image).save(path)
