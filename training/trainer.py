"""The fine-tuning loop. :func:`fine_tune` comes first and reads top to bottom; what it calls follows.

One optimizer step: take the step's batch of [-1, 1] patches (batch k depends only on the seed and
k, so a resumed run sees the same data), split it into micro-batches, and for each: augment, encode
(no grad when the encoder is frozen), decode with gradient, loss, backward. Then clip, AdamW (skipped
on the device, without a host sync, when the gradient is not finite), EMA, and optionally a
discriminator step. Checkpoints hold every tensor by name (:mod:`training.checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import amp
from .alpha import on_checkerboard
from .checkpoint import Checkpoints, checkpoint_state, fp16_fix_record, load_checkpoint, restore_checkpoint
from .config import TrainConfig
from .device import Distributed, pick_device, resolve_precision
from .ema import EMA
from .errors import VAEFTError
from .fp16fix import BEST_BY, ActivationPenalty, FP16Fix
from .fused_blocks import autocast_group_norms, fuse_vae_blocks
from .fused_norm import triton_available
from .imageio import signed_to_unit
from .losses import (PatchDiscriminator, ReconstructionLoss, adaptive_gan_weight, hinge_d_loss, kl_divergence,
                     load_lpips)
from .loop_state import LoopState
from .memory import is_out_of_memory, memory_kind, out_of_memory_named
from .metrics import validation_scores
from .families import Family, trained
from .vae import (LoadedVAE, Reconstruct, frozen_sha256, image_channels, latent_channels, reconstruct,
                  teacher_decode, trainable_shapes, trained_sha256)


@dataclass
class Callbacks:
    """Hooks the caller supplies; all optional.

    on_step(step, total_steps, losses) after each optimizer step; ``losses`` is a dict of
        floats only on logging steps (every ``log_every``), else None, so no host sync
        happens on other steps.
    on_preview(step, images) with images (2N, 3, H, W) in [0, 1]: inputs, then recons (RGBA over a checkerboard).
    on_log(line) for every line added to the history (training terms at logging steps,
        validation scores, and the base VAE's scores at step 0), as it is added.
    on_checkpoint(step, path) after a checkpoint was written.
    should_stop() polled before every micro-batch; True ends training early (cancel): the step
        reached is checkpointed (when checkpoints are on) and the result has stopped_early.
    Raising from any hook aborts training at once, without a checkpoint of the step reached.
    """

    on_step: Callable[[int, int, dict | None], None] | None = None
    on_log: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None
    on_preview: Callable[[int, torch.Tensor], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass(repr=False)
class LoopResult:
    """What :func:`fine_tune` did. The session turns it into a :class:`training.trained.Trained` for export."""

    model: torch.nn.Module          # AutoencoderKL holding the weights to export (EMA if chosen), frozen, eval
    config: TrainConfig             # the config trained with (validation off when there was nothing to score)
    steps_done: int
    base_frozen_sha256: str         # of the base model's untrained tensors (vae.frozen_sha256), re-checked at export
    history: list[dict] = field(default_factory=list)  # {"step", "lr", "total", "mse", "lpips", ...}
    stopped_early: bool = False
    seconds: float = 0.0
    used_ema: bool = False
    best_step: int | None = None    # with export_best: the step whose weights the model holds
    precision: str = ""             # the autocast dtype used and why (precision auto picks by GPU)
    micro_batch: int = 0            # what the run settled on
    skipped_steps: int = 0          # non-finite steps that were skipped
    fused_norms: int = 0            # GroupNorms that ran as fused Triton kernels (0 = PyTorch's)
    latent_cache_hits: int = 0      # patches whose encoder output came from the latent cache
    rank_digests: list[str] | None = None  # under torchrun: each rank's trained weights' sha256 (all equal)
    run_id: str = ""                # the run's identity: kept across resumes, stored in its checkpoints
    checkpoint: str | None = None   # the last checkpoint written, if any
    fp16_fix: dict | None = None    # what the fp16-fix settings did (FP16Fix.summary); None when none was on

    def __repr__(self) -> str:
        return f"LoopResult(steps_done={self.steps_done}, stopped_early={self.stopped_early})"


@out_of_memory_named("outside the training step's forward/backward",
                     "free memory (unload other models), lower val_patches, patch_size or batch_size, or turn on "
                     "grad_checkpointing")
def fine_tune(vae: LoadedVAE, batches, cfg: TrainConfig, *,
              device: torch.device | str | None = None,
              lpips_net: torch.nn.Module | None = None,
              augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
              preview_batch: torch.Tensor | None = None,
              val_batch: torch.Tensor | None = None,
              general_batch: torch.Tensor | None = None,
              callbacks: Callbacks | None = None,
              resume: str | os.PathLike | dict | None = None,
              checkpoints: Checkpoints | str | os.PathLike | None = None,
              dist: Distributed | None = None,
              data_signature: dict | None = None,
              run_id: str | None = None,
              teacher: torch.nn.Module | None = None) -> LoopResult:
    """Fine-tune a copy of ``vae.model``; the input model is never modified.

    batches: ``start_step -> iterator`` (needed to resume) or an iterator; each item is this
        process's share of one optimizer step: (batch_size / world_size, C, P, P) in [-1, 1] (C = 3, RGBA 4), or a
        (patches, keys) pair where keys (int64 per patch, or None) are stable patch ids: with no
        ``augment`` and the encoder frozen, the encoder's output is then cached per id
        (``cfg.latent_cache_mb``) and reused instead of encoding the patch again.
    lpips_net: a loaded LPIPS network; loaded from disk (see losses.load_lpips) when None
        and ``cfg.lpips_weight > 0``.
    augment: ``augment(batch, seed)``, applied to each batch on the device; ``seed`` is an int
        fixed by (cfg.seed, rank, step), so a resumed run augments as an uninterrupted one.
    preview_batch: fixed BCHW [-1, 1] patches reconstructed every ``preview_every`` steps.
    val_batch: held-out BCHW [-1, 1] patches scored every ``val_every`` steps (the weights that
        would be exported: EMA when on) and once before the first step (the base VAE's scores,
        history step 0); ``export_best`` keeps the best of the trained ones.
    general_batch: optional BCHW [-1, 1] patches of other ("general") images, scored with the
        validation patches as ``gen_*``: does the fine-tune harm images outside the domain?
    resume: a checkpoint written by this function to continue from (its run identity is kept): its
        path, or the dict :func:`training.checkpoint.load_checkpoint` read and checked already.
    checkpoints: where and when to write checkpoints (main process only): a
        :class:`~training.checkpoint.Checkpoints`, or a file path (written every
        ``cfg.checkpoint_every`` steps or ``cfg.checkpoint_minutes``, at the end, and when stopped).
        Checked before the first step: a file of another run there is refused.
    dist: set when running under torchrun; the process group must already be initialised.
    data_signature: what determines ``batches``' order (data settings, image list), JSON-like;
        stored in checkpoints, and a resume with a different one is refused.
    run_id: the run's identity for its checkpoints (default: the resumed checkpoint's, else a new one).
    teacher: distil (:mod:`training.distil`): a module with the same encoder whose fp32 decode of the latents the
        model got is the target (the images weigh ``cfg.image_weight`` beside it); validation adds ``val_teacher_*``.
    The global RNG of the calling process is left as it was.
    """
    callbacks = callbacks or Callbacks()
    dist = dist or Distributed()
    device = torch.device(device) if device is not None else pick_device(None, dist)
    cfg = check_run(cfg, dist, val_batch)
    local_batch = cfg.batch_size // dist.world_size
    if resume is not None and not callable(batches):
        raise VAEFTError("resuming needs batches as a function of the start step (to replay the data order)")

    base_digest = frozen_sha256(vae.model, cfg.trainable)
    if resume is not None and not isinstance(resume, dict):
        resume = load_checkpoint(resume, vae.layout, cfg, trainable_shapes(vae.model, cfg.trainable), dist.world_size,
                                 data_signature)
    s = _set_up(vae, cfg, device, dist, lpips_net, augment, callbacks,
                sample=val_batch if val_batch is not None else preview_batch,
                resumed=fp16_fix_record(resume) if resume is not None else None, teacher=teacher)
    state = LoopState.new(device, loss_scaling=s.amp == "fp16")
    if resume is not None:
        loop = restore_checkpoint(resume, params=s.params, opt=s.opt, ema=s.ema, disc=s.disc, disc_opt=s.disc_opt)
        state = LoopState.from_state_dict(loop, device, loss_scaling=s.amp == "fp16")
        if cfg.export_best:
            _rescore_best(state, _best_by(s))
    run_id = (resume.get("run_id") if resume is not None else None) or run_id or uuid.uuid4().hex
    if checkpoints is not None and not isinstance(checkpoints, Checkpoints):
        checkpoints = Checkpoints(checkpoints, every_steps=cfg.checkpoint_every, every_minutes=cfg.checkpoint_minutes)
    if checkpoints is not None and dist.is_main:
        checkpoints.claim(run_id, resumed_from=resume.get("path") if resume is not None else None)
    else:
        checkpoints = None

    def log(line: dict) -> None:
        if callbacks.on_log:
            callbacks.on_log(line)

    def save(step: int) -> None:
        path = checkpoints.write(step, checkpoint_state(
            cfg=cfg, layout=vae.layout, step=step, params=s.params, opt=s.opt, ema=s.ema, disc=s.disc,
            disc_opt=s.disc_opt, loop=state.state_dict(), world_size=dist.world_size, data_signature=data_signature,
            fp16_fix=s.fix.record() if s.fix is not None else None))
        if callbacks.on_checkpoint:
            callbacks.on_checkpoint(step, path)

    if cfg.val_every and state.step == 0:  # the base VAE's scores: every curve starts from "before"
        state.history.append({"step": 0, **_scores(s, state, val_batch, general_batch)})
        log(state.history[-1])
    stream = _batch_stream(batches, state.step, image_channels(s.model), local_batch)

    # ---- the loop
    found_inf = torch.zeros((), device=device)
    micro, stopped, t0 = cfg.micro_batch or local_batch, False, time.perf_counter()
    safe_step = 0 if cfg.stop_when_safe and state.step == 0 and s.fix.safe_at_start() else None
    while state.step < cfg.steps and safe_step is None:
        step = state.step
        for o in (s.opt, s.disc_opt):
            for g in (o.param_groups if o is not None else ()):
                g["lr"] = lr_at(step, cfg)
        x_all, keys = next(stream)
        while True:  # retry the step at a smaller micro-batch when it runs out of memory (GPU or CPU)
            try:
                parts, stopped = _accumulate(s, x_all, keys, step=step, micro=micro, loss_scale=state.loss_scale)
                break
            except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(e):
                    raise
                s.opt.zero_grad(set_to_none=True)
                if s.disc is not None:
                    s.disc.zero_grad(set_to_none=True)
                smaller = _largest_divisor_below(local_batch, micro)
                if cfg.micro_batch or not smaller:
                    raise VAEFTError(
                        f"out of {memory_kind(e)} memory at micro-batch {micro} with {x_all.shape[-1]}² patches; turn "
                        "on grad_checkpointing, lower patch_size or batch_size, or set a smaller micro_batch") from None
                micro = smaller
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if stopped:
            s.opt.zero_grad(set_to_none=True)
            break
        _update(s, state, step, found_inf)
        state.add(parts, found_inf)
        step = state.step

        logged = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            logged = state.log_line(s.opt.param_groups[0]["lr"])
            if int(state.worst_run) >= cfg.max_bad_steps:
                raise VAEFTError(
                    f"{int(state.worst_run)} consecutive steps had a non-finite loss or gradient (each was "
                    "skipped); stopping. Lower lr, check the data for broken images, or use precision fp32")
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            scores = _scores(s, state, val_batch, general_batch)
            if logged is not None:
                logged.update(scores)
            else:
                state.history.append({"step": step, **scores})
            if cfg.stop_when_safe and s.fix.safe(scores):
                safe_step = step
        if state.history and state.history[-1]["step"] == step:
            log(state.history[-1])
        if callbacks.on_step:
            callbacks.on_step(step, cfg.steps, logged)
        if (callbacks.on_preview and preview_batch is not None and cfg.preview_every
                and (step % cfg.preview_every == 0 or step == cfg.steps)):
            callbacks.on_preview(step, _preview(s.model, preview_batch, device, s.autocast))
        if checkpoints is not None and checkpoints.due(step, final=step == cfg.steps or safe_step is not None):
            save(step)
        if safe_step is not None:
            break  # stop_when_safe: the fp16 decode is safe, with the margin its threshold leaves, within the bound
    if stopped and checkpoints is not None and checkpoints.due(state.step, final=True):
        save(state.step)  # Cancel: keep the steps done so far

    used_ema = _finish(s, state)
    return LoopResult(
        model=s.model, config=cfg, steps_done=state.step, base_frozen_sha256=base_digest, history=state.history,
        stopped_early=stopped, seconds=time.perf_counter() - t0, used_ema=used_ema,
        best_step=state.best["step"] if cfg.export_best and state.best["params"] is not None else None,
        precision=s.amp_why, micro_batch=micro, skipped_steps=int(state.skipped), fused_norms=s.fused,
        latent_cache_hits=s.cache.hits if s.cache is not None else 0,
        rank_digests=_check_ranks_agree(s.model, cfg.trainable, dist) if dist.world_size > 1 else None,
        run_id=run_id, checkpoint=checkpoints.written[-1] if checkpoints is not None and checkpoints.written else None,
        fp16_fix=s.fix.summary(safe_step, _best_by(s) if cfg.export_best else None) if s.fix is not None else None)


def check_run(cfg: TrainConfig, dist: Distributed, val_batch: torch.Tensor | None) -> TrainConfig:
    """Refuse settings that cannot run with this many processes and these held-out patches (before
    anything is written); returns the config to train with (validation off without patches to score)."""
    if cfg.batch_size % dist.world_size:
        raise VAEFTError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes "
                         f"({dist.world_size})")
    local_batch = cfg.batch_size // dist.world_size
    if cfg.micro_batch and local_batch % cfg.micro_batch:
        raise VAEFTError(f"each process's batch ({local_batch}) must be a multiple of micro_batch "
                         f"({cfg.micro_batch})")
    if cfg.val_every and val_batch is None:
        if cfg.export_best:
            raise VAEFTError("export_best needs held-out patches: the dataset has no validation images "
                             "(raise val_fraction, add images, or turn export_best off)")
        cfg = cfg.replace(val_every=0)  # nothing to score: validation is off
    return cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of optimizer step ``step`` on process ``rank``: augmentation and posterior noise of a
    step are the same in an uninterrupted and a resumed run, with no RNG state to carry. Drawn from
    ``numpy.random.SeedSequence([seed, rank, step])``, so distinct triples never share a seed by
    arithmetic (as ``seed * K + step`` would); an int in [0, 2**63)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ----- set-up: what the steps share


@dataclass
class _Run:
    """A run's set-up: what every optimizer step uses and no step changes (built once by :func:`_set_up`)."""

    cfg: TrainConfig
    device: torch.device
    model: torch.nn.Module            # the family's module being trained
    family: Family                    # its VAE family
    module: torch.nn.Module           # Reconstruct around it (DDP-wrapped / compiled as asked)
    reconstruct: Reconstruct          # that Reconstruct itself (a tiny student's side loss is read off it)
    loss_fn: ReconstructionLoss
    autocast: torch.autocast
    dist: Distributed
    channels_last: bool
    augment: Callable | None = None
    disc: torch.nn.Module | None = None
    base_encoder: torch.nn.Module | None = None
    cache: _LatentCache | None = None
    callbacks: Callbacks = field(default_factory=Callbacks)
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # the trained ones, by name
    opt: torch.optim.Optimizer | None = None
    disc_opt: torch.optim.Optimizer | None = None
    ema: EMA | None = None
    lpips_net: torch.nn.Module | None = None
    amp: str = "fp32"                 # the autocast dtype: bf16, fp16 (with loss scaling) or fp32
    amp_why: str = ""
    fused: int = 0                    # GroupNorms swapped for the fused kernels
    restore_modules: Callable[[], None] | None = None  # undoes the norm swaps
    fix: FP16Fix | None = None                   # the fp16-fix settings' teacher, figures and rescaling
    penalty: ActivationPenalty | None = None     # act_weight > 0: hooks on the decoder's layers
    teacher: torch.nn.Module | None = None       # distil: the frozen teacher (fp32, eval) whose decode is the target


def _set_up(vae: LoadedVAE, cfg: TrainConfig, device: torch.device, dist: Distributed,
             lpips_net: torch.nn.Module | None, augment, callbacks: Callbacks,
             sample: torch.Tensor | None = None, resumed: dict | None = None,
             teacher: torch.nn.Module | None = None) -> _Run:
    """A private fp32 copy of the model set up for training (trainable set, precision, fused norms,
    memory layout, DDP, compile) with its loss, optimizers, EMA, and the fp16-fix parts (``sample``: patches;
    ``resumed``: the fp16-fix record of the checkpoint the run continues, None for a fresh run)."""
    model = copy.deepcopy(vae.model).to(device)  # build_vae made it fp32: the master weights
    family = vae.family
    params = {name: p for name, p in model.named_parameters()
              if p.requires_grad_(trained(name, cfg.trainable, family)).requires_grad}
    family.check_config(cfg)  # (the session checked it before writing anything; fine_tune's own callers too)
    family.set_up(model, cfg)
    fix = FP16Fix.set_up(vae.model, model, cfg, device, sample, resumed)  # before anything else changes the copy
    on_cuda = device.type == "cuda"
    amp, amp_why = resolve_precision(cfg.precision, device)
    amp, amp_why = FP16Fix.precision(cfg, amp, amp_why)
    fused, restore_modules = 0, None  # the norm swaps are made on our private copy only
    if family.fused_norms and cfg.fused_norm and on_cuda and amp != "fp16" and triton_available():
        fused, restore_modules = fuse_vae_blocks(model)
    elif family.fused_norms and amp == "bf16" and cfg.norm_in_bf16:
        _, restore_modules = autocast_group_norms(model)
    # (channels-last is a 4D layout: a model with 3D convolutions (the Wan family) keeps its own)
    channels_last = on_cuda and (cfg.channels_last or bool(fused)) and all(p.ndim <= 4 for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "fp32")
    if cfg.lpips_weight > 0 and lpips_net is None:
        lpips_net = load_lpips(cfg.lpips_net, cfg.lpips_backbone)
    if lpips_net is not None:
        # a private copy: the caller's network keeps its device and dtype; frozen, so bf16 under bf16
        lpips_net = copy.deepcopy(lpips_net).to(device, torch.bfloat16 if amp == "bf16" else None).eval()
        lpips_net.requires_grad_(False)
    # after the norm swaps (the swapped-in modules are watched too), before DDP and compile wrap the model
    threshold = fix.penalty_threshold if fix is not None else cfg.act_threshold  # a measured rescaling raises it
    penalty = ActivationPenalty(model, threshold) if cfg.act_weight > 0 else None
    reconstruct = Reconstruct(model, cfg.trainable == "full", cfg.posterior == "sample",
                              torch.channels_last if channels_last else torch.contiguous_format)
    module: torch.nn.Module = reconstruct
    if dist.world_size > 1:
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if on_cuda else None)
    if cfg.compile:
        module = torch.compile(module)
    s = _Run(cfg, device, model, family, module, reconstruct, ReconstructionLoss(cfg.mse_weight, cfg.l1_weight, cfg.lpips_weight,
                                                             lpips_net),
              autocast, dist, channels_last, augment, callbacks=callbacks, params=params, lpips_net=lpips_net,
              amp=amp, amp_why=amp_why, fused=fused, restore_modules=restore_modules)
    if teacher is not None:
        s.teacher = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    if cfg.latent_weight:
        s.base_encoder = Reconstruct(copy.deepcopy(vae.model).to(device).eval(), False, False)
    if cfg.latent_cache_mb and cfg.trainable == "decoder" and augment is None:
        s.cache = _LatentCache(cfg.latent_cache_mb * 2**20)
    s.opt = torch.optim.AdamW(params.values(), lr=lr_at(0, cfg), weight_decay=cfg.weight_decay, fused=True)
    if cfg.gan_weight > 0:
        with torch.random.fork_rng(devices=[]):  # the same init on every rank, the caller's RNG untouched
            torch.manual_seed(cfg.seed)
            s.disc = PatchDiscriminator(in_channels=image_channels(model)).to(device)  # RGBA: alpha is judged too
        s.disc_opt = torch.optim.AdamW(s.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0,
                                       fused=True)
    s.fix, s.penalty = fix, penalty
    s.ema = EMA(params, cfg.ema_decay) if cfg.ema else None
    return s


class _LatentCache:
    """The frozen encoder's (mean, logvar) per patch id, on the training device, up to a byte
    budget (patches past it are simply encoded each time). Only used when the same patch (same
    id) always has the same pixels: grid sampling without augmentation, encoder frozen."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits = max_bytes, 0, 0
        self.store: dict[int, torch.Tensor] = {}

    def get(self, keys: list[int]) -> torch.Tensor | None:
        if not keys or any(k not in self.store for k in keys):
            return None
        self.hits += len(keys)
        return torch.stack([self.store[k] for k in keys])

    def put(self, keys: list[int], mean: torch.Tensor, logvar: torch.Tensor) -> None:
        moments = torch.cat([mean.detach(), logvar.detach()], dim=1)
        for k, m in zip(keys, moments):
            size = m.numel() * m.element_size()
            if k not in self.store and self.bytes + size <= self.max_bytes:
                self.store[k] = m.clone()
                self.bytes += size


# ----- the step and what follows it


def _batch_stream(batches, start: int, in_channels: int, local_batch: int):
    """The caller's batches from optimizer step ``start`` on as one stream of (patches, keys or
    None), each checked: (local_batch, in_channels, P, P), keys one per patch."""
    items = batches(start) if callable(batches) else batches
    for item in items:
        x, keys = item if isinstance(item, (tuple, list)) else (item, None)
        if keys is not None and len(keys) != x.shape[0]:
            raise VAEFTError(f"a training batch has {x.shape[0]} patches but {len(keys)} keys")
        if x.ndim != 4 or x.shape[1] != in_channels:
            raise VAEFTError(f"training batches have shape {tuple(x.shape)} but this VAE takes "
                             f"{in_channels}-channel images (B, C, H, W)")
        if x.shape[0] != local_batch:
            raise VAEFTError(f"a training batch has {x.shape[0]} patches; expected {local_batch}")
        yield x, keys


LATENT_NOISE_SALT = 0x6C6E6F69  # latent_noise's generator: the step's seed, salted ("lnoi")


def _accumulate(s: _Run, x_all: torch.Tensor, keys: torch.Tensor | None, *, step: int, micro: int,
                loss_scale: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward/backward over the micro-batches of optimizer step ``step`` (gradients multiplied by
    ``loss_scale`` under fp16). Returns (loss parts averaged over the batch, on the device; stopped)."""
    cfg, device = s.cfg, s.device
    seed = step_seed(cfg.seed, s.dist.rank, step)
    x_all = x_all.to(device, non_blocking=True).float()
    if x_all.is_inference():  # ComfyUI hands over tensors made under inference_mode
        x_all = x_all.clone()
    if s.augment is not None:
        x_all = s.augment(x_all, seed)
    if s.channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    chunks = x_all.split(micro)
    cache = s.cache if keys is not None else None
    key_chunks = [k.tolist() for k in keys.split(micro)] if cache is not None else [None] * len(chunks)
    gen = torch.Generator(device=device).manual_seed(seed) if cfg.posterior == "sample" else None
    shift_gen = torch.Generator(device=device).manual_seed(seed ^ LATENT_NOISE_SALT) if cfg.latent_noise > 0 else None
    parts_sum: dict[str, torch.Tensor] = {}
    gan_on = s.disc is not None and step >= cfg.disc_start
    for i, x in enumerate(chunks):
        if s.callbacks.should_stop and s.callbacks.should_stop():
            return parts_sum, True
        share = x.shape[0] / x_all.shape[0]
        sync = getattr(s.module, "no_sync", None)  # DDP: all-reduce gradients on the last micro-batch only
        with sync() if (sync is not None and i < len(chunks) - 1) else contextlib.nullcontext():
            down = s.family.downsampling(s.model)
            shape = (x.shape[0], latent_channels(s.model), x.shape[2] // down, x.shape[3] // down)
            noise = torch.randn(shape, generator=gen, device=device) if gen is not None else None
            # latent_noise: its own stream, so a run without it draws what it always did
            shift = (cfg.latent_noise * torch.randn(shape, generator=shift_gen, device=device)
                     if shift_gen is not None else None)
            cached = cache.get(key_chunks[i]) if cache is not None else None
            if s.penalty is not None:
                s.penalty.clear()
            with s.autocast:
                recon, mean, logvar = s.module(x, noise, cached, shift)
            if cache is not None and cached is None:
                cache.put(key_chunks[i], mean, logvar)
            if s.teacher is not None:  # distil: the teacher's fp32 decode, what validation and the figures compare with
                target = teacher_decode(s.teacher, mean, logvar, noise if cfg.posterior == "sample" else None, shift)
            else:
                target = x if s.fix is None or s.fix.teacher is None else s.fix.target(x, mean, logvar, noise, shift)
            with s.autocast:
                rec_loss, parts = s.loss_fn(recon, target)
                loss = rec_loss
                if s.teacher is not None and cfg.image_weight > 0:  # distil: the images beside the teacher's decode
                    img_loss, _ = s.loss_fn(recon, x)
                    parts["image"] = img_loss.detach()
                    loss = loss + cfg.image_weight * img_loss
                if s.reconstruct.side_loss is not None:  # a tiny student's encoder
                    parts["enc_mse"] = s.reconstruct.side_loss.detach()
                    loss = loss + s.reconstruct.side_loss
                if s.penalty is not None:
                    act, peak = s.penalty.take()
                    parts["act"], parts["act_peak"] = act.detach(), peak
                    loss = loss + cfg.act_weight * act
                if cfg.kl_weight and cfg.trainable == "full":
                    kl = kl_divergence(mean.float(), logvar.float())
                    parts["kl"] = kl.detach()
                    loss = loss + cfg.kl_weight * kl
                if s.base_encoder is not None:
                    with torch.no_grad():
                        _, base_mean, _ = s.base_encoder(x, None)
                    lat = torch.nn.functional.mse_loss(mean.float(), base_mean.float())
                    parts["latent"] = lat.detach()
                    loss = loss + cfg.latent_weight * lat
                if gan_on:
                    s.disc.requires_grad_(False)
                    g_loss = -s.disc(recon).float().mean()
                    w = adaptive_gan_weight(rec_loss, g_loss, s.family.last_layer(s.model),
                                            cfg.gan_weight)
                    parts["g_loss"], parts["gan_w"] = g_loss.detach(), w
                    loss = loss + w * g_loss
            (loss * (share if loss_scale is None else share * loss_scale)).backward()
            if gan_on:
                s.disc.requires_grad_(True)
                with s.autocast:
                    d_loss = hinge_d_loss(s.disc(x).float(), s.disc(recon.detach()).float())
                (d_loss * (share if loss_scale is None else share * loss_scale)).backward()
                parts["d_loss"] = d_loss.detach()
        parts["total"] = loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.float() * share
    return parts_sum, False


def _largest_divisor_below(n: int, below: int) -> int:
    for m in range(min(below, n) - 1, 0, -1):
        if n % m == 0:
            return m
    return 0


def _update(s: _Run, state: LoopState, step: int, found_inf: torch.Tensor) -> None:
    """After the backward passes of ``step``: unscale (fp16), clip, the optimizer steps, EMA. A
    non-finite gradient skips the update on the device (``found_inf``), without a host sync; the
    count is read at logging steps."""
    found_inf.zero_()
    amp.unscale_(s.params.values(), found_inf, state.loss_scale)
    norm = torch.nn.utils.clip_grad_norm_(s.params.values(), s.cfg.grad_clip if s.cfg.grad_clip > 0 else float("inf"))
    torch.maximum(found_inf, (~torch.isfinite(norm)).float(), out=found_inf)
    amp.fused_step(s.opt, found_inf)
    if s.ema is not None:
        s.ema.update(step, found_inf)
    if s.disc_opt is None or step < s.cfg.disc_start:
        amp.update_scale(state.loss_scale, state.scale_growth, found_inf)
        return
    if s.dist.world_size > 1:  # the discriminator is not DDP-wrapped: average its gradients here
        for p in s.disc.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(s.dist.world_size)
    d_inf = torch.zeros_like(found_inf)
    amp.unscale_(s.disc.parameters(), d_inf, state.loss_scale)
    d_norm = torch.nn.utils.clip_grad_norm_(s.disc.parameters(), float("inf"))
    d_inf = torch.maximum(torch.maximum((~torch.isfinite(d_norm)).float(), d_inf), found_inf)
    amp.fused_step(s.disc_opt, d_inf)
    amp.update_scale(state.loss_scale, state.scale_growth, d_inf)


def _scores(s: _Run, state: LoopState, val_batch: torch.Tensor, general_batch: torch.Tensor | None) -> dict:
    """Validation (and general-image) scores with the weights that would be exported (the EMA when
    on); export_best's pick is updated from step 1 on."""
    swap = s.ema.swapped_in() if (s.ema is not None and s.cfg.export_ema) else contextlib.nullcontext()
    with swap:
        scores = {f"val_{k}": v for k, v in validation_scores(s.model, val_batch, s.device, s.autocast, s.lpips_net,
                                                               latent_noise=s.cfg.latent_noise, seed=s.cfg.seed,
                                                               teacher=s.teacher).items()}
        if general_batch is not None:
            scores.update({f"gen_{k}": v for k, v in
                           validation_scores(s.model, general_batch, s.device, s.autocast, s.lpips_net).items()})
        if s.fix is not None and s.fix.ref is not None:
            scores.update({f"val_{k}": v for k, v in s.fix.scores(s.params, state.step).items()})
        if s.cfg.export_best and state.step > 0:
            by = _best_by(s)
            state.consider_best(_best_score(by, scores), s.params, by=by)
    return scores


def _best_by(s: _Run) -> str:
    """The validation score export_best picks by: with target 'base' (the fp16-fix recipe) ``val_fp16_psnr``,
    the fp16 decode of the held-out patches against the base's fp32 decode (the recipe's goal); else the error
    against the images, ``val_lpips`` (``val_mse`` when LPIPS is off)."""
    by = s.fix.best_by() if s.fix is not None else None
    against = "val_teacher_" if s.teacher is not None else "val_"  # distil: the error against the teacher's decode
    return by or (against + ("lpips" if s.lpips_net is not None else "mse"))


def _best_score(by: str, scores: dict) -> float:
    """``scores``' value of ``by`` as export_best compares it: lower is better (a PSNR is negated)."""
    return -scores[by] if by == BEST_BY else scores[by]


def _rescore_best(state: LoopState, by: str) -> None:
    """A resumed export_best pick made by another score than ``by`` (a checkpoint written before picks
    recorded theirs: by the images' error, also with target 'base') is scored again by ``by`` from its
    step's history line (worst when that line lacks it), so that the steps after the resume compete with it."""
    best = state.best
    if best["params"] is None:
        return
    line = next((h for h in reversed(state.history) if h["step"] == best["step"] and "val_mse" in h), {})
    was = best.get("by") or ("val_lpips" if "val_lpips" in line else "val_mse")
    if was != by:
        state.best = {**best, "score": _best_score(by, line) if by in line else float("inf"), "by": by}


@torch.no_grad()
def _preview(model, batch: torch.Tensor, device, autocast) -> torch.Tensor:
    was_training = model.training
    model.eval()
    x = batch.to(device).float()
    with autocast:
        recon = reconstruct(model, x).float()
    model.train(was_training)
    return on_checkerboard(signed_to_unit(torch.cat([x, recon]))).cpu()


def _finish(s: _Run, state: LoopState) -> bool:
    """Put the weights to export into the model (EMA, or export_best's pick), undo the training-only
    changes (checkpointing, norm swaps, layout), freeze it. Returns whether the EMA was used."""
    used_ema = s.ema is not None and s.cfg.export_ema and state.step > 0
    if s.penalty is not None:
        s.penalty.remove()
    if used_ema:
        s.ema.copy_to_params()
    if s.cfg.export_best and state.best["params"] is not None:
        with torch.no_grad():
            for k, p in s.params.items():
                p.copy_(state.best["params"][k])
    if s.cfg.grad_checkpointing:
        s.model.disable_gradient_checkpointing()
    if s.restore_modules is not None:
        s.restore_modules()
    s.model.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    return used_ema


def _check_ranks_agree(model: torch.nn.Module, trainable: str, dist: Distributed) -> list[str]:
    """Under torchrun every rank must end with the same weights (DDP all-reduces the gradients);
    a difference means the processes fell out of step, and the export would be one rank's view."""
    mine = trained_sha256(model, trainable)
    digests: list = [None] * dist.world_size
    torch.distributed.all_gather_object(digests, mine)
    if len(set(digests)) > 1:
        raise VAEFTError(f"the {dist.world_size} processes ended with different weights ({digests}); "
                         "the run fell out of step between ranks: rerun, and report this if it repeats")
    return digests
