"""The fine-tuning loop, readable top to bottom.

One optimizer step: take the step's batch of [-1, 1] patches (batch k depends only on
the seed and k, so a resumed run sees the same data), split it into micro-batches,
and for each: augment, encode (no grad when the encoder is frozen), decode with
gradient, loss, backward. Then clip, AdamW (skipped on the device, without a host
sync, when the gradient is not finite), EMA, and optionally a discriminator step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import TrainConfig
from .errors import VAEFTError
from .fused_norm import autocast_group_norms, fuse_vae_blocks, triton_available
from .losses import (PatchDiscriminator, ReconstructionLoss, adaptive_gan_weight, hinge_d_loss, kl_divergence,
                     load_lpips)
from .vae import LdmLayout, LoadedVAE, reconstruct, state_dict_sha256

# Parameter name prefixes (diffusers AutoencoderKL) trained in each mode.
TRAINABLE_PREFIXES = {
    "decoder": ("decoder.", "post_quant_conv."),
    "full": ("encoder.", "quant_conv.", "decoder.", "post_quant_conv."),
}
CHECKPOINT_FORMAT = "vaeft-checkpoint-1"
# History keys worth drawing as curves, in legend order.
HISTORY_CURVES = ("total", "mse", "l1", "lpips", "kl", "latent", "g_loss", "d_loss", "val_mse", "val_lpips")
# Fields a resumed run must share with the run that wrote the checkpoint (steps may grow).
RESUME_MUST_MATCH = ("recipe", "lr", "batch_size", "mse_weight", "l1_weight", "lpips_weight", "kl_weight",
                     "gan_weight", "disc_start", "latent_weight", "lpips_net", "trainable", "ema", "ema_decay",
                     "weight_decay", "warmup_steps", "lr_schedule", "grad_clip", "posterior", "seed")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def history_curves(history: list[dict]) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """(values, steps) per HISTORY_CURVES key present in a TrainResult.history: training terms over
    the logged steps, validation scores over the steps they were scored at (validation may run on
    steps that log no training loss, so the two sets of rows differ)."""
    train = [h for h in history if "total" in h]
    val = [h for h in history if any(k.startswith("val_") for k in h)]
    values, steps = {}, {}
    for key in HISTORY_CURVES:
        rows = val if key.startswith("val_") else train
        if any(key in h for h in rows):
            values[key] = [h.get(key, float("nan")) for h in rows]
            steps[key] = [h["step"] for h in rows]
    return values, steps


def frozen_digest(model: torch.nn.Module, trainable: str) -> str:
    """sha256 over every parameter and buffer that the given mode does not train."""
    prefixes = TRAINABLE_PREFIXES[trainable]
    return state_dict_sha256({k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)})


@dataclass
class Callbacks:
    """Hooks the caller supplies; all optional.

    on_step(step, total_steps, losses) after each optimizer step; ``losses`` is a dict of
        floats only on logging steps (every ``log_every``), else None, so no host sync
        happens on other steps.
    on_preview(step, images) with images BCHW in [0, 1]: inputs, then reconstructions.
    should_stop() polled before every micro-batch; True ends training early (cancel).
    Raising from any hook aborts training (that is how ComfyUI's interrupt works).
    """

    on_step: Callable[[int, int, dict | None], None] | None = None
    on_preview: Callable[[int, torch.Tensor], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass(repr=False)
class TrainResult:
    model: torch.nn.Module          # AutoencoderKL holding the weights to export (EMA if chosen)
    layout: LdmLayout
    config: TrainConfig
    steps_done: int
    history: list[dict] = field(default_factory=list)  # {"step", "lr", "total", "mse", "lpips", ...}
    stopped_early: bool = False
    frozen_digest: str = ""         # of the base model's untrained part, re-checked at export
    seconds: float = 0.0
    used_ema: bool = False
    micro_batch: int = 0            # what the run settled on
    skipped_steps: int = 0          # non-finite steps that were skipped
    best_step: int | None = None    # with export_best: the step whose weights the model holds
    fused_norms: int = 0            # GroupNorms that ran as fused Triton kernels (0 = PyTorch's)
    latent_cache_hits: int = 0      # patches whose encoder output came from the latent cache
    dataset_summary: dict | None = None  # recorded in the export's metadata

    def __repr__(self) -> str:  # short: ComfyUI shows node inputs in error reports
        return (f"TrainResult(steps_done={self.steps_done}, base={self.layout.base_name!r}, "
                f"latent_channels={self.model.config.latent_channels}, ema={self.used_ema})")


@dataclass
class Distributed:
    """torchrun's view of this process; world_size 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str | None = None, dist: Distributed | None = None) -> torch.device:
    """The device for ``name`` ("auto"/None: this process's GPU if there is one, else the CPU).
    A bare "cuda" means this process's GPU, so that under torchrun each rank gets its own."""
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise VAEFTError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise VAEFTError(f"device {name!r} was asked for, but this PyTorch sees no CUDA GPU")
            if device.index is None:
                device = torch.device("cuda", dist.local_rank if dist else 0)
            if device.index >= torch.cuda.device_count():
                raise VAEFTError(f"device {str(device)!r} does not exist: this machine has "
                                 f"{torch.cuda.device_count()} CUDA GPU(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank if dist else 0)
    return torch.device("cpu")


class _Reconstruct(torch.nn.Module):
    """encode -> latent -> decode as one forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, vae: torch.nn.Module, encoder_trains: bool, sample: bool,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.vae, self.encoder_trains, self.sample = vae, encoder_trains, sample
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, cached: torch.Tensor | None = None):
        # noise is drawn by the caller: a seeded generator inside would break torch.compile's graph.
        # cached: the frozen encoder's (mean, logvar) for x, concatenated on channels (latent cache)
        if cached is not None:
            mean, logvar = cached.chunk(2, dim=1)
        else:
            with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
                moments = self.vae.encode(x).latent_dist
                mean, logvar = moments.mean, moments.logvar
        # One layout whichever way the latents came (fresh ones are strided views of the encoder's
        # output, cached ones are stacked copies): the decoder's kernels, and so its gradients to
        # the last bit, must not depend on whether the cache was warm (a resumed run starts cold).
        mean, logvar = (t.contiguous(memory_format=self.memory_format) for t in (mean, logvar))
        z = mean + noise * torch.exp(0.5 * logvar) if (self.sample and noise is not None) else mean
        return self.vae.decode(z).sample, mean, logvar


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


def _step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, step): augmentation and posterior noise of step k are the
    same in an uninterrupted and a resumed run, with no RNG state to carry."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def _largest_divisor_below(n: int, below: int) -> int:
    for m in range(min(below, n) - 1, 0, -1):
        if n % m == 0:
            return m
    return 0


def _out_of_memory_named(fn):
    """Out-of-memory errors that escape the step's own retry (moving the model, the optimizer's
    first state allocation, EMA, validation, preview) become a VAEFTError saying what to change."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except torch.OutOfMemoryError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
            raise VAEFTError(
                f"out of GPU memory outside the training step's forward/backward ({first[:300]}). Free GPU "
                "memory (unload other models), lower val_patches, patch_size or batch_size, or turn on "
                "grad_checkpointing") from None
    return wrapper


@_out_of_memory_named
def fine_tune(vae: LoadedVAE, batches, cfg: TrainConfig, *,
              device: torch.device | str | None = None,
              lpips_net: torch.nn.Module | None = None,
              augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
              preview_batch: torch.Tensor | None = None,
              val_batch: torch.Tensor | None = None,
              callbacks: Callbacks | None = None,
              resume: str | os.PathLike | None = None,
              checkpoint_path: str | os.PathLike | None = None,
              dist: Distributed | None = None,
              data_signature: dict | None = None) -> TrainResult:
    """Fine-tune a copy of ``vae.model``; the input model is never modified.

    batches: ``start_step -> iterator`` (needed to resume) or an iterator; each item is this
        process's share of one optimizer step: (batch_size / world_size, 3, P, P) in [-1, 1], or a
        (patches, keys) pair where keys (int64 per patch, or None) are stable patch ids: with no
        ``augment`` and the encoder frozen, the encoder's output is then cached per id
        (``cfg.latent_cache_mb``) and reused instead of encoding the patch again.
    lpips_net: a loaded LPIPS network; loaded from disk (see losses.load_lpips) when None
        and ``cfg.lpips_weight > 0``.
    augment: ``(batch, seed) -> batch``, applied on the device; seed is an int from (cfg.seed, rank, step).
    preview_batch: fixed BCHW [-1, 1] patches reconstructed every ``preview_every`` steps.
    val_batch: held-out BCHW [-1, 1] patches scored every ``val_every`` steps (the weights that
        would be exported: EMA when on); ``export_best`` keeps the best of them.
    resume / checkpoint_path: read a checkpoint written by this function / write one every
        ``cfg.checkpoint_every`` steps and at the end (main process only).
    dist: set when running under torchrun; the process group must already be initialised.
    data_signature: what determines ``batches``' order (data settings, image list), JSON-like;
        stored in checkpoints, and a resume with a different one is refused.
    """
    callbacks = callbacks or Callbacks()
    dist = dist or Distributed()
    device = torch.device(device) if device is not None else pick_device(None, dist)
    if cfg.batch_size % dist.world_size:
        raise VAEFTError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes "
                         f"({dist.world_size})")
    local_batch = cfg.batch_size // dist.world_size
    if cfg.micro_batch and local_batch % cfg.micro_batch:
        raise VAEFTError(f"each process's batch ({local_batch}) must be a multiple of micro_batch "
                         f"({cfg.micro_batch})")
    if cfg.val_every and val_batch is None:
        raise VAEFTError("val_every > 0 needs held-out patches: the dataset has no validation images "
                         "(raise val_fraction, add images, or set val_every = 0)")
    if resume is not None and not callable(batches):
        raise VAEFTError("resuming needs batches as a function of the start step (to replay the data order)")
    torch.manual_seed(cfg.seed)

    base_digest = frozen_digest(vae.model, cfg.trainable)
    model = copy.deepcopy(vae.model).to(device)  # build_vae made it fp32: the master weights
    prefixes = TRAINABLE_PREFIXES[cfg.trainable]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            params.append(p)
    on_cuda = device.type == "cuda"
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_cuda)
    fused, restore_modules = 0, None  # the norm swaps are made on our private copy only
    if cfg.fused_norm and on_cuda and triton_available():
        fused, restore_modules = fuse_vae_blocks(model)
    elif use_bf16 and cfg.norm_in_bf16:
        _, restore_modules = autocast_group_norms(model)
    channels_last = on_cuda and (cfg.channels_last or bool(fused))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    base_encoder = None
    if cfg.latent_weight:
        base_encoder = _Reconstruct(copy.deepcopy(vae.model).to(device).eval(), False, False)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    if cfg.lpips_weight > 0 and lpips_net is None:
        lpips_net = load_lpips(cfg.lpips_net, cfg.lpips_backbone)
    if lpips_net is not None:
        # a private copy: the caller's network keeps its device and dtype
        lpips_net = copy.deepcopy(lpips_net).to(device).eval().requires_grad_(False)
        if use_bf16:
            lpips_net = lpips_net.to(torch.bfloat16)  # frozen: no reason to keep fp32 copies
    loss_fn = ReconstructionLoss(cfg.mse_weight, cfg.l1_weight, cfg.lpips_weight, lpips_net)

    step_module: torch.nn.Module = _Reconstruct(
        model, cfg.trainable == "full", cfg.posterior == "sample",
        torch.channels_last if channels_last else torch.contiguous_format)
    disc = disc_opt = None
    if cfg.gan_weight > 0:
        torch.manual_seed(cfg.seed)  # same discriminator init on every rank
        disc = PatchDiscriminator().to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if on_cuda else None
        step_module = DDP(step_module, device_ids=ids)
    if cfg.compile:
        step_module = torch.compile(step_module)

    opt = torch.optim.AdamW(params, lr=lr_at(0, cfg), weight_decay=cfg.weight_decay, fused=True)
    ema = [p.detach().clone() for p in params] if cfg.ema else None
    found_inf = torch.zeros((), device=device)
    bad_run = torch.zeros((), device=device)   # consecutive skipped steps, counted on the device
    worst_run = torch.zeros((), device=device)  # the longest such streak so far (read at logging steps)
    skipped = torch.zeros((), device=device)

    step = 0
    history: list[dict] = []
    # loss sums since the last log line, with how many steps each key was summed over (the GAN
    # terms appear only from disc_start on)
    running: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    best: dict = {"score": float("inf"), "params": None, "step": 0}  # export_best's pick so far
    if resume is not None:
        state = load_checkpoint(resume, vae.layout, cfg, dist.world_size, data_signature)
        for p, t in zip(params, state["params"]):
            p.data.copy_(t)
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            for e, t in zip(ema, state["ema"]):
                e.copy_(t)
        if disc is not None:
            _unwrap(disc).load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        step, history = state["step"], state["history"]
        skipped.fill_(state.get("skipped", 0))
        for k, (total, n) in state.get("running", {}).items():
            running[k], counts[k] = torch.tensor(total, dtype=torch.float32, device=device), n
        best = state.get("best") or best
    if callable(batches):
        batches = batches(step)

    micro = cfg.micro_batch or local_batch
    cache = None
    if cfg.latent_cache_mb and cfg.trainable == "decoder" and augment is None:
        cache = _LatentCache(cfg.latent_cache_mb * 2**20)
    stopped = False
    t0 = time.perf_counter()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        if disc_opt is not None:
            for g in disc_opt.param_groups:
                g["lr"] = lr_at(step, cfg)
        x_all, keys = next(batches), None
        if isinstance(x_all, (tuple, list)):
            x_all, keys = x_all
            if keys is not None and len(keys) != x_all.shape[0]:
                raise VAEFTError(f"a training batch has {x_all.shape[0]} patches but {len(keys)} keys")
        if x_all.ndim != 4 or x_all.shape[1] != model.config.in_channels:
            raise VAEFTError(f"training batches have shape {tuple(x_all.shape)} but this VAE takes "
                             f"{model.config.in_channels}-channel images (B, C, H, W)")
        if x_all.shape[0] != local_batch:
            raise VAEFTError(f"a training batch has {x_all.shape[0]} patches; expected {local_batch}")
        while True:
            try:
                parts, stopped = _accumulate(
                    x_all, micro, step, cfg, device, step_module, loss_fn, augment, autocast, disc,
                    base_encoder, model, callbacks, dist, channels_last,
                    cache if keys is not None else None, keys)
                break
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                if disc is not None:
                    disc.zero_grad(set_to_none=True)
                smaller = _largest_divisor_below(local_batch, micro)
                if cfg.micro_batch or not smaller:
                    raise VAEFTError(
                        f"out of GPU memory at micro-batch {micro} with {x_all.shape[-1]}² patches; "
                        "turn on grad_checkpointing, lower patch_size, or set a smaller micro_batch") from None
                micro = smaller
                if on_cuda:
                    torch.cuda.empty_cache()
        if stopped:
            opt.zero_grad(set_to_none=True)
            break
        # Non-finite gradients: the fused optimizer skips the update on the device (found_inf),
        # so there is no host sync here; the count is read at logging steps.
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        found_inf.copy_(~torch.isfinite(norm))
        opt.found_inf, opt.grad_scale = found_inf, None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            # Warm-started decay (as in LDM's LitEma) so early averages are not dominated by the base.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            # ema += w * (p - ema), with w kept on the device: _foreach_lerp_ takes only a Python
            # number as weight, and turning found_inf into one would wait for the GPU every step.
            w = (1.0 - decay) * (1.0 - found_inf)
            delta = torch._foreach_sub([p.detach() for p in params], ema)
            torch._foreach_mul_(delta, w)
            torch._foreach_add_(ema, delta)
            del delta
        if disc_opt is not None and step >= cfg.disc_start:
            if dist.world_size > 1:  # the discriminator is not DDP-wrapped: average its gradients here
                for p in disc.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(dist.world_size)
            d_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), float("inf"))
            disc_opt.found_inf = torch.maximum((~torch.isfinite(d_norm)).float(), found_inf)
            disc_opt.grad_scale = None
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
        bad_run.mul_(found_inf).add_(found_inf)
        torch.maximum(worst_run, bad_run, out=worst_run)
        skipped.add_(found_inf)
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        step += 1

        logged = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            logged = {k: float(v) / counts[k] for k, v in running.items()}
            logged.update(step=step, lr=opt.param_groups[0]["lr"])
            if int(skipped):
                logged["skipped_steps"] = int(skipped)
            history.append(logged)
            running, counts = {}, {}
            if int(worst_run) >= cfg.max_bad_steps:
                raise VAEFTError(
                    f"{int(worst_run)} consecutive steps had a non-finite loss or gradient (each was skipped); "
                    "stopping. Lower lr, check the data for broken images, or use precision fp32")
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            scores = _validate(model, params, ema if cfg.export_ema else None, val_batch, device, autocast,
                               lpips_net)
            scores["step"] = step
            if logged is not None:
                logged.update({f"val_{k}": v for k, v in scores.items() if k != "step"})
            else:
                history.append({"step": step, **{f"val_{k}": v for k, v in scores.items() if k != "step"}})
            key = scores.get("lpips", scores["mse"])
            if cfg.export_best and key < best["score"]:
                src = ema if (ema is not None and cfg.export_ema) else params
                best = {"score": key, "params": [t.detach().cpu().clone() for t in src], "step": step}
        if callbacks.on_step:
            callbacks.on_step(step, cfg.steps, logged)
        if (callbacks.on_preview and preview_batch is not None and cfg.preview_every
                and (step % cfg.preview_every == 0 or step == cfg.steps)):
            callbacks.on_preview(step, _preview(model, preview_batch, device, autocast))
        # a checkpoint path always gets the last step; checkpoint_every adds the ones in between
        if checkpoint_path and dist.is_main and (
                (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps):
            loop = {"history": history, "skipped": skipped, "running": running, "counts": counts, "best": best,
                    "world_size": dist.world_size, "data_signature": data_signature}
            save_checkpoint(checkpoint_path, _checkpoint_state(step, cfg, vae.layout, params, opt, ema, disc,
                                                               disc_opt, loop))

    used_ema = False
    if ema is not None and cfg.export_ema and step > 0:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        used_ema = True
    best_step = None
    if cfg.export_best and best["params"] is not None:
        with torch.no_grad():
            for p, b in zip(params, best["params"]):
                p.copy_(b)
        best_step = best["step"]
    if cfg.grad_checkpointing:
        model.disable_gradient_checkpointing()
    if restore_modules is not None:
        restore_modules()
    model.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    return TrainResult(model=model, layout=vae.layout, config=cfg, steps_done=step, history=history,
                       stopped_early=stopped, frozen_digest=base_digest, seconds=time.perf_counter() - t0,
                       used_ema=used_ema, micro_batch=micro, skipped_steps=int(skipped), best_step=best_step,
                       fused_norms=fused, latent_cache_hits=cache.hits if cache is not None else 0)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def _accumulate(x_all, micro, step, cfg: TrainConfig, device, step_module, loss_fn, augment, autocast, disc,
                base_encoder, model, callbacks: Callbacks, dist: Distributed, channels_last: bool,
                cache: _LatentCache | None, keys: torch.Tensor | None):
    """Forward/backward over the micro-batches of one optimizer step. Returns (loss parts, stopped)."""
    gen = _step_generator(device, cfg.seed * max(1, dist.world_size) + dist.rank, step)
    x_all = x_all.to(device, non_blocking=True).float()
    if x_all.is_inference():  # ComfyUI hands over tensors made under inference_mode
        x_all = x_all.clone()
    if augment is not None:
        x_all = augment(x_all, gen.initial_seed())  # an int from (seed, rank, step): drawn on the host, no sync
    if channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    chunks = x_all.split(micro)
    key_chunks = [k.tolist() for k in keys.split(micro)] if cache is not None else [None] * len(chunks)
    parts_sum: dict[str, torch.Tensor] = {}
    gan_on = disc is not None and step >= cfg.disc_start
    for i, x in enumerate(chunks):
        if callbacks.should_stop and callbacks.should_stop():
            return parts_sum, True
        share = x.shape[0] / x_all.shape[0]
        last = i == len(chunks) - 1
        sync = getattr(step_module, "no_sync", None)
        ctx = sync() if (sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            noise = None
            if cfg.posterior == "sample":
                down = 2 ** (len(model.config.block_out_channels) - 1)
                shape = (x.shape[0], model.config.latent_channels, x.shape[2] // down, x.shape[3] // down)
                noise = torch.randn(shape, generator=gen, device=device)
            cached = cache.get(key_chunks[i]) if cache is not None else None
            with autocast:
                recon, mean, logvar = step_module(x, noise, cached)
            if cache is not None and cached is None:
                cache.put(key_chunks[i], mean, logvar)
            with autocast:
                rec_loss, parts = loss_fn(recon, x)
                loss = rec_loss
                if cfg.kl_weight and cfg.trainable == "full":
                    kl = kl_divergence(mean.float(), logvar.float())
                    parts["kl"] = kl.detach()
                    loss = loss + cfg.kl_weight * kl
                if base_encoder is not None:
                    with torch.no_grad():
                        _, base_mean, _ = base_encoder(x, None)
                    lat = torch.nn.functional.mse_loss(mean.float(), base_mean.float())
                    parts["latent"] = lat.detach()
                    loss = loss + cfg.latent_weight * lat
                if gan_on:
                    disc.requires_grad_(False)
                    g_loss = -disc(recon).float().mean()
                    w = adaptive_gan_weight(rec_loss, g_loss, _unwrap(step_module).vae.decoder.conv_out.weight,
                                            cfg.gan_weight)
                    parts["g_loss"], parts["gan_w"] = g_loss.detach(), w
                    loss = loss + w * g_loss
            (loss * share).backward()
            if gan_on:
                disc.requires_grad_(True)
                with autocast:
                    d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
                (d_loss * share).backward()
                parts["d_loss"] = d_loss.detach()
        parts["total"] = loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.float() * share
    return parts_sum, False


@torch.no_grad()
def _validate(model, params, ema, batch: torch.Tensor, device, autocast, lpips_net) -> dict[str, float]:
    """Mean MSE / PSNR / LPIPS of the posterior-mode reconstruction of held-out patches, scored
    with the weights that would be exported (the EMA, swapped in and back, when given)."""
    from .metrics import psnr

    if ema is not None:
        for p, e in zip(params, ema):
            p.data, e.data = e.data, p.data
    was_training = model.training
    model.eval()
    try:
        out = {"mse": 0.0, "psnr": 0.0}
        if lpips_net is not None:
            out["lpips"] = 0.0
        n = 0
        for x in batch.split(8):
            x = x.to(device).float()
            with autocast:
                recon = reconstruct(model, x)
            recon = recon.float().clamp(-1, 1)
            out["mse"] += float(torch.nn.functional.mse_loss(recon, x, reduction="sum")) / x[0].numel()
            out["psnr"] += float(psnr(recon, x).sum())
            if lpips_net is not None:
                with autocast:
                    out["lpips"] += float(lpips_net(recon, x).float().sum())
            n += x.shape[0]
        return {k: v / n for k, v in out.items()}
    finally:
        model.train(was_training)
        if ema is not None:
            for p, e in zip(params, ema):
                p.data, e.data = e.data, p.data


@torch.no_grad()
def _preview(model, batch: torch.Tensor, device, autocast) -> torch.Tensor:
    was_training = model.training
    model.eval()
    x = batch.to(device).float()
    with autocast:
        recon = reconstruct(model, x).float()
    model.train(was_training)
    return ((torch.cat([x, recon]) + 1) / 2).clamp(0, 1).cpu()


def check_frozen(result: TrainResult) -> None:
    """Raise if the part of the model that was not trained differs from the base."""
    if frozen_digest(result.model, result.config.trainable) != result.frozen_digest:
        raise VAEFTError("internal check failed: frozen weights changed during training; refusing to export")


# ----- checkpoints: one dict (weights, optimizer, EMA, step, config), written atomically -----

def _checkpoint_state(step, cfg, layout, params, opt, ema, disc, disc_opt, loop: dict) -> dict:
    """One dict: the weights, optimizer, EMA, discriminator, and the loop's own state (``loop``:
    history, skipped count, the unlogged loss sums and their counts, export_best's pick so far,
    and what fixes the data order: the number of processes and the caller's data signature)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": dataclasses.asdict(cfg),
        "base_sha256": layout.base_sha256,
        "param_shapes": [tuple(p.shape) for p in params],
        "params": [p.detach().cpu().clone() for p in params],
        "optimizer": opt.state_dict(),
        "ema": [e.cpu().clone() for e in ema] if ema is not None else None,
        "disc": _unwrap(disc).state_dict() if disc is not None else None,
        "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
        "history": list(loop["history"]),
        "skipped": int(loop["skipped"]),
        "running": {k: (float(v), loop["counts"][k]) for k, v in loop["running"].items()},
        "best": loop["best"] if loop["best"]["params"] is not None else None,
        "world_size": loop["world_size"],
        "data_signature": loop["data_signature"],
    }


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".vaeft-ckpt-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike, layout: LdmLayout, cfg: TrainConfig, world_size: int = 1,
                    data_signature: dict | None = None) -> dict:
    """Read and check a checkpoint against this run; refuse with the reason (the file is only read).
    The data order depends on the number of processes and on the data (``data_signature``, when
    both the checkpoint and this run have one), so those must match too."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VAEFTError(f"resume checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign file: same answer
        raise VAEFTError(f"resume checkpoint {path!r} is unreadable or corrupt: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VAEFTError(f"{path!r} is not a checkpoint written by this tool ({CHECKPOINT_FORMAT})")
    if state["base_sha256"] != layout.base_sha256:
        raise VAEFTError(f"resume checkpoint {path!r} was trained from a different base VAE "
                         f"(base sha256 {state['base_sha256'][:12]}…, this run's {layout.base_sha256[:12]}…)")
    old = state["config"]
    diff = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH if old.get(k) != getattr(cfg, k)]
    if diff:
        raise VAEFTError(f"resume checkpoint {path!r} was written with other settings ({'; '.join(diff)}); "
                         "resume with the same training settings (steps may grow; speed and memory settings may differ)")
    if state.get("world_size", 1) != world_size:
        raise VAEFTError(f"resume checkpoint {path!r} was written by a run of {state.get('world_size', 1)} "
                         f"process(es), this one has {world_size}: the data order would differ; resume with "
                         "the same number of processes")
    old_data = state.get("data_signature")
    if old_data is not None and data_signature is not None and old_data != data_signature:
        diff = [f"{k}: {old_data.get(k)!r} -> {data_signature.get(k)!r}"
                for k in sorted(set(old_data) | set(data_signature)) if old_data.get(k) != data_signature.get(k)]
        raise VAEFTError(f"resume checkpoint {path!r} was trained on other data or data settings "
                         f"({'; '.join(d[:200] for d in diff)}); resume with the same images and data settings")
    if state["step"] > cfg.steps:
        raise VAEFTError(f"resume checkpoint {path!r} is at step {state['step']}, past steps={cfg.steps}")
    return state
