"""Training speed, memory and MFU: this library's trainer vs two public ways to fine-tune a VAE.

All sides train the same randomly initialised diffusers AutoencoderKL (the full-size SD kl-f8
config unless --tiny) on the same random [-1, 1] patches, sizes and batch, in one process:

reference  the seed-style loop, written the way the most-cited public script
           (Fine-tune-Stable-Diffusion-VAE) does it: fp32 weights and activations (PyTorch defaults
           otherwise: cuDNN convolutions may use TF32), the whole model trained (encoder too),
           encode -> latent_dist.sample() -> decode, loss = MSE + w·LPIPS (lpips package, VGG), plain
           torch.optim.Adam, loss.item() each step. When it runs out of memory at --batch it is
           retried at half the batch (down to 1): the ≥4× target compares with its largest batch that
           fits, and its entry says which batch that was (``batch_used``, ``oom_at``).
peer_best  the best a user gets from public code without custom kernels, as diffusers'
           train_autoencoderkl.py --decoder_only --mixed_precision bf16 would be with its LPIPS bug
           fixed: the encoder under torch.no_grad, decoder + post_quant_conv trained, bf16 autocast
           over fp32 weights, torch.optim.AdamW(fused=True) on CUDA, MSE + w·LPIPS (VGG) with its
           gradient, the loss kept on the device (no per-step host sync); PyTorch defaults otherwise
           (no channels-last, no cudnn.benchmark, no compile).
ours       training.trainer.fine_tune with TrainConfig's defaults (the sd-vae-ft-mse recipe:
           MSE + 0.1·LPIPS, decoder + post_quant_conv trained, EMA, bf16 autocast, fused AdamW and
           the fused GroupNorm kernels on CUDA), plus whatever --micro-batch/--checkpointing/--compile/
           --channels-last/--set ask for.

Timing: ours is timed inside fine_tune with its Callbacks.on_step hook, from the end of optimizer
step --warmup to the end of step --warmup+--steps (device synchronised at both ends): every
per-step cost of the loop is inside (batch transfer, forward/backward, clip, AdamW, EMA, the
trainer's own loss logging every log_every steps); setup (model copy, frozen-weights digest,
compile) and the end-of-run EMA copy are outside, reported separately as call_s. The other sides
are timed the same way over the same steps. Patches come from a small pool of pre-made random
batches (pinned CPU memory on CUDA), so data loading is not measured on any side.

FLOPs: one training step of each side under torch.utils.flop_counter.FlopCounterMode (matmuls,
convolutions, attention; forward and backward), counted once per side and size and scaled to the
other batches of the call (they are linear in the batch). Ours is counted with compile and gradient
checkpointing off, so recomputation is not counted as useful work (model FLOPs). MFU = FLOPs per
step x steps/s / peak. LPIPS' VGG backbone is random-init (nothing is downloaded): its cost is the
same as the ImageNet weights'. The VAE is random-init too; speed does not depend on the weights.

    python bench/train_bench.py --device cuda --sizes 512 --batch 8              # all three sides
    python bench/train_bench.py --device cuda --sizes 256,512,1024 --batch 1,4,8,16 --sides ours  # scaling
    python bench/train_bench.py --device cpu --tiny --sizes 32 --batch 2 --steps 2 --warmup 1  # CI smoke

--family wan2.1: the Qwen-Image VAE (Wan 2.1; diffusers' AutoencoderKLQwenImage at its default, full-size
config, or a small 2-level one with --tiny), random-init, loaded through the library as its original-layout
file would be (build_vae of the qwen_image_vae.safetensors key layout). Two sides, both
training.trainer.fine_tune with TrainConfig's defaults (decoder + post_quant_conv, MSE + 0.1·LPIPS, EMA,
bf16 autocast on CUDA, fp32 on the CPU), timed as ours above:

diffusers_3d  wan_2d=False: diffusers' own, unmodified 3D forward of AutoencoderKLQwenImage at one frame
ours          wan_2d=True (the default): each causal 3D convolution run as a 2D convolution with its last
              temporal tap (exact at one frame)

so the ratio ours_over_diffusers_3d (images/s; computed from the two step times, same batch) is the 2D
path's speed-up with everything else the same. Each side's
first-step loss terms (``first_step_loss``) come from the untimed one-step run that counts its FLOPs (same
seed, same first batch as the timed run); ``first_step_loss_max_rel_diff`` compares them (the 2D path is
exact, so only float rounding separates them). FLOPs are counted as for kl-f8, per side: the 3D side's
count includes the multiplications of its causal convolutions' zero padding in time (about 3x the
convolution work at one frame), so ours' count is the useful work. The seed-style reference and
peer_best are the public kl-f8 scripts' loops and are not run for Wan.

    python bench/train_bench.py --family wan2.1 --device cuda --sizes 256 --batch 8   # 2D vs diffusers' 3D
    python bench/train_bench.py --family wan2.1 --device cpu --tiny --sizes 32 --batch 2 --steps 2 --warmup 1

Prints ONE JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import itertools
import json
import os
import platform
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.config import TrainConfig  # noqa: E402
from training.losses import load_lpips  # noqa: E402
from training.trainer import Callbacks, fine_tune  # noqa: E402
from training.families.ldm import diffusers_to_ldm  # noqa: E402
from training.vae import build_vae  # noqa: E402

SIDES = ("reference", "peer_best", "ours")
WAN_SIDES = ("diffusers_3d", "ours")
FAMILY_SIDES = {"kl-f8": SIDES, "wan2.1": WAN_SIDES}

# H100 SXM dense peaks (datasheet, no sparsity), TFLOP/s. H200 has the same compute peaks.
PEAK_BF16_H100 = 989.4
PEAK_TF32_H100 = 494.7

SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2)
TINY_VAE = dict(block_out_channels=[32, 64], layers_per_block=1)
# diffusers' AutoencoderKLQwenImage defaults (the released Qwen-Image VAE), and a small one for the CPU smoke test
QWEN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TINY_QWEN_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])

# Global backend switches a trainer might flip; restored after our side so the reference is
# never run with settings its script would not have.
_FLAGS = (
    ("cudnn.benchmark", lambda: torch.backends.cudnn.benchmark,
     lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32,
     lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32,
     lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    ("float32_matmul_precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
)


def log(*a) -> None:
    print("[train_bench]", *a, file=sys.stderr, flush=True)


def flags_snapshot() -> dict:
    return {name: get() for name, get, _ in _FLAGS}


def flags_restore(snap: dict) -> None:
    for name, _, put in _FLAGS:
        put(snap[name])


def build_model(tiny: bool, latent_channels: int):
    """A random-init AutoencoderKL loaded through the library (build_vae of its ldm state dict)."""
    from diffusers import AutoencoderKL

    shape = TINY_VAE if tiny else SD_VAE
    n = len(shape["block_out_channels"])
    quant = latent_channels == 4
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                          down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                          use_quant_conv=quant, use_post_quant_conv=quant, **shape)
    return build_vae(diffusers_to_ldm(model.state_dict()), source="random-init")


def build_wan_model(tiny: bool):
    """A random-init Qwen-Image (Wan 2.1) VAE loaded through the library from its original-layout tensors,
    as ComfyUI's qwen_image_vae.safetensors holds them."""
    from diffusers import AutoencoderKLQwenImage

    from training.families import wan

    shape = TINY_QWEN_VAE if tiny else QWEN_VAE
    torch.manual_seed(0)
    model = AutoencoderKLQwenImage(**shape)
    per_level = shape["num_res_blocks"] + 2  # decoder blocks per level in the original layout
    sd = {wan.to_original_key(k, per_level): v for k, v in model.state_dict().items()}
    return build_vae(sd, source="qwen_image_vae.safetensors")


def make_pool(n: int, batch: int, size: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    pool = [torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for _ in range(n)]
    if device.type == "cuda":
        pool = [x.pin_memory() for x in pool]
    return pool


def batches_of(pool: list[torch.Tensor], keyed: bool):
    """Endless batches from the pool; ``keyed``: (batch, patch ids) pairs, the same ids for the
    same pool entry, as a fixed grid patch set yields them (the trainer's latent cache)."""
    if not keyed:
        return itertools.cycle(pool)
    ids, start = [], 0
    for x in pool:
        ids.append(torch.arange(start, start + x.shape[0]))
        start += x.shape[0]
    return itertools.cycle(list(zip(pool, ids)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of a region: CUDA's max_memory_allocated, or on CPU the peak RSS above the
    RSS at entry (sampled every 2 ms by a thread; a lower bound)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._base = self._rss()
            self._max = self._base
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._max = max(self._max, self._rss())
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss())
            self.peak = self._max - self._base
        return False


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ---------------------------------------------------------------- reference and peer-best


def timed_loop(step, device, a) -> float:
    """Seconds for --steps calls of ``step`` after --warmup untimed ones, synchronised at both ends."""
    for _ in range(a.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def reference_side(vae, lpips_net, pool, device, a) -> dict:
    """The public script's loop: fp32, all weights trained, Adam, MSE + w·LPIPS, .item() per step."""
    model = copy.deepcopy(vae.model).to(device).train().requires_grad_(True)
    lp = copy.deepcopy(lpips_net).to(device).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    batches = itertools.cycle(pool)
    w = a.lpips_weight

    def step() -> float:
        x = next(batches).to(device, non_blocking=True)
        posterior = model.encode(x).latent_dist
        z = posterior.sample()
        pred = model.decode(z).sample
        loss = F.mse_loss(pred, x) + w * lp(pred, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return {"seconds": timed_loop(step, device, a), "flops_fn": step}


def peer_best_side(vae, lpips_net, pool, device, a) -> dict:
    """diffusers' decoder-only bf16 recipe with LPIPS' gradient kept: frozen encoder under no_grad,
    decoder + post_quant_conv trained under bf16 autocast (fp32 weights), fused AdamW, no host sync."""
    model = copy.deepcopy(vae.model).to(device).train().requires_grad_(False)
    trained = [model.decoder] + ([model.post_quant_conv] if getattr(model, "post_quant_conv", None) is not None
                                 else [])
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    lp = copy.deepcopy(lpips_net).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    batches = itertools.cycle(pool)
    w = a.lpips_weight
    # bf16 autocast on CUDA (the recipe); on the CPU smoke form too, so the same code path runs
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    total = torch.zeros((), device=device)

    def step() -> torch.Tensor:
        x = next(batches).to(device, non_blocking=True)
        with torch.no_grad(), autocast:
            z = model.encode(x).latent_dist.sample()
        with autocast:
            pred = model.decode(z).sample
            loss = F.mse_loss(pred, x) + w * lp(pred, x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.add_(loss.detach())       # kept on the device; read once, after the timed steps
        return total

    seconds = timed_loop(step, device, a)
    if not torch.isfinite(total):
        raise RuntimeError("peer-best loop: non-finite loss")
    return {"seconds": seconds, "flops_fn": step}


# FLOPs per image by (side, size, ...): a step's FLOPs are linear in its batch (convolutions, matmuls
# and attention are per sample), so each side and size is counted once and scaled to other batches.
_FLOPS_PER_IMAGE: dict[tuple, float] = {}


def flops_for(key: tuple, batch: int, count) -> int:
    """FLOPs of one step at ``batch``: ``count()`` the first time for ``key``, scaled after that."""
    if key not in _FLOPS_PER_IMAGE:
        _FLOPS_PER_IMAGE[key] = count() / batch
    return round(_FLOPS_PER_IMAGE[key] * batch)


def run_loop_side(side_fn, vae, lpips_net, size, device, a, batch) -> dict:
    with MemoryMeter(device) as mem:
        r = side_fn(vae, lpips_net, make_pool(2, batch, size, device), device, a)
    flops = flops_for((side_fn.__name__, size), batch, lambda: count_flops(r["flops_fn"]))
    return side_numbers(r["seconds"], a.steps, batch, flops, mem, a, device)


def run_reference(vae, lpips_net, size, device, a, batch) -> dict:
    """The reference at ``batch``, or at the largest batch (halving) that fits when that runs out of memory."""
    tried, b = [], batch
    while True:
        try:
            out = run_loop_side(reference_side, vae, lpips_net, size, device, a, b)
            break
        except torch.OutOfMemoryError:
            if b == 1:
                raise
            tried.append(b)
            log(f"reference: out of memory at batch {b}, trying {b // 2}")
            free(device)
            b //= 2
    if tried:
        out["batch_used"], out["oom_at"] = b, tried
    out.update(trained="full (encoder + decoder)", precision="fp32 (cuDNN TF32 per PyTorch default)"
               if device.type == "cuda" else "fp32", optimizer="torch.optim.Adam", loss=f"mse + {a.lpips_weight}*lpips")
    return out


def run_peer_best(vae, lpips_net, size, device, a, batch) -> dict:
    out = run_loop_side(peer_best_side, vae, lpips_net, size, device, a, batch)
    out.update(trained="decoder + post_quant_conv (encoder under no_grad)",
               precision="bf16 autocast over fp32 weights", optimizer="torch.optim.AdamW(fused=True)"
               if device.type == "cuda" else "torch.optim.AdamW", loss=f"mse + {a.lpips_weight}*lpips (with gradient)")
    return out


# ---------------------------------------------------------------- ours


def sdpa_backend(name: str | None):
    """Restrict scaled_dot_product_attention (the VAE's mid-block attention) to one backend, for an A/B
    of ours without changing the trainer; None = PyTorch's own choice."""
    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name.upper()))


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def our_config(a, batch: int, steps: int, *, for_flops: bool = False, settled_micro: int | None = None,
               wan_2d: bool | None = None) -> tuple[TrainConfig, list[str]]:
    """(config, requested options this TrainConfig lacks). batch_size is the effective batch (the
    trainer splits it into micro-batches).

    for_flops: compile and checkpointing off, and the micro-batch the timed run settled on
    (no out-of-memory probing inside the count). wan_2d: set TrainConfig.wan_2d (after --set)."""
    fields = config_fields()
    kw = dict(steps=steps, preview_every=0, seed=0, batch_size=batch)
    if a.log_every:
        kw["log_every"] = a.log_every
    if a.micro_batch is not None:
        kw["micro_batch"] = a.micro_batch
    elif for_flops and settled_micro:
        kw["micro_batch"] = settled_micro
    ignored = []
    for flag, field in (("checkpointing", "grad_checkpointing"), ("compile", "compile"),
                        ("channels_last", "channels_last"), ("norm_in_bf16", "norm_in_bf16")):
        val = getattr(a, flag)
        if for_flops and field in ("grad_checkpointing", "compile"):
            val = False
        if val is None:
            continue
        if field in fields:
            kw[field] = val
        else:
            ignored.append(field)
    for item in a.set:
        field, _, text = item.partition("=")
        if field not in fields:
            ignored.append(field)
            continue
        default = getattr(TrainConfig(), field)
        if isinstance(default, bool):
            val = text.lower() in ("1", "true", "yes", "on")
        else:
            val = type(default)(text) if default is not None else text
        if not (for_flops and field in ("grad_checkpointing", "compile")):
            kw[field] = val
    if wan_2d is not None:
        kw["wan_2d"] = wan_2d
    return TrainConfig(**kw), ignored


def run_ours(vae, lpips_net, device, a, batch: int, size: int, profile: bool = False, side: str = "ours",
             wan_2d: bool | None = None) -> dict:
    """Our trainer timed; ``side``/``wan_2d``: the Wan family's sides (diffusers_3d is wan_2d=False)."""
    wan_family = getattr(a, "family", "kl-f8") == "wan2.1"
    total = a.warmup + a.steps
    cfg, ignored = our_config(a, batch, total, wan_2d=wan_2d)
    pool = make_pool(2, batch, size, device)
    marks: dict[int, float] = {}

    def on_step(step, total_steps, losses=None, *rest):
        if step == a.warmup or step == total:
            sync(device)
            marks[step] = time.perf_counter()

    before = flags_snapshot()
    if a.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    requested = flags_snapshot()
    lp = copy.deepcopy(lpips_net)
    with MemoryMeter(device) as mem, sdpa_backend(a.sdpa_backend):
        t_call = time.perf_counter()
        res = fine_tune(vae, batches_of(pool, a.latent_cache), cfg, device=device, lpips_net=lp,
                        callbacks=Callbacks(on_step=on_step))
        sync(device)
        call_s = time.perf_counter() - t_call
    after = flags_snapshot()
    flags_restore(before)
    changed = {k: [requested[k], after[k]] for k in before if requested[k] != after[k]}
    if res.steps_done != total or len(marks) != 2:
        raise RuntimeError(f"fine_tune did {res.steps_done} of {total} steps (stopped early?)")
    settled = getattr(res, "micro_batch", None) or None
    fused = getattr(res, "fused_norms", None)
    hits = getattr(res, "latent_cache_hits", None)
    del res
    free(device)

    first: dict = {}  # the loss terms of step 1 (logged: a one-step run logs its only step)

    def count() -> int:
        fcfg, _ = our_config(a, batch, 1, for_flops=True, settled_micro=settled, wan_2d=wan_2d)
        fpool = make_pool(1, batch, size, device)  # its batch is the timed pool's first batch

        def one_step() -> None:
            r = fine_tune(vae, batches_of(fpool, a.latent_cache), fcfg, device=device,
                          lpips_net=copy.deepcopy(lpips_net))
            first.update(r.history[0] if r.history else {})

        flops = count_flops(one_step)
        if a.latent_cache:  # the timed steps all hit the cache: count a step that does (2 steps - 1 step)
            fcfg2, _ = our_config(a, batch, 2, for_flops=True, settled_micro=settled, wan_2d=wan_2d)
            flops = count_flops(lambda: fine_tune(vae, batches_of(fpool, True), fcfg2, device=device,
                                                  lpips_net=copy.deepcopy(lpips_net))) - flops
        return flops

    # Wan: counted at every batch too, since the count's one-step run gives the first-step losses compared
    flops = flops_for((side, size, batch) if wan_family else ("ours", size), batch, count)
    flags_restore(before)

    out = side_numbers(marks[total] - marks[a.warmup], a.steps, batch, flops, mem, a, device)
    out["call_s"] = round(call_s, 3)
    if settled:
        out["micro_batch_used"] = settled
    if fused is not None:
        out["fused_norms"] = fused
    if a.latent_cache:
        out["latent_cache_hits"] = hits
    if a.sdpa_backend:
        out["sdpa_backend"] = a.sdpa_backend
    out["config"] = {k: getattr(cfg, k) for k in ("batch_size", "micro_batch", "trainable",
                                                  "precision", "ema", "lpips_weight", "mse_weight",
                                                  "fused_norm", "channels_last", "grad_checkpointing", "compile",
                                                  "log_every", "recipe") if hasattr(cfg, k)}
    if wan_family:
        out["config"]["wan_2d"] = cfg.wan_2d
        out["image_path"] = "2d" if cfg.wan_2d else "3d (diffusers' AutoencoderKLQwenImage forward)"
        out["first_step_loss"] = {k: v for k, v in first.items() if k not in ("step", "lr")}
    if ignored:
        out["requested_but_not_in_TrainConfig"] = ignored
    if changed:
        out["global_flags_changed_by_trainer"] = changed
    if profile and device.type == "cuda":
        if a.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = a.cudnn_benchmark
        out["profile"] = profile_ours(vae, lpips_net, device, a, batch, size)
        flags_restore(before)
    return out


def profile_ours(vae, lpips_net, device, a, batch, size) -> dict:
    """torch.profiler over --profile steps after warmup; writes the kernel table to --profile-out."""
    from torch.profiler import ProfilerActivity, profile

    n = a.profile
    total = a.warmup + n
    cfg, _ = our_config(a, batch, total)
    pool = make_pool(2, batch, size, device)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    marks = {}

    def on_step(step, total_steps, losses=None, *rest):
        if step == a.warmup:
            sync(device)
            prof.start()
            marks[0] = time.perf_counter()
        elif step == total:
            sync(device)
            marks[1] = time.perf_counter()
            prof.stop()

    fine_tune(vae, batches_of(pool, a.latent_cache), cfg, device=device, lpips_net=copy.deepcopy(lpips_net),
              callbacks=Callbacks(on_step=on_step))
    wall_us = (marks[1] - marks[0]) * 1e6
    ka = prof.key_averages()

    def dev_self(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    from torch.autograd import DeviceType

    # key_averages holds both operator rows (whose self device time is their kernels') and the
    # kernel rows themselves: sum kernels only, and list the top operators separately.
    kernels = [e for e in ka if getattr(e, "device_type", None) == DeviceType.CUDA and dev_self(e)]
    ops = [e for e in ka if getattr(e, "device_type", None) != DeviceType.CUDA and dev_self(e)]
    kernel_us = sum(dev_self(e) for e in kernels)
    table = ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    kinds = (("attention", ("fmha", "flash", "attention")),
             ("triton (inductor-fused)", ("triton",)),
             ("conv/gemm (tensor cores)", ("xmma", "implicit_gemm", "cudnn", "cutlass", "gemm", "sm90_", "nvjet")),
             ("copy/cast/layout", ("copy",)),
             ("group_norm", ("rowwisemoments", "group_norm", "groupnorm", "computeinternalgradients",
                             "computefusedparams", "gammabeta", "computebackwardfusedparams")),
             ("silu", ("silu",)),
             ("upsample", ("upsample",)),
             ("optimizer/ema/foreach", ("multi_tensor", "foreach", "adam", "lerp")),
             ("reduce", ("reduce",)),
             ("other elementwise", ("elementwise",)))
    cats: dict[str, float] = {k: 0.0 for k, _ in kinds}
    cats["other"] = 0.0
    for e in kernels:
        k = e.key.lower()
        cats[next((c for c, pats in kinds if any(p in k for p in pats)), "other")] += dev_self(e)
    if a.profile_out:
        with open(a.profile_out, "a") as f:
            f.write(f"=== ours, {size}x{size}, batch {batch}, {n} steps, wall {wall_us / 1e3:.1f} ms\n{table}\n")
    return {"steps": n, "wall_ms_per_step": round(wall_us / n / 1e3, 2),
            "device_kernel_ms_per_step": round(kernel_us / n / 1e3, 2),
            "device_busy_fraction": round(kernel_us / wall_us, 3),
            "kernel_ms_per_step_by_kind": {k: round(v / n / 1e3, 2) for k, v in cats.items()},
            "top_ops_ms_per_step": [[e.key[:60], round(dev_self(e) / n / 1e3, 2)]
                                    for e in sorted(ops, key=dev_self, reverse=True)[:10]],
            "top_kernels_ms_per_step": [[e.key[:100], round(dev_self(e) / n / 1e3, 2)]
                                        for e in sorted(kernels, key=dev_self, reverse=True)[:10]]}


# ---------------------------------------------------------------- numbers


def side_numbers(seconds: float, steps: int, batch: int, flops: int, mem: MemoryMeter, a, device) -> dict:
    ips = steps * batch / seconds
    achieved = flops * steps / seconds
    out = {"images_per_s": round(ips, 3), "step_ms": round(seconds / steps * 1e3, 2),
           "measured_steps": steps, "warmup_steps": a.warmup,
           "flops_per_step": flops, "gflops_per_image": round(flops / batch / 1e9, 2),
           "achieved_tflops": round(achieved / 1e12, 4)}
    out["mfu"] = round(achieved / (a.peak_tflops * 1e12), 5) if a.peak_tflops else None
    out["mfu_vs_fp32_peak"] = round(achieved / (a.peak_tflops_fp32 * 1e12), 5) if a.peak_tflops_fp32 else None
    if device.type == "cuda":
        out["peak_mem_gb"] = round(mem.peak / 2**30, 3)
        out["peak_reserved_gb"] = round(mem.reserved / 2**30, 3)
        out["mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_mem_gb"] = round(mem.peak / 2**30, 4) if mem.peak is not None else None
        out["mem_kind"] = "cpu peak RSS above start (sampled)"
    return out


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="256,512", help="patch sizes, comma-separated")
    ap.add_argument("--batch", default="8", help="images per optimizer step, every side; comma-separated "
                                              "for several (each size runs each batch)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (use more with --compile)")
    ap.add_argument("--micro-batch", type=int, default=None, help="ours: patches per forward (0 = auto)")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="ours: gradient checkpointing (default: the trainer's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="ours: torch.compile")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="ours: channels-last layout")
    ap.add_argument("--norm-in-bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="ours: GroupNorm in bf16 under autocast (default: the trainer's)")
    ap.add_argument("--latent-channels", type=int, choices=(4, 16), default=4,
                    help="16 = SD3/Flux layout (no quant convs)")
    ap.add_argument("--tiny", action="store_true", help="small 2-level VAE (CPU smoke test)")
    ap.add_argument("--family", choices=tuple(FAMILY_SIDES), default="kl-f8",
                    help="kl-f8: SD's AutoencoderKL (default); wan2.1: the Qwen-Image VAE, our 2D path vs "
                         "diffusers' 3D forward (--latent-channels does not apply: it has 16)")
    ap.add_argument("--sides", default="all",
                    help=f"comma-separated subset of {','.join(SIDES)} (--family wan2.1: of "
                         f"{','.join(WAN_SIDES)}), or 'all' (default)")
    ap.add_argument("--lpips-weight", type=float, default=0.1, help="LPIPS weight of the reference and peer-best loops")
    ap.add_argument("--log-every", type=int, default=None, help="ours: TrainConfig.log_every (default: its own)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"peak for MFU (default on CUDA: H100/H200 SXM bf16 dense, {PEAK_BF16_H100})")
    ap.add_argument("--peak-tflops-fp32", type=float, default=None,
                    help=f"fp32-path peak (default on CUDA: H100/H200 SXM TF32 dense, {PEAK_TF32_H100})")
    ap.add_argument("--profile", type=int, default=0, help="ours: torch.profiler over N steps at the last size")
    ap.add_argument("--profile-out", default=None, help="file to append the profiler's kernel table to")
    ap.add_argument("--json-out", default=None, help="also write the JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="ours: any other TrainConfig field (repeatable), e.g. --set compile=true")
    ap.add_argument("--latent-cache", action="store_true",
                    help="ours: batches carry patch ids, as a fixed grid patch set without augmentation does, "
                         "so the trainer caches latents (warmup fills the cache: timed steps all hit it)")
    ap.add_argument("--sdpa-backend", choices=("math", "efficient_attention", "flash_attention", "cudnn_attention"),
                    default=None, help="ours: restrict attention to this SDPA backend (A/B; default: PyTorch's pick)")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                    help="ours: set torch.backends.cudnn.benchmark around our side (restored after)")
    a = ap.parse_args(argv)
    # the first step also builds the optimizer state and (with --compile) compiles: never timed
    if a.warmup < 1 or a.steps < 1:
        ap.error(f"--warmup and --steps must be at least 1 (got --warmup {a.warmup}, --steps {a.steps})")
    known = FAMILY_SIDES[a.family]
    sides = known if a.sides == "all" else tuple(x for x in a.sides.split(",") if x)
    unknown = [x for x in sides if x not in known]
    if unknown or not sides:
        ap.error(f"--sides: unknown {unknown or a.sides!r}; use 'all' or a comma-separated subset of {','.join(known)}"
                 + (" (the reference and peer_best loops are kl-f8's)" if a.family != "kl-f8" else ""))
    try:
        [int(b) for b in a.batch.split(",") if b]
    except ValueError:
        ap.error(f"--batch takes whole numbers, comma-separated; got {a.batch!r}")

    device = torch.device(a.device)
    if device.type == "cuda":
        a.peak_tflops = a.peak_tflops or PEAK_BF16_H100
        a.peak_tflops_fp32 = a.peak_tflops_fp32 or PEAK_TF32_H100
    sizes = [int(s) for s in a.sizes.split(",") if s]
    batches = [int(b) for b in a.batch.split(",") if b]

    wan_family = a.family == "wan2.1"
    vae = build_wan_model(a.tiny) if wan_family else build_model(a.tiny, a.latent_channels)
    lpips_net = load_lpips("vgg", random_backbone=True)
    meta = {
        "torch": torch.__version__, "python": platform.python_version(), "device": a.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "model": ("tiny " if a.tiny else "SD kl-f8 ") + json.dumps(TINY_VAE if a.tiny else SD_VAE),
        "latent_channels": a.latent_channels,
        "params_total_m": round(sum(p.numel() for p in vae.model.parameters()) / 1e6, 2),
        "params_decoder_m": round(sum(p.numel() for n, p in vae.model.named_parameters()
                                      if n.startswith(("decoder.", "post_quant_conv."))) / 1e6, 2),
        "random_init": "VAE and LPIPS VGG backbone are random-init (nothing downloaded); same cost as trained weights",
        "data": "random uniform [-1,1] patches from a pre-made pool (pinned CPU on CUDA); loading not timed",
        "batch": batches, "sides": list(sides), "steps": a.steps, "warmup": a.warmup,
        "peak_tflops": a.peak_tflops, "peak_tflops_fp32": a.peak_tflops_fp32,
        "backend_flags": flags_snapshot(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if wan_family:
        shape = TINY_QWEN_VAE if a.tiny else QWEN_VAE
        meta.update(
            family="wan2.1",
            model=("tiny " if a.tiny else "Qwen-Image (Wan 2.1) VAE, full size ") + "AutoencoderKLQwenImage "
            + json.dumps(shape),
            latent_channels=shape["z_dim"],
            loaded_as="original (ComfyUI) layout, qwen_image_vae.safetensors keys, through training.vae.build_vae",
            sides_meaning={"ours": "fine_tune, TrainConfig defaults: wan_2d=True (the exact 2D path at one frame)",
                           "diffusers_3d": "the same fine_tune with wan_2d=False: diffusers' unmodified 3D forward"},
            flops_note="FlopCounterMode per side (matmuls, convolutions, attention; forward and backward); the "
                       "diffusers_3d count includes its causal 3D convolutions' products with the zero padding in "
                       "time, so ours' count is the useful work of a step",
            loss_check="first_step_loss: step 1's logged loss terms from each side's untimed one-step FLOP-count "
                       "run (same seed, same first batch as the timed run)",
        )
    if device.type == "cuda":
        meta["cudnn"] = torch.backends.cudnn.version()
    results = []
    runners = {"reference": run_reference, "peer_best": run_peer_best}
    cells = [(size, batch) for size in sizes for batch in batches]
    for i, (size, batch) in enumerate(cells):
        entry = {"size": size, "batch": batch}
        for side in sides:
            log(f"{side} {size}x{size} batch {batch}")
            try:
                if side == "ours":
                    entry[side] = run_ours(vae, lpips_net, device, a, batch, size,
                                           profile=bool(a.profile) and i == len(cells) - 1)
                elif side == "diffusers_3d":
                    entry[side] = run_ours(vae, lpips_net, device, a, batch, size, side=side, wan_2d=False)
                else:
                    entry[side] = runners[side](vae, lpips_net, size, device, a, batch)
            except Exception as e:  # noqa: BLE001 - record (e.g. OOM) and go on
                traceback.print_exc()
                entry[side] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            free(device)
        ratios = {}
        for num, den in (("ours", "reference"), ("ours", "peer_best"), ("peer_best", "reference"),
                         ("ours", "diffusers_3d")):
            n, d = entry.get(num, {}), entry.get(den, {})
            if "images_per_s" in n and "images_per_s" in d:
                # Wan's two sides run the same batch: the ratio of their step times, which keeps the
                # precision that images_per_s (3 decimals) loses at CPU rates
                ratios[f"{num}_over_{den}"] = {
                    "images_per_s": round(d["step_ms"] / n["step_ms"], 3) if den == "diffusers_3d"
                    else round(n["images_per_s"] / d["images_per_s"], 3),
                    "peak_mem": round(n["peak_mem_gb"] / d["peak_mem_gb"], 3) if n.get("peak_mem_gb")
                    and d.get("peak_mem_gb") else None,
                }
        fa, fb = entry.get("ours", {}).get("first_step_loss"), entry.get("diffusers_3d", {}).get("first_step_loss")
        if fa and fb:  # the 2D path is exact: the same losses up to float rounding
            ratios["first_step_loss_max_rel_diff"] = max(
                abs(fa[k] - fb[k]) / max(abs(fb[k]), 1e-12) for k in fa.keys() & fb.keys())
        entry.update(ratios)
        results.append(entry)
        log(json.dumps(entry))
        if a.json_out:  # after every cell, so a run stopped part-way still leaves what it measured
            with open(a.json_out, "w") as f:
                f.write(json.dumps({"bench": "train_bench", "meta": meta, "results": results,
                                    "complete": i == len(cells) - 1}) + "\n")
    doc = {"bench": "train_bench", "meta": meta, "results": results, "complete": True}
    print(json.dumps(doc), flush=True)
    ok = all("error" not in e.get(s, {}) for e in results for s in sides)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
