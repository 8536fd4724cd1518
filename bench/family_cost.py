"""Memory and step time of one decoder-only training step per VAE family, full size, random weights.

Each case runs in its own process (so peak memory is that case's alone): a released-size VAE of the family is
built with random weights (bf16 file tensors, as released files hold them, loaded as the library loads any
file: fp32 master weights), then ``training.trainer.fine_tune`` trains the decoder for --warmup + --steps steps
on random [-1, 1] patches (batch --batch, side --patch; EMA on, LPIPS off so that no backbone enters the
figure). Reported per case: parameters of the decoder and of the whole VAE, seconds per step after the
warm-up, and the process's peak resident memory (``ru_maxrss``; CPU) or ``torch.cuda.max_memory_allocated``
(CUDA), with gradient checkpointing off and on.

    python bench/family_cost.py --device cpu --patch 128 --batch 1          # every family, checkpointing off/on
    python bench/family_cost.py --families qwen-image-2.1 --device cuda --patch 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def released(name: str) -> dict:
    """The released file's tensors (bf16, random values) of family ``name``, in its own file layout."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLQwenImage21, AutoencoderKLWan

    from training.families import wan, wan22

    with torch.device("meta"):
        if name == "kl-f8":
            model = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        elif name == "wan2.1":
            model = AutoencoderKLQwenImage()
        elif name == "wan2.2":
            model = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                                     out_channels=12, patch_size=2, scale_factor_spatial=16,
                                     temperal_downsample=[False, True, True])
        elif name == "qwen-image-2.1":
            model = AutoencoderKLQwenImage21()
        else:
            raise SystemExit(f"unknown family {name!r}")
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    for k in sd:  # norms at 1 (a random gamma would only scale), biases at 0
        if k.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight")):
            sd[k] = torch.ones_like(sd[k])
    if name == "kl-f8":
        return sd  # the diffusers layout: the library reads it as it is
    if name == "wan2.1":
        return {wan.to_original_key(k): v for k, v in sd.items()}
    out, _ = wan22.file_layout(sd)
    return out


def run_case(name: str, args, checkpointing: bool) -> dict:
    import torch

    from training.config import TrainConfig
    from training.trainer import Callbacks, fine_tune
    from training.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(released(name), source=f"{name}.safetensors")
    family = vae.family
    channels = family.image_channels(vae.model)
    x = torch.rand(args.batch, channels, args.patch, args.patch) * 2 - 1
    times = []
    cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, lpips_weight=0.0, preview_every=0,
                      grad_checkpointing=checkpointing, val_every=0, log_every=10_000)
    cb = Callbacks(on_step=lambda *a, **k: times.append(time.perf_counter()))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fine_tune(vae, iter(lambda: x, None), cfg, device=device, callbacks=cb)
    per_step = (times[-1] - times[args.warmup - 1]) / args.steps if len(times) > args.warmup else None
    params = dict(vae.model.named_parameters())
    return {"family": name, "device": args.device, "patch": args.patch, "batch": args.batch,
            "grad_checkpointing": checkpointing, "steps_timed": args.steps, "s_per_step": per_step,
            "decoder_params_M": round(sum(p.numel() for k, p in params.items()
                                          if k.startswith(("decoder.", "post_quant_conv."))) / 1e6, 1),
            "vae_params_M": round(sum(p.numel() for p in params.values()) / 1e6, 1),
            "peak_GiB": round((torch.cuda.max_memory_allocated() if device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30, 2),
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="kl-f8,wan2.2,qwen-image-2.1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # family:on|off, run in this process
    args = ap.parse_args()
    if args.case:
        name, ckpt = args.case.split(":")
        print("RESULT " + json.dumps(run_case(name, args, ckpt == "on")), flush=True)
        return
    for name in args.families.split(","):
        for ckpt in args.checkpointing.split(","):
            cmd = [sys.executable, __file__, "--case", f"{name}:{ckpt}", "--device", args.device, "--patch",
                   str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            print(lines[-1][7:] if lines else json.dumps({"family": name, "grad_checkpointing": ckpt == "on",
                                                          "error": (p.stderr or p.stdout)[-800:]}), flush=True)


if __name__ == "__main__":
    main()
