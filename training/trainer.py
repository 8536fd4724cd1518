"""The fine-tuning loop, readable top to bottom.

One step: take a batch of [-1, 1] patches, augment it, encode it with the frozen
encoder (no grad), decode with gradient, loss, backward; every ``grad_accum``
micro-batches an AdamW step, then EMA and LR updates.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .config import TrainConfig
from .errors import VAEFTError
from .losses import ReconstructionLoss, load_lpips
from .vae import LoadedVAE, LdmLayout

# Parameter name prefixes (diffusers AutoencoderKL) trained in each mode.
TRAINABLE_PREFIXES = {
    "decoder": ("decoder.", "post_quant_conv."),
    "full": ("encoder.", "quant_conv.", "decoder.", "post_quant_conv."),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def frozen_digest(model: torch.nn.Module, trainable: str) -> str:
    """sha256 over every parameter and buffer that the given mode does not train."""
    prefixes = TRAINABLE_PREFIXES[trainable]
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(prefixes):
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Callbacks:
    """Hooks the caller supplies; all optional.

    on_step(step, total_steps, losses) after each optimizer step; ``losses`` is a dict of
        floats only on logging steps (every ``log_every``), else None, so no host sync
        happens on other steps.
    on_preview(step, images) with images BCHW in [0, 1]: top row inputs, bottom row reconstructions.
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
    dataset_summary: dict | None = None  # recorded in the export's metadata

    def __repr__(self) -> str:  # short: ComfyUI shows node inputs in error reports
        return (f"TrainResult(steps_done={self.steps_done}, base={self.layout.base_name!r}, "
                f"latent_channels={self.model.config.latent_channels}, ema={self.used_ema})")


def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fine_tune(vae: LoadedVAE, batches: Iterator[torch.Tensor], cfg: TrainConfig, *,
              device: torch.device | str | None = None,
              lpips_net: torch.nn.Module | None = None,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
              preview_batch: torch.Tensor | None = None,
              callbacks: Callbacks | None = None) -> TrainResult:
    """Fine-tune a copy of ``vae.model``; the input model is never modified.

    batches: infinite iterator of BCHW float tensors in [-1, 1] (CPU or device).
    lpips_net: a loaded LPIPS network; loaded from disk (see losses.load_lpips) when None
        and ``cfg.lpips_weight > 0``.
    augment: applied to each batch on the device with the run's seeded generator.
    preview_batch: fixed BCHW [-1, 1] patches reconstructed every ``preview_every`` steps.
    """
    callbacks = callbacks or Callbacks()
    device = pick_device(device if isinstance(device, str) or device is None else str(device))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    base_digest = frozen_digest(vae.model, cfg.trainable)
    model = copy.deepcopy(vae.model).to(device)  # build_vae made it fp32: the master weights
    prefixes = TRAINABLE_PREFIXES[cfg.trainable]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            params.append(p)
    model.train()

    if cfg.lpips_weight > 0 and lpips_net is None:
        lpips_net = load_lpips(cfg.lpips_net, cfg.lpips_backbone)
    if lpips_net is not None:
        lpips_net = lpips_net.to(device).eval().requires_grad_(False)
    loss_fn = ReconstructionLoss(cfg.mse_weight, cfg.l1_weight, cfg.lpips_weight, lpips_net)

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr_at(0, cfg), weight_decay=cfg.weight_decay, fused=fused)
    ema = [p.detach().clone() for p in params] if cfg.ema else None

    history: list[dict] = []
    running: dict[str, torch.Tensor] = {}
    stopped = False
    step = 0
    t0 = time.perf_counter()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for _ in range(cfg.grad_accum):
            if callbacks.should_stop and callbacks.should_stop():
                stopped = True
                break
            x = next(batches).to(device, non_blocking=True).float()
            if x.is_inference():  # ComfyUI hands over tensors made under inference_mode
                x = x.clone()
            if x.ndim != 4 or x.shape[1] != model.config.in_channels:
                raise VAEFTError(
                    f"training batches have shape {tuple(x.shape)} but this VAE takes "
                    f"{model.config.in_channels}-channel images (B, C, H, W)")
            if augment is not None:
                x = augment(x, gen)
            with autocast:
                if cfg.trainable == "decoder":
                    with torch.no_grad():
                        z = _latent(model, x, cfg, gen)
                else:
                    z = _latent(model, x, cfg, gen)
                recon = model.decode(z).sample
                loss, parts = loss_fn(recon, x)
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                running[k] = running.get(k, 0.0) + v / cfg.grad_accum
        if stopped:
            opt.zero_grad(set_to_none=True)
            break
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            # Warm-started decay (as in LDM's LitEma) so early averages are not dominated by the base.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        step += 1

        logged = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            logged = {k: float(v) / n for k, v in running.items()}
            logged.update(step=step, lr=opt.param_groups[0]["lr"])
            history.append(logged)
            running = {}
        if callbacks.on_step:
            callbacks.on_step(step, cfg.steps, logged)
        if (callbacks.on_preview and preview_batch is not None and cfg.preview_every
                and (step % cfg.preview_every == 0 or step == cfg.steps)):
            callbacks.on_preview(step, _preview(model, preview_batch, device, autocast))

    used_ema = False
    if ema is not None and cfg.export_ema and step > 0:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        used_ema = True
    model.eval().requires_grad_(False)
    return TrainResult(model=model, layout=vae.layout, config=cfg, steps_done=step, history=history,
                       stopped_early=stopped, frozen_digest=base_digest,
                       seconds=time.perf_counter() - t0, used_ema=used_ema)


def _latent(model, x, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    dist = model.encode(x).latent_dist
    return dist.sample(gen) if cfg.posterior == "sample" else dist.mode()


@torch.no_grad()
def _preview(model, batch: torch.Tensor, device, autocast) -> torch.Tensor:
    was_training = model.training
    model.eval()
    x = batch.to(device).float()
    with autocast:
        z = model.encode(x).latent_dist.mode()
        recon = model.decode(z).sample.float()
    model.train(was_training)
    return ((torch.cat([x, recon]) + 1) / 2).clamp(0, 1).cpu()


def check_frozen(result: TrainResult) -> None:
    """Raise if the part of the model that was not trained differs from the base."""
    if frozen_digest(result.model, result.config.trainable) != result.frozen_digest:
        raise VAEFTError("internal check failed: frozen weights changed during training; refusing to export")

