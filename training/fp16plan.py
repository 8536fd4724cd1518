"""Rescaling plans for the fp16-fix recipe: scaling a decoder's layers by powers of two so that its
activations fit fp16 while its output stays (:mod:`training.fp16fix` runs them before training).

- :func:`exact_rescale`: only where a normalisation makes the scaling exact (a residual block's ``conv1``;
  a residual stream segment as a whole, see :func:`_stream_plan`); verified on the given latents and
  undone when the decode changes.
- :func:`measured_rescale`: the same plan when it is not exact: a stream that is ordinary where a segment
  starts and grows inside it (a residual branch, an attention block adding a large output) can only be
  scaled as a whole, and the GroupNorms that read the segment's small early part then see their epsilon
  (1e-6) beside the variance: the decode changes, more the harsher the scale. Candidate thresholds are
  tried, the change each costs is measured (fp32 and fp16 against the base's fp32 decode) and the mildest
  one that keeps the output is kept.
"""

from __future__ import annotations

import copy
import math

import torch

from .probe import FP16_MAX, decode_in, decode_watched, decode_with_peaks, psnr


# the rescaling brings the probe's activations to act_threshold / RESCALE_MARGIN: other images' latents (training
# patches, posterior samples) reach higher, and only above act_threshold does the penalty start moving weights
RESCALE_MARGIN = 8


def _power_of_two(ratio: float) -> float:
    """The largest power of two at most ``ratio`` (< 1; 1 when it is not a positive finite number): scaling
    by it changes only the exponent, so a bf16 or fp32 base's rescaled weights lose nothing written back in
    its dtype. (fp16 has a narrower exponent range: weights scaled below 2^-14 lose precision there, and the
    report's PSNR against the base shows what that costs.)"""
    if not (math.isfinite(ratio) and ratio > 0):
        return 1.0
    return 2.0 ** math.floor(math.log2(ratio))


def _scale_(layer: torch.nn.Module, weight: float, bias: float) -> None:
    with torch.no_grad():
        layer.weight.mul_(weight)
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(bias)


def _resnets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The decoder's residual blocks whose ``conv1`` feeds only ``norm2`` (diffusers' ResnetBlock2D, the Wan
    family's residual block; no time embedding)."""
    out = []
    for name, m in model.named_modules():
        if (name.startswith("decoder.") and hasattr(m, "conv1") and hasattr(m, "norm2")
                and getattr(m, "time_emb_proj", None) is None):
            out.append((name, m))
    return out


def _stream_plan(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]] | None:
    """The residual stream of the decoder in order, as (kind, module): 'entry' (a linear map that starts a
    segment: conv_in, an upsampler's convolution), 'shortcut' (a residual block with a shortcut convolution:
    it starts a segment, its conv2 ends it), 'resnet', 'attention', and 'pinned' (module None: the segment
    so far must keep its scale, because it also feeds a layer left as it is). The decoders of diffusers'
    ``Decoder`` (kl-f8, Flux.2; ends in a GroupNorm) and of the Wan family (ends in an RMSNorm; its 3D
    upsamplers' ``time_conv`` reads the stream in video decoding and stays byte-identical, so the segment
    before one is pinned). None for another decoder; raises _NotExact for a block the rescaling cannot pass."""
    dec = model.decoder
    norm_out = getattr(dec, "conv_norm_out", None) or getattr(dec, "norm_out", None)
    if not all(hasattr(dec, a) for a in ("conv_in", "mid_block", "up_blocks")) or not (
            isinstance(norm_out, torch.nn.GroupNorm) or type(norm_out).__name__.endswith("RMS_norm")):
        return None
    plan: list[tuple[str, torch.nn.Module | None]] = [("entry", dec.conv_in)]

    def resnet(r):
        if getattr(r, "output_scale_factor", 1.0) != 1.0 or getattr(r, "time_emb_proj", None) is not None:
            raise _NotExact
        shortcut = getattr(r, "conv_shortcut", None)
        if shortcut is not None and not isinstance(shortcut, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Identity)):
            raise _NotExact  # a wrapped or other linear map: its scaling is not known to be exact
        has_shortcut = isinstance(shortcut, (torch.nn.Conv2d, torch.nn.Conv3d))
        plan.append(("shortcut" if has_shortcut else "resnet", r))

    mid = dec.mid_block
    resnet(mid.resnets[0])
    for attn, r in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            if _attention_out(attn) is None:
                raise _NotExact
            plan.append(("attention", attn))
        resnet(r)
    for up in dec.up_blocks:
        if getattr(up, "avg_shortcut", None) is not None:
            # a residual level (the Wan 2.2 layout): its shortcut adds the level's input, duplicated up, to
            # the upsampler's output, two segments' sum this plan does not scale: the stream stays as it is
            raise _NotExact
        for r in up.resnets:
            resnet(r)
        for u in (getattr(up, "upsamplers", None) or []):
            if getattr(u, "time_conv", None) is not None:  # the Wan family's upsample3d
                plan.append(("pinned", None))
            conv = getattr(u, "conv", None) if hasattr(u, "conv") else _last_conv(getattr(u, "resample", None))
            if not isinstance(conv, torch.nn.Conv2d) or getattr(u, "norm", None) is not None:
                raise _NotExact  # a norm before the convolution would undo the stream's scale
            plan.append(("entry", conv))
    return plan


def _attention_out(attn: torch.nn.Module) -> torch.nn.Module | None:
    """The last linear map of a residual attention block (diffusers' ``Attention``: ``to_out[0]``; the Wan
    family's: ``proj``), or None when its output is not simply added to its input."""
    if hasattr(attn, "to_out"):  # its q/k/v must see the stream through its own group_norm
        ok = (getattr(attn, "residual_connection", False) and getattr(attn, "rescale_output_factor", 1.0) == 1.0
              and getattr(attn, "group_norm", None) is not None and getattr(attn, "spatial_norm", None) is None)
        return attn.to_out[0] if ok else None
    return getattr(attn, "proj", None) if type(attn).__name__.endswith("AttentionBlock") else None


def _last_conv(seq: torch.nn.Module | None) -> torch.nn.Module | None:
    """An upsampler's convolution when it is the last layer of its sequence and only upsampling (which
    commutes with a scale) comes before it (the Wan family's ``resample``: nearest upsampling, a Conv2d)."""
    if (isinstance(seq, torch.nn.Sequential) and len(seq) and isinstance(seq[-1], torch.nn.Conv2d)
            and all(isinstance(m, torch.nn.Upsample) for m in list(seq)[:-1])):
        return seq[-1]
    return None


class _NotExact(Exception):
    pass


def _stream_outputs(kind: str, m: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs carry the segment's factor (watched to find its peak)."""
    if kind == "entry":
        return [m]
    if kind == "attention":
        return [m, _attention_out(m)]
    return [m, m.conv2] + ([m.conv_shortcut] if kind == "shortcut" else [])


def _peaks(model: torch.nn.Module, latents: torch.Tensor, modules: list[torch.nn.Module]) -> tuple[torch.Tensor, list[float]]:
    """(the decode, the largest |output| of each of ``modules``, in order; inf where one overflowed)."""
    out, peaks = decode_with_peaks(model, latents, list(enumerate(modules)))
    return out, [peaks.get(i, 0.0) for i in range(len(modules))]


class _Layout:
    """What a rescaling of ``model``'s decoder reads and scales: its residual blocks (``conv1`` each), the
    stream plan (None: the stream cannot be rescaled), per plan item the indices into ``watched`` of the
    modules carrying its segment's factor, and ``watched`` (every conv1, then those modules)."""

    def __init__(self, model: torch.nn.Module):
        try:
            self.plan = _stream_plan(model)
        except _NotExact:
            self.plan = None
        self.resnets = [m for _, m in _resnets(model)]
        self.watched = [r.conv1 for r in self.resnets]
        self.groups: list[list[int]] = []
        for kind, m in self.plan or []:
            mods = _stream_outputs(kind, m) if kind != "pinned" else []
            self.groups.append(list(range(len(self.watched), len(self.watched) + len(mods))))
            self.watched += mods
        self.names = {id(m): n for n, m in model.named_modules()}

    def segment_peaks(self, seen: list[float]) -> tuple[list[float], set[int]]:
        """(the largest output in each stream segment, the segments pinned to scale 1)."""
        segment, peaks, pinned = -1, [], set()
        for (kind, _), idx in zip(self.plan or [], self.groups):
            if kind in ("entry", "shortcut"):
                peaks.append(0.0)
                segment += 1
            elif kind == "pinned":
                pinned.add(segment)
                continue
            peaks[segment] = max(peaks[segment], *(seen[i] for i in idx))
        return peaks, pinned


def _apply(lay: _Layout, seen: list[float], target: float) -> dict:
    """Scale (in place) every conv1 whose output peak in ``seen`` passes ``target``, and each unpinned stream
    segment by the mildest power of two that brings its peak to at most ``target``.

    Returns {"conv1": blocks scaled, "segments": segments scaled, "pinned": segments kept,
    "scaled": {module name: [weight factor, bias factor]} of every layer changed}."""
    scaled: dict[str, list[float]] = {}

    def scale(m, w, b):
        if w != 1.0 or b != 1.0:
            _scale_(m, w, b)
            scaled[lay.names[id(m)]] = [w, b]

    n_conv1 = 0
    for r, peak in zip(lay.resnets, seen[:len(lay.resnets)]):
        if math.isfinite(peak) and peak > target:
            scale(r.conv1, _power_of_two(target / peak), _power_of_two(target / peak))
            n_conv1 += 1
    seg_peak, pinned = lay.segment_peaks(seen)
    seg_scale = [1.0 if i in pinned or not p > target else _power_of_two(target / p) for i, p in enumerate(seg_peak)]
    segment, prev = -1, 1.0
    for kind, m in lay.plan or []:
        if kind in ("entry", "shortcut"):
            segment += 1
            s = seg_scale[segment]
            scale(m if kind == "entry" else m.conv_shortcut, s / prev, s)
            prev = s
        s = seg_scale[segment]
        if kind in ("resnet", "shortcut"):
            scale(m.conv2, s, s)
        elif kind == "attention":
            scale(_attention_out(m), s, s)
    return {"conv1": n_conv1, "segments": sum(s < 1.0 for s in seg_scale), "pinned": len(pinned), "scaled": scaled}


@torch.no_grad()
def exact_rescale(model: torch.nn.Module, latents: torch.Tensor, target: float, tolerance: float = 1e-3) -> dict:
    """Scale ``model``'s decoder (in place) where a normalisation makes it exact, so that no rescaled
    layer's output on ``latents`` exceeds ``target`` (by powers of two: between target / 2 and target);
    layers already below it are left as they are.

    Returns {"conv1": blocks rescaled, "segments": stream segments rescaled, "peak_before", "peak_after"
    (largest activation of the decoder's layers, fp32), "max_change" (largest |Δ| of the decode, in
    [-1, 1] units), "exact" (max_change within ``tolerance``·max(1, |decode|)), "stream" (whether the
    decoder's residual stream can be rescaled), "pinned" (stream segments kept as they are: they feed the
    Wan family's temporal upsampling)}. When it is not exact the weights are put back."""
    was = model.training
    model.eval()
    latents = latents.to(next(model.parameters()).device, torch.float32)
    saved = copy.deepcopy(model.decoder.state_dict())
    lay = _Layout(model)
    before, seen = _peaks(model, latents, lay.watched)
    _, peaks_before = decode_watched(model, latents)
    done = _apply(lay, seen, target)
    after, peaks_after = decode_watched(model, latents)
    change = float((after - before).abs().max())
    exact = bool(math.isfinite(change) and change <= tolerance * max(1.0, float(before.abs().max())))
    if not exact:
        model.decoder.load_state_dict(saved)
    model.train(was)
    return {"conv1": done["conv1"] if exact else 0, "segments": done["segments"] if exact else 0,
            "stream": lay.plan is not None, "pinned": done["pinned"], "peak_before": max(peaks_before.values(), default=0.0),
            "peak_after": max((peaks_after if exact else peaks_before).values(), default=0.0),
            "max_change": change, "exact": exact}


# ----- measured: a stream that grows inside a segment

# a candidate within this many dB of the least change is as good: the one with the most margin wins
TIE_DB = 1.0
# the mildest candidate: half of fp16's range, a margin of 2 for other images' latents
MILDEST = 2.0 ** 15


def candidate_thresholds(act_threshold: float) -> list[float]:
    """The thresholds :func:`measured_rescale` tries: ``act_threshold`` and its doublings up to 2^15
    (32768, half of fp16's 65504), harshest first; ``act_threshold`` alone when it is above that."""
    out, t = [], float(act_threshold)
    while t <= MILDEST or not out:
        out.append(t)
        t *= 2.0
    return out


def _measure(model: torch.nn.Module, latents: torch.Tensor, base_decoded: torch.Tensor) -> dict:
    """The decode of ``latents`` against ``base_decoded`` (the base's fp32 decode, clamped): {"psnr_fp32",
    "psnr_fp16" (dB; NaN/inf pixels as black), "fp16_peak" (largest activation in fp16, inf: overflowed),
    "fp16_nonfinite" (pixels)}."""
    ref = base_decoded.to(latents.device).float().clamp(-1, 1)
    fp32, _ = decode_watched(model, latents)
    _, peaks, nonfinite, shown = decode_in(model, latents, torch.float16)
    return {"psnr_fp32": round(psnr(fp32.clamp(-1, 1), ref), 2), "psnr_fp16": round(psnr(shown, ref), 2),
            "fp16_peak": max(peaks.values(), default=0.0), "fp16_nonfinite": nonfinite}


@torch.no_grad()
def measured_rescale(model: torch.nn.Module, latents: torch.Tensor, base_decoded: torch.Tensor,
                     thresholds: list[float], bound_db: float) -> dict:
    """The rescaling plan of :func:`exact_rescale` where it is not exact: for each of ``thresholds`` the
    decoder is scaled (conv1s and stream segments, powers of two) to bring every watched activation on
    ``latents`` to at most it, and the change is measured (:func:`_measure`). Kept (in place): among the
    candidates whose fp16 decode is finite with activations within half of fp16's range, the one with the
    most margin (lowest threshold) whose fp16 PSNR against ``base_decoded`` is within TIE_DB of the best,
    when that PSNR is at least ``bound_db``; else nothing changes.

    Returns {"applied", "threshold" (the kept candidate's; None when none was kept), "scaled" ({module
    name: [weight factor, bias factor]}), "conv1", "segments", "psnr_fp32", "psnr_fp16", "fp16_peak" (the
    kept candidate's figures), "bound_db", "candidates" (per threshold: its figures), "why" (one line)}."""
    was = model.training
    model.eval()
    latents = latents.to(next(model.parameters()).device, torch.float32)
    saved = copy.deepcopy(model.decoder.state_dict())
    lay = _Layout(model)
    _, seen = _peaks(model, latents, lay.watched)
    candidates = []
    for t in thresholds:
        model.decoder.load_state_dict(saved)
        done = _apply(lay, seen, t)
        candidates.append({"threshold": t, **_measure(model, latents, base_decoded), "conv1": done["conv1"],
                           "segments": done["segments"], "scaled": done["scaled"]})
    model.decoder.load_state_dict(saved)
    pick, why = _pick(candidates, bound_db)
    if pick is not None:
        _apply(lay, seen, pick["threshold"])
    model.train(was)
    kept = pick or {}
    return {"applied": pick is not None, "threshold": kept.get("threshold"), "scaled": kept.get("scaled", {}),
            "conv1": kept.get("conv1", 0), "segments": kept.get("segments", 0),
            **{k: kept.get(k) for k in ("psnr_fp32", "psnr_fp16", "fp16_peak")}, "bound_db": bound_db,
            "stream": lay.plan is not None, "why": why,
            "candidates": [{k: v for k, v in c.items() if k != "scaled"} for c in candidates]}


def _pick(candidates: list[dict], bound_db: float) -> tuple[dict | None, str]:
    """(the candidate to keep or None, why), see :func:`measured_rescale`."""
    fits = [c for c in candidates if c["fp16_nonfinite"] == 0 and c["fp16_peak"] <= FP16_MAX / 2 and c["scaled"]]
    if not fits:
        return None, ("no candidate scale made the fp16 decode finite within half of fp16's range (the overflow "
                      "is where the rescaling cannot reach: a pinned segment, or a layer no normalisation follows)")
    best = max(c["psnr_fp16"] for c in fits)
    pick = min((c for c in fits if c["psnr_fp16"] >= best - TIE_DB), key=lambda c: c["threshold"])
    if pick["psnr_fp16"] < bound_db:
        return None, (f"the least change a fitting scale costs is {pick['psnr_fp16']:.1f} dB against the base's "
                      f"fp32 decode, past the bound of {bound_db:g} dB: not applied")
    return pick, (f"threshold {pick['threshold']:g} kept: the most margin within {TIE_DB:g} dB of the least "
                  f"change ({best:.1f} dB)")
