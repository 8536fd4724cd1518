"""Making a VAE safe in fp16 while keeping its output (the ``fp16-fix`` recipe).

Three pieces, each usable on its own:

- :func:`exact_rescale`: the head start. A normalisation (GroupNorm, Wan's RMSNorm) gives the same
  output when its input is scaled by s > 0, so whatever only feeds one can be scaled down without
  changing anything downstream:
    * a residual block's ``conv1`` (it feeds ``norm2`` only): its weight and bias times t (every family);
    * the decoder's residual stream (every family): between ``conv_in`` and the last norm
      (``conv_norm_out``, the Wan family's ``norm_out``) every block's input reaches the stream's next
      values only through a norm or the skip addition, so the stream can carry a factor s per segment (a
      segment ends where a linear map with a bias starts a new one: a shortcut block, an upsampler's
      convolution): the segment's entry map is multiplied by s_new / s_old (bias by s_new), each block's
      last layer (``conv2``, attention's ``to_out`` / ``proj``) by s. In the Wan family the segment
      before each 3D upsampler keeps s = 1: its ``time_conv`` (which still images never reach and which
      stays byte-identical) reads the stream in video decoding.
  Applied to the training copy only; verified on the given latents (the decode stays equal within
  float tolerance), and undone when it is not.
- :class:`ActivationPenalty`: forward hooks on the decoder's layers that add
  ``Σ_layers mean(relu(|a| / T − 1)²)`` for activations above ``T`` (``act_threshold``), and the
  largest activation seen.
- :func:`fp16_figures`: the decoder in fp16 on latents, against the base's fp32 decode: largest
  activation, NaN/inf pixels, PSNR.
"""

from __future__ import annotations

import copy
import math
import weakref

import torch

from .errors import VAEFTError
from .families import family_of
from .probe import (FP16_MAX, as_dtype, decode_in, decode_watched, decode_with_peaks, encode_latents, latent_drift,
                    probe_patches, psnr)
from .vae import latent_channels, perturbed


def decoder_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module inside a decoder block (the fp16 report's blocks): the leaves and the
    modules made of them, such as residual blocks, whose outputs are the residual stream's sums (the Wan
    family's 2D path runs their hooks too)."""
    block_of = family_of(model).decoder_block
    return [(n, m) for n, m in model.named_modules() if n and block_of(n) is not None]


# ----- the exact head start

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
    try:
        plan = _stream_plan(model)
    except _NotExact:
        plan = None
    resnets = [m for _, m in _resnets(model)]
    watched = [r.conv1 for r in resnets]
    groups: list[list[int]] = []  # per plan item: indices into watched
    for kind, m in plan or []:
        mods = _stream_outputs(kind, m) if kind != "pinned" else []
        groups.append(list(range(len(watched), len(watched) + len(mods))))
        watched += mods
    before, seen = _peaks(model, latents, watched)
    _, peaks_before = decode_watched(model, latents)
    n_conv1 = 0
    for r, peak in zip(resnets, seen[:len(resnets)]):
        if math.isfinite(peak) and peak > target:
            _scale_(r.conv1, _power_of_two(target / peak), _power_of_two(target / peak))
            n_conv1 += 1
    # one factor per segment: the largest output in it brought to ``target``
    segment = -1
    seg_peak: list[float] = []
    pinned: set[int] = set()
    for (kind, _), idx in zip(plan or [], groups):
        if kind in ("entry", "shortcut"):
            seg_peak.append(0.0)
            segment += 1
        elif kind == "pinned":
            pinned.add(segment)
            continue
        seg_peak[segment] = max(seg_peak[segment], *(seen[i] for i in idx))
    seg_scale = [1.0 if i in pinned or not p > target else _power_of_two(target / p) for i, p in enumerate(seg_peak)]
    segment, prev = -1, 1.0
    for kind, m in plan or []:
        if kind in ("entry", "shortcut"):
            segment += 1
            s = seg_scale[segment]
            _scale_(m if kind == "entry" else m.conv_shortcut, s / prev, s)
            prev = s
        s = seg_scale[segment]
        if kind in ("resnet", "shortcut"):
            _scale_(m.conv2, s, s)
        elif kind == "attention":
            _scale_(_attention_out(m), s, s)
    after, peaks_after = decode_watched(model, latents)
    change = float((after - before).abs().max())
    exact = bool(math.isfinite(change) and change <= tolerance * max(1.0, float(before.abs().max())))
    if not exact:
        model.decoder.load_state_dict(saved)
    model.train(was)
    return {"conv1": n_conv1 if exact else 0, "segments": sum(s < 1.0 for s in seg_scale) if exact else 0,
            "stream": plan is not None, "pinned": len(pinned), "peak_before": max(peaks_before.values(), default=0.0),
            "peak_after": max((peaks_after if exact else peaks_before).values(), default=0.0),
            "max_change": change, "exact": exact}


# ----- the penalty


class _Excess(torch.autograd.Function):
    """``mean(relu(|a| / t − 1)²)`` in fp32, keeping only ``a`` for the backward pass (which the graph
    holds anyway) instead of an fp32 copy per layer."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, t: float) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.t = t
        return torch.relu(a.float().abs() / t - 1.0).square().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (a,) = ctx.saved_tensors
        af = a.float()
        g = torch.relu(af.abs() / ctx.t - 1.0).mul_(af.sign()).mul_(grad * 2.0 / (ctx.t * a.numel()))
        return g.to(a.dtype), None


class ActivationPenalty:
    """Forward hooks on the decoder's layers (see :func:`decoder_modules`) that, while gradients are on,
    add up ``mean(relu(|a| / threshold − 1)²)`` over every hooked output ``a`` and track the largest
    |a|. :meth:`take` returns (penalty, peak) for the forward passes since the last call."""

    def __init__(self, model: torch.nn.Module, threshold: float):
        self.threshold = threshold
        self.terms: list[torch.Tensor] = []
        self.peaks: list[torch.Tensor] = []
        # the outputs counted so far, by id with a weak reference to tell a reused id from the same tensor: a
        # tensor several modules return (an upsampler's output is also its sequence's and its convolution's)
        self.seen: dict[int, weakref.ref] = {}
        self.open = False  # between clear() and take(): the training forward, not a backward's recompute
        self.handles = [m.register_forward_hook(self._hook) for _, m in decoder_modules(model)]

    def _hook(self, _module, _inputs, out) -> None:
        if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.is_floating_point()
                and out.requires_grad):
            return
        ref = self.seen.get(id(out))
        if ref is not None and ref() is out:
            return
        self.seen[id(out)] = weakref.ref(out)
        term = _Excess.apply(out, self.threshold)
        # gradient checkpointing's recompute in the backward pass runs the hooks again: it must save what the
        # forward saved (the same _Excess calls), and its terms are not kept
        if self.open:
            self.peaks.append(out.detach().abs().amax().float())
            self.terms.append(term)

    def clear(self) -> None:
        """Start counting (before the training forward)."""
        self.terms, self.peaks, self.seen, self.open = [], [], {}, True

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalty and the largest activation of the forward since clear(); counting stops."""
        self.open = False
        if not self.terms:
            raise VAEFTError("act_weight > 0 but no decoder activation was seen by the penalty's hooks (a "
                             "compiled model may skip them): turn compile off, or set act_weight to 0")
        penalty, peak = torch.stack(self.terms).sum(), torch.stack(self.peaks).amax()
        self.terms, self.peaks = [], []
        return penalty, peak

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ----- the figures


@torch.no_grad()
def fp16_figures(model: torch.nn.Module, latents: torch.Tensor, base_decoded: torch.Tensor) -> dict:
    """Decode ``latents`` with ``model``'s decoder in fp16 (as ComfyUI's --fp16-vae does) and compare with
    ``base_decoded`` (the base VAE's fp32 decode of the same latents, clamped to [-1, 1]):
    {"fp16_peak": largest activation (inf: overflowed), "fp16_nonfinite": NaN/inf pixels,
    "fp16_psnr": dB over the images with NaN/inf as black, "fp16_limit": peak / 65504}."""
    _, peaks, nonfinite, shown = decode_in(model, latents, torch.float16)
    peak = max(peaks.values(), default=0.0)
    return {"fp16_peak": peak, "fp16_nonfinite": nonfinite,
            "fp16_psnr": psnr(shown, base_decoded.to(latents.device).float().clamp(-1, 1)),
            "fp16_limit": peak / FP16_MAX}


@torch.no_grad()
def base_decode(model: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The fp32 decode of ``latents`` that fp16_figures compares with, clamped to [-1, 1]."""
    return family_of(model).raw_decode(as_dtype(model, torch.float32).to(latents.device),
                                            latents.float()).float().clamp(-1, 1)


# the rescaling's record of a run resumed from a checkpoint written before checkpoints kept it
UNKNOWN = "unknown"
# export_best's score with target 'base' (FP16Fix.best_by)
BEST_BY = "val_fp16_psnr"


def fp16_fix_note(fix: dict) -> str:
    """One line for the export report: what the fp16-fix settings did (``Trained.fp16_fix``)."""
    parts = []
    if fix.get("target") == "base":
        parts.append("trained towards the base VAE's own fp32 decode")
    if fix.get("act_weight"):
        parts.append(f"activations above {fix['act_threshold']:g} penalised (weight {fix['act_weight']:g})")
    r = fix.get("rescale")
    if r == UNKNOWN:
        parts.append("exact rescaling: unknown (resumed from a checkpoint written before checkpoints kept its "
                     "record; the weights carry whatever rescaling the run did before its first step)")
    elif r:
        if r["exact"]:
            pinned = r.get("pinned", 0)
            kept = (f" ({pinned} kept as they are: they feed a 3D upsampler's time_conv, which video decoding "
                    "reads)") if pinned else ""
            parts.append(f"exact rescaling first: {r['conv1']} conv1 and {r['segments']} residual-stream segments"
                         f"{kept}, largest activation {r['peak_before']:.4g} -> {r['peak_after']:.4g}, decode "
                         f"changed by at most {r['max_change']:.2g}")
        else:
            parts.append(f"exact rescaling NOT applied: the decode changed by {r['max_change']:.2g}")
    if fix.get("best_by") == BEST_BY:
        parts.append(f"export_best picked by {BEST_BY}: the step whose fp16 decode of the held-out patches is "
                     "closest to the base's fp32 decode")
    elif fix.get("best_by"):
        parts.append(f"export_best picked by {fix['best_by']} (against the images)")
    if fix.get("safe_step") == 0:
        parts.append("fp16-safe on the held-out patches before the first step: not trained")
    elif fix.get("safe_step") is not None:
        parts.append(f"stopped at step {fix['safe_step']}: fp16-safe on the held-out patches")
    return "fp16-fix: " + "; ".join(parts)


# ----- in a run


class FP16Fix:
    """What a run with the fp16-fix settings (target 'base', act_weight, exact_rescale, stop_when_safe)
    keeps beside the trained copy: the teacher (the base VAE, fp32, frozen), the held-out latents with
    the base's fp32 decode and fp16 figures, an unswapped copy the figures are taken with, and the
    rescaling's report."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.teacher: torch.nn.Module | None = None
        self.shadow: torch.nn.Module | None = None
        self.ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self.patches: torch.Tensor | None = None  # the held-out patches ``ref``'s latents are the base's of
        self.base_figures: dict | None = None
        self.rescale: dict | None = None
        self.start_figures: dict | None = None  # the fp16 figures after the rescaling, before the first step

    @classmethod
    @torch.no_grad()
    def set_up(cls, base: torch.nn.Module, model: torch.nn.Module, cfg, device: torch.device,
               sample: torch.Tensor | None, resumed: dict | None = None) -> FP16Fix | None:
        """None when no fp16-fix setting is on. Else taken on the training copy ``model`` before anything
        else changes it: the base's fp16 figures on ``sample``'s latents (cropped as the export's probe is),
        the teacher (target 'base'), the exact rescaling to act_threshold / RESCALE_MARGIN (on ``sample``'s
        latents, or standard-normal ones without).

        ``resumed``: the :meth:`record` of the checkpoint the run continues (None: a fresh run). The training
        copy is then not rescaled (the checkpoint's weights replace it); the rescaling's report is the
        record's (:data:`UNKNOWN` for a checkpoint written before checkpoints kept it), and the teacher is
        rescaled as the uninterrupted run's was, so that the resumed run trains towards the same decode."""
        if not (cfg.target == "base" or cfg.act_weight > 0 or cfg.stop_when_safe or cfg.exact_rescale):
            return None
        fix, family = cls(cfg), family_of(model)

        def copy_of_base():
            m = copy.deepcopy(base).to(device).eval().requires_grad_(False)
            family.set_up(m, cfg)
            return m

        z = None
        if sample is not None:
            fix.patches = probe_patches(sample.detach().float().cpu(), device)
            z = encode_latents(model, fix.patches, device).to(device)
            fix.ref = (z, base_decode(model, z))
            fix.base_figures = fp16_figures(model, *fix.ref)
            fix.shadow = copy_of_base()

        def rescale(m: torch.nn.Module) -> dict:
            nonlocal z
            if z is None:
                down = family.downsampling(model)
                z = torch.randn(2, latent_channels(model), 64 // down, 64 // down,
                                generator=torch.Generator().manual_seed(cfg.seed)).to(device)
            return exact_rescale(m, z, cfg.act_threshold / RESCALE_MARGIN)

        if resumed is None and cfg.exact_rescale:
            fix.rescale = rescale(model)
            if fix.ref is not None:  # what stop_when_safe looks at before the first step
                fix.start_figures = fp16_figures(model, *fix.ref)
        elif resumed is not None:
            fix.rescale = resumed.get("rescale")
        if cfg.target == "base":
            # the base's function in the weights the training starts from (rescaled: equal within the checked
            # tolerance) and in train mode, as the trained copy is (diffusers' attention decodes differently in
            # eval mode, by ~1e-6): at the start the decode then equals the target exactly, the loss and its
            # gradient are 0 and nothing moves, where AdamW would scale rounding noise up to full-size steps
            fix.teacher = copy.deepcopy(model).requires_grad_(False)
            if resumed is not None and fix.rescaled(cfg):
                # the uninterrupted run's teacher is the rescaled base, which the checkpoint does not hold: the
                # same rescaling on the same latents gives it again
                rescale(fix.teacher)
            fix.teacher.train()
        return fix

    def rescaled(self, cfg) -> bool:
        """Whether the weights the run trains started from the exact rescaling (a record of unknown
        rescaling: when exact_rescale is on now, the likely case)."""
        r = self.rescale
        return bool(r["exact"]) if isinstance(r, dict) else (r == UNKNOWN and cfg.exact_rescale)

    def record(self) -> dict:
        """What a checkpoint keeps for a resumed run to report what this run did before its first step:
        {"rescale": the exact rescaling's report (None: not rescaled)}; :meth:`set_up`'s ``resumed``."""
        return {"rescale": self.rescale}

    @torch.no_grad()
    def target(self, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
               noise: torch.Tensor | None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """target 'base': the teacher's fp32 decode of the latents the trained decoder got (decoder-only: the
        same encoder; with the encoder training, the base encoder's latents of ``x``, with the same noise)."""
        if self.cfg.trainable == "full":
            moments = self.teacher.encode(x.float()).latent_dist
            mean, logvar = moments.mean, moments.logvar
        mean, logvar = mean.float(), logvar.float()
        z = mean + noise * torch.exp(0.5 * logvar) if (self.cfg.posterior == "sample" and noise is not None) else mean
        return self.teacher.decode(perturbed(z, mean, shift)).sample.float()

    def scores(self, params: dict[str, torch.Tensor], step: int) -> dict:
        """fp16_peak, fp16_nonfinite, fp16_psnr of the held-out latents (:func:`fp16_figures`) with the
        trained ``params`` ({name: tensor}) as they are now (the base's figures at step 0); with the encoder
        training, latent_drift too: the RMS change of the held-out patches' latents over their std."""

        full = self.cfg.trainable == "full"
        if step == 0:
            return {**{k: self.base_figures[k] for k in ("fp16_peak", "fp16_nonfinite", "fp16_psnr")},
                    **({"latent_drift": 0.0} if full else {})}
        with torch.no_grad():
            for name, p in params.items():
                self.shadow.get_parameter(name).copy_(p)
        z = self.ref[0]
        if full:  # the trained encoder's latents: what the fp16 decode is taken of, and how far they moved
            z = encode_latents(self.shadow, self.patches, z.device).to(z.device)
        fig = fp16_figures(self.shadow, z, self.ref[1])
        out = {k: fig[k] for k in ("fp16_peak", "fp16_nonfinite", "fp16_psnr")}
        if full:
            out["latent_drift"] = latent_drift(z, self.ref[0])
        return out

    def summary(self, safe_step: int | None, best_by: str | None = None) -> dict:
        """What the run did, for the export's report and metadata (``Trained.fp16_fix``); ``best_by``: with
        export_best, the validation score its pick was made by (:meth:`best_by`)."""
        out = {"rescale": self.rescale, "safe_step": safe_step, "target": self.cfg.target,
               "act_weight": self.cfg.act_weight, "act_threshold": self.cfg.act_threshold}
        if best_by is not None:
            out["best_by"] = best_by
        return out

    def best_by(self) -> str | None:
        """export_best's score when the recipe's target is the base's decode: ``val_fp16_psnr``, the fp16
        decode of the held-out patches against the base's fp32 decode of them (higher is better), not the
        error against the images; None otherwise (or without held-out patches)."""
        return BEST_BY if self.teacher is not None and self.ref is not None else None

    @staticmethod
    def precision(cfg, amp: str, why: str) -> tuple[str, str]:
        """The autocast dtype to train with: not fp16 with target 'base' or the penalty, which train a VAE
        that may overflow fp16 (auto picked it: fp32 instead; asked for: refused)."""
        if amp != "fp16" or not (cfg.act_weight > 0 or cfg.target == "base"):
            return amp, why
        if cfg.precision == "fp16":
            raise VAEFTError("precision fp16 with the fp16-fix settings (target 'base' or act_weight > 0): the VAE "
                             "being fixed may overflow fp16 while it trains; use precision auto, bf16 or fp32")
        return "fp32", "fp32: the fp16-fix settings train a VAE that may overflow fp16 (and this GPU has no bf16)"

    def safe_at_start(self) -> bool:
        """stop_when_safe before the first step: the rescaled decoder is safe on the held-out patches already
        (a VAE that was safe, or that the rescaling made safe, is not trained at all)."""
        fig = self.start_figures if self.start_figures is not None else self.base_figures
        return fig is not None and self.safe({f"val_{k}": v for k, v in fig.items()}, self.cfg.act_threshold)

    @staticmethod
    def safe(scores: dict, threshold: float) -> bool:
        """stop_when_safe's test: the fp16 decode of the held-out patches is finite and its largest activation
        at most ``threshold`` (act_threshold; fp16's limit is 65504)."""
        return scores.get("val_fp16_nonfinite") == 0 and scores.get("val_fp16_peak", float("inf")) <= threshold
