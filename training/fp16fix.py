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
- :func:`measured_rescale` (after it, :func:`rescale_for_fp16`): where the stream grows inside a segment (a
  branch adds a huge output to an ordinary stream) the same plan is not exact (the GroupNorms' epsilon
  meets the segment's small early part); candidate thresholds are tried, the change each costs is
  measured against the base's fp32 decode, and the mildest that fits is kept, within fp16_bound_db.
  (Both in :mod:`training.fp16plan`.)
- :class:`ActivationPenalty`: forward hooks on the decoder's layers that add
  ``Σ_layers mean(relu(|a| / T − 1)²)`` for activations above ``T`` (``act_threshold``), and the
  largest activation seen.
- :func:`fp16_figures`: the decoder in fp16 on latents, against the base's fp32 decode: largest
  activation, NaN/inf pixels, PSNR.
"""

from __future__ import annotations

import copy
import weakref

import torch

from .errors import VAEFTError
from .families import family_of
from .fp16plan import candidate_thresholds, exact_rescale, measured_rescale
from .probe import FP16_MAX, as_dtype, decode_in, encode_latents, latent_drift, probe_patches, psnr
from .vae import latent_channels, teacher_decode


def decoder_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module inside a decoder block (the fp16 report's blocks): the leaves and the
    modules made of them, such as residual blocks, whose outputs are the residual stream's sums (the Wan
    family's 2D path runs their hooks too)."""
    block_of = family_of(model).decoder_block
    return [(n, m) for n, m in model.named_modules() if n and block_of(n) is not None]


# ----- the head start (training/fp16plan.py)

# the rescaling brings the probe's activations to act_threshold / RESCALE_MARGIN: other images' latents (training
# patches, posterior samples) reach higher, and only above act_threshold does the penalty start moving weights
RESCALE_MARGIN = 8


def rescale_for_fp16(model: torch.nn.Module, latents: torch.Tensor, reference: torch.Tensor, cfg) -> dict:
    """The head start on ``model`` (in place): :func:`exact_rescale` to act_threshold / RESCALE_MARGIN, then,
    when the largest activation on ``latents`` is still above act_threshold and the decoder's stream can be
    rescaled, :func:`measured_rescale` over :func:`candidate_thresholds` within fp16_bound_db of change against
    ``reference`` (the base's fp32 decode of ``latents``, clamped). Returns exact_rescale's report, with
    "measured" (measured_rescale's) when that ran."""
    report = exact_rescale(model, latents, cfg.act_threshold / RESCALE_MARGIN)
    if report["stream"] and not report["peak_after"] <= cfg.act_threshold:
        report["measured"] = measured_rescale(model, latents, reference, candidate_thresholds(cfg.act_threshold),
                                              cfg.fp16_bound_db)
    return report


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
        above = fix.get("penalty_threshold", fix["act_threshold"])
        parts.append(f"activations above {above:g} penalised (weight {fix['act_weight']:g})"
                     + (f", not {fix['act_threshold']:g}: see the measured rescaling" if above != fix["act_threshold"]
                        else ""))
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
        if r.get("measured"):
            parts.append(_measured_note(r["measured"]))
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


def _measured_note(m: dict) -> str:
    """The measured rescaling's part of :func:`fp16_fix_note`: what was scaled, by how much, what it cost."""
    tried = ", ".join(f"{c['threshold']:g}: {c['psnr_fp16']:.1f} dB" for c in m["candidates"])
    if not m["applied"]:
        return f"measured rescaling NOT applied ({m['why']}; fp16 PSNR against the base per threshold: {tried})"
    by: dict[str, list[str]] = {}
    for name, (w, b) in m["scaled"].items():
        by.setdefault(f"weight x{w:g}, bias x{b:g}", []).append(name.removeprefix("decoder."))
    scaled = "; ".join(f"{f}: {', '.join(names)}" for f, names in by.items())
    return (f"measured rescaling (not exact: the stream grows inside a segment), {m['why']}: decode against the base's fp32 decode {m['psnr_fp32']:.1f} dB in fp32, "
            f"{m['psnr_fp16']:.1f} dB in fp16 (largest activation {m['fp16_peak']:.4g}; bound {m['bound_db']:g} dB); "
            f"per threshold: {tried}; scaled ({len(m['scaled'])} layers): {scaled}")


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
            reference = fix.ref[1] if fix.ref is not None else base_decode(m, z)  # m is still the base here
            return rescale_for_fp16(m, z, reference, cfg)

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
        """Whether the weights the run trains started from a rescaling, exact or measured (a record of unknown
        rescaling: when exact_rescale is on now, the likely case)."""
        r = self.rescale
        if not isinstance(r, dict):
            return r == UNKNOWN and cfg.exact_rescale
        return bool(r["exact"]) or bool((r.get("measured") or {}).get("applied"))

    def _measured(self) -> dict | None:
        m = self.rescale.get("measured") if isinstance(self.rescale, dict) else None
        return m if m and m["applied"] else None

    @property
    def threshold(self) -> float:
        """The largest activation the held-out patches may reach (stop_when_safe's test): act_threshold, or the
        measured rescaling's threshold when it kept a milder one (a harsher one cost the output more)."""
        m = self._measured()
        return max(self.cfg.act_threshold, m["threshold"]) if m else self.cfg.act_threshold

    @property
    def penalty_threshold(self) -> float:
        """The penalty's threshold: act_threshold; after a measured rescaling twice its threshold (at most
        fp16's 65504). The kept scale leaves the held-out patches only that margin of 2, and training patches
        reach somewhat higher: any penalty at all moves every decoder weight by about lr per step (AdamW
        normalises the gradient), which would train away the output the milder scale kept (measured on the
        issue's VAE: 71.7 -> 44.8 dB in 20 steps at a penalty of 1e-7)."""
        return min(FP16_MAX, 2 * self.threshold) if self._measured() else self.cfg.act_threshold

    def record(self) -> dict:
        """What a checkpoint keeps for a resumed run to report what this run did before its first step:
        {"rescale": the exact rescaling's report (None: not rescaled)}; :meth:`set_up`'s ``resumed``."""
        return {"rescale": self.rescale}

    @torch.no_grad()
    def target(self, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
               noise: torch.Tensor | None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """target 'base': the teacher's fp32 decode of the latents the trained decoder got (decoder-only: the
        same encoder; with the encoder training, the base encoder's latents of ``x``, with the same noise, and the
        same latent_noise ``shift``, scaled by the trained encoder's spread as the trained decoder's was)."""
        spread = mean
        if self.cfg.trainable == "full":
            moments = self.teacher.encode(x.float()).latent_dist
            mean, logvar = moments.mean, moments.logvar
        return teacher_decode(self.teacher, mean, logvar, noise if self.cfg.posterior == "sample" else None, shift,
                              spread=spread)

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
               "act_weight": self.cfg.act_weight, "act_threshold": self.cfg.act_threshold,
               "threshold": self.threshold, "penalty_threshold": self.penalty_threshold,
               "bound_db": self.cfg.fp16_bound_db}
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
        return fig is not None and self.safe({f"val_{k}": v for k, v in fig.items()})

    def safe(self, scores: dict) -> bool:
        """stop_when_safe's test: the fp16 decode of the held-out patches is finite, its largest activation at
        most :attr:`threshold` (fp16's limit is 65504) and its PSNR against the base's fp32 decode at least
        fp16_bound_db (a decode made finite by losing the output is not safe)."""
        return (scores.get("val_fp16_nonfinite") == 0 and scores.get("val_fp16_peak", float("inf")) <= self.threshold
                and scores.get("val_fp16_psnr", 0.0) >= self.cfg.fp16_bound_db)
