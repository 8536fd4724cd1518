"""Base beside tuned on the user's own generations: two VAEs decode the same LATENTs (a sampler's, Save Latent's).

Every other figure of the pack is encode -> decode of held-out patches; users decode what a sampler produced,
latents slightly off the encoder's manifold. :func:`compare_on_latents` decodes each latent with both VAEs and
gives, per VAE, the round trip (decode -> encode -> the distance to the given latent, relative to its spread),
the largest activation and whether fp16 / bf16 decode these latents, and between the two decodes PSNR, LPIPS
and ΔE2000; with rows of base | tuned | |tuned - base| (amplified). Used by ``python -m training compare`` and the
"VAE Compare on Latents" node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .device import model_place
from .errors import VAEFTError
from .evaluate import comparison_grid
from .families import family_of
from .latents import held_channels, module_latents
from .memory import out_of_memory_named
from .metrics import delta_e2000, lpips_distance, psnr, summarize, try_load_lpips
from .probe import FP16_MAX, decode_watched, format_peak, half_precision_report, latent_drift
from .vae import pixels_per_latent

# the difference column's heat map: pale yellow at this mean |tuned - base| in [0, 1] units (13/255), 20x amplified
DIFFERENCE_MAX = 0.05
# fp16 convolutions on a CPU are slow: the half-precision check decodes 64-pixel crops there (256 on a GPU)
HALF_SIDE = {"cpu": 64, "gpu": 256}
OOM_HINT = "compare fewer or smaller latents (a smaller --limit), or run on the CPU (--device cpu)"


@dataclass
class LatentComparison:
    report: dict                  # the figures (JSON-safe but for infinities)
    grid: torch.Tensor            # (3, H, W) in [0, 1]: a row per latent, base | tuned | difference
    text: str                     # the report as a table for people
    notes: list[str] = field(default_factory=list)


def check_pair(base: torch.nn.Module, tuned: torch.nn.Module) -> None:
    """Refuse two VAEs of different families, or whose LATENTs differ (channels, pixels per latent): they do not
    decode the same latents (a 16-channel SD3 kl-f8 VAE and a Wan 2.1 one have latents of one shape)."""
    a, b = held_channels(base), held_channels(tuned)
    if a != b or family_of(base) is not family_of(tuned):
        raise VAEFTError(f"the base VAE ({family_of(base).label}) takes latents of {a[0]} channels at 1/{a[1]}, the "
                         f"tuned VAE ({family_of(tuned).label}) of {b[0]} channels at 1/{b[1]}: they do not share a "
                         "latent space, so they cannot decode the same latents")


def split_latents(items: list[tuple[str, torch.Tensor]], base: torch.nn.Module, tuned: torch.nn.Module,
                  limit: int) -> tuple[list[dict], list[str]]:
    """Each latent of ``items`` ([(name, held latents (B, C, [T,] h, w))]) as {"name", "held" (1, C, h, w), "base",
    "tuned" (each VAE's decoder input)}, at most ``limit``; every item is checked against both VAEs first
    (refused naming the item and the VAE). Returns (latents, notes)."""
    check_pair(base, tuned)
    if not items:
        raise VAEFTError("no latents to compare")
    notes: list[str] = []
    converted = []
    for name, z in items:
        zb, note = module_latents(base, z, f"latent {name!r}", "the base VAE")
        zt, _ = module_latents(tuned, z, f"latent {name!r}", "the tuned VAE")
        if note and note not in notes:
            notes.append(note)
        held = z[:, :, 0] if z.ndim == 5 else z
        converted += [{"name": name if z.shape[0] == 1 else f"{name}[{i}]", "held": held[i:i + 1].cpu(),
                       "base": zb[i:i + 1], "tuned": zt[i:i + 1]} for i in range(z.shape[0])]
    if len(converted) > limit:
        notes.append(f"{len(converted)} latents given; the first {limit} compared")
    return converted[:limit], notes


@torch.no_grad()
def _decode_all(model: torch.nn.Module, latents: list[dict], key: str, device: torch.device) -> dict:
    """One VAE over every latent: its decodes ([-1, 1], CPU), the round trip and the largest activation."""
    family = family_of(model)
    images, trips, peak, where = [], [], 0.0, "-"
    for item in latents:
        z = item[key].to(device, torch.float32)
        with out_of_memory_named(f"decoding latent {item['name']!r} ({key} VAE)", OOM_HINT):
            raw, peaks = decode_watched(model, z)
            image = raw.clamp(-1, 1)
            back = family.held_latent(model, model.encode(image).latent_dist.mode()).cpu()
        images.append(image.cpu())
        trips.append(latent_drift(back, item["held"]))
        block, value = max(peaks.items(), key=lambda kv: kv[1], default=("-", 0.0))
        if value > peak:
            peak, where = value, block
    return {"images": images, "round_trip": trips, "max_activation": peak, "max_activation_block": where}


def _half(model: torch.nn.Module, latents: list[dict], key: str, device: torch.device) -> dict:
    """fp16 / bf16 on these latents (centre crops of HALF_SIDE pixels of at most 2 latents on a CPU, 4 on a GPU):
    {"fp16"|"bf16": {"safe", "nonfinite_pixels", "psnr" (against the VAE's own fp32 decode), ...}, "crop"}."""
    cpu = device.type == "cpu"
    chosen = latents[:2] if cpu else latents[:4]
    side = max(1, HALF_SIDE["cpu" if cpu else "gpu"] // pixels_per_latent(model))
    side = min([side] + [s for item in chosen for s in item[key].shape[-2:]])
    crops = []
    for item in chosen:
        z = item[key]
        top, left = (z.shape[-2] - side) // 2, (z.shape[-1] - side) // 2
        crops.append(z[..., top:top + side, left:left + side])
    with out_of_memory_named("decoding in fp16 and bf16", "turn the half-precision check off (--no-half), or "
                             + OOM_HINT):
        report = half_precision_report(model, torch.cat(crops).to(device), device)
    report.pop("fp32_decoded")
    out = {name: {"safe": fig["safe"], "nonfinite_pixels": fig["nonfinite_pixels"],
                  "saturated_pixels": fig["saturated_pixels"], "psnr": fig["psnr"],
                  "max_activation": max(fig["max_activation"].values(), default=0.0)}
           for name, fig in report.items() if name in ("fp16", "bf16")}
    out["fp16"]["limit_used"] = out["fp16"]["max_activation"] / FP16_MAX
    out["latents"], out["side_px"] = len(chosen), side * pixels_per_latent(model)
    return out


def compare_on_latents(base: torch.nn.Module, tuned: torch.nn.Module, items: list[tuple[str, torch.Tensor]], *,
                       lpips: str | None = None, lpips_backbone: str | None = None,
                       device: torch.device | str = "cpu", limit: int = 16, half: bool | None = None,
                       notes: list[str] | None = None) -> LatentComparison:
    """Decode the held latents of ``items`` with ``base`` and ``tuned`` (family modules built by
    :func:`training.vae.build_vae`, left where they were) and compare them (see the module docstring).
    ``half``: run the fp16 / bf16 check; None: on a GPU, not on a CPU, where fp16 convolutions are so slow that
    even its 64-pixel crops take a minute or more per full-size VAE (said in the notes). Refused, before anything
    is decoded, when a latent does not fit either VAE. ``lpips``: the LPIPS backbone ("alex", "vgg"; its weights
    from ``lpips_backbone`` or torchvision's cache), loaded once the latents are known to fit; None: no LPIPS."""
    device = torch.device(device)
    latents, found = split_latents(items, base, tuned, limit)
    notes = list(notes or []) + found
    lpips_net, lpips_info = try_load_lpips(lpips, lpips_backbone) if lpips else (None, {})
    if half is None:
        half = device.type != "cpu"
        if not half:
            notes.append("fp16/bf16 not checked: on a CPU it takes minutes per full-size VAE (turn it on to check "
                         "anyway: --half, or the node's half_precision 'on')")
    report: dict = {"latents": [{"name": d["name"], "shape": list(d["held"].shape[1:]),
                                 "image_px": [s * held_channels(base)[1] for s in d["held"].shape[-2:]]}
                                for d in latents],
                    "family": {"base": family_of(base).name, "tuned": family_of(tuned).name}}
    decoded = {}
    for name, model in (("base", base), ("tuned", tuned)):
        home = model_place(model)[0]
        model.to(device)
        try:
            decoded[name] = _decode_all(model, latents, name, device)
            if half:
                decoded[name]["half"] = _half(model, latents, name, device)
        finally:
            model.to(home or "cpu")
        report[name] = {k: v for k, v in decoded[name].items() if k != "images"}
    pairs = [_between(t.to(device), b.to(device), lpips_net.to(device) if lpips_net is not None else None)
             for b, t in zip(decoded["base"]["images"], decoded["tuned"]["images"])]
    report["base_vs_tuned"] = {k: {**summarize(torch.cat([p[k] for p in pairs])),
                                   "per_latent": [float(p[k].mean()) for p in pairs]} for k in pairs[0]}
    if lpips_net is None:  # (the loader's advice on training without LPIPS does not apply to a comparison)
        why = lpips_info.get("reason", "no LPIPS network asked for").replace(
            ", or train without the perceptual term (lpips_weight = 0)", "")
        notes.append(f"LPIPS not measured: {why}")
    report["notes"] = notes
    grid = _rows([comparison_grid(b, [t], heat_max=DIFFERENCE_MAX, gap=2)
                  for b, t in zip(decoded["base"]["images"], decoded["tuned"]["images"])])
    return LatentComparison(report=report, grid=grid, text=format_report(report), notes=notes)


@torch.no_grad()
def _between(tuned: torch.Tensor, base: torch.Tensor, lpips_net: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """PSNR, (LPIPS,) ΔE2000 of the tuned decode against the base's, (1,) CPU tensors (no SSIM: a latent may be too
    small for its 11-pixel window)."""
    out = {"psnr": psnr(tuned, base)}
    if lpips_net is not None:
        out["lpips"] = lpips_distance(lpips_net, tuned, base)
    out["delta_e2000"] = delta_e2000(tuned, base)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _rows(rows: list[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Row images (3, h_i, w_i) stacked top to bottom on white, ``gap`` pixels apart (latents may differ in size)."""
    width = max(r.shape[-1] for r in rows)
    height = sum(r.shape[-2] for r in rows) + gap * (len(rows) - 1)
    out = torch.ones(3, height, width)
    y = 0
    for r in rows:
        out[:, y:y + r.shape[-2], :r.shape[-1]] = r
        y += r.shape[-2] + gap
    return out


def _half_text(fig: dict) -> str:
    if fig["safe"]:
        return f"safe, {fig['psnr']:.1f} dB"
    return f"UNSAFE: {fig['nonfinite_pixels']} NaN/inf, {fig['saturated_pixels']} saturated px"


def format_report(report: dict) -> str:
    """The comparison as a few lines of text (the node's report, the CLI's table)."""
    shapes = sorted({"x".join(map(str, d["image_px"])) for d in report["latents"]})
    n = len(report["latents"])
    lines = [f"{n} latent{'s' if n != 1 else ''} ({', '.join(shapes)} px), base {report['family']['base']}, "
             f"tuned {report['family']['tuned']}",
             f"{'':<28}{'base':>16}{'tuned':>16}",
             f"{'round trip (rel. RMS)':<28}" + "".join(f"{summarize(torch.tensor(report[v]['round_trip']))['mean']:>16.4f}"
                                                       for v in ("base", "tuned")),
             f"{'largest activation':<28}" + "".join(f"{format_peak(report[v]['max_activation']):>16}" for v in ("base", "tuned"))]
    if "half" in report["base"]:
        for dtype in ("fp16", "bf16"):
            lines.append(f"{dtype + ' (vs own fp32)':<28}" + "".join(f"{_half_text(report[v]['half'][dtype]):>16}"
                                                                    for v in ("base", "tuned")))
        h = report["base"]["half"]
        lines.append(f"  (half precision on {h['latents']} latent(s), {h['side_px']} px crops)")
    between = report["base_vs_tuned"]
    lines.append("base vs tuned: " + ", ".join(
        f"{name} {between[k]['mean']:.{d}f}{unit}" for k, name, d, unit in
        (("psnr", "PSNR", 2, " dB"), ("lpips", "LPIPS", 4, ""), ("delta_e2000", "ΔE2000", 3, "")) if k in between))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
