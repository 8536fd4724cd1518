"""What ``latent_noise`` (issue 31) does to a decoder: clean decodes vs decodes of latents off the encoder's manifold.

A random-init VAE's encoder means nothing, so a small kl-f8-layout VAE (diffusers AutoencoderKL, 3 levels
[32, 64, 64], 1 resnet per level, 4 latent channels: 4× downsampling; built through ``training.vae.build_vae``
from its ldm-layout state dict, as a VAE file is loaded) is first trained whole (``trainable='full'``, MSE,
KL 1e-6, lr --base-lr with a cosine schedule, --base-steps steps) on 64² patches of real photos from
scikit-image; that is the **base**. From that same base the decoder alone is then fine-tuned
(``trainable='decoder'``, MSE, the same data, seed, lr and --ft-steps steps) once per --train-sigmas value
(0 = off, today's behaviour). EMA and LPIPS are off everywhere (EMA at 0.999 would hide a few hundred
steps; LPIPS would need a pretrained backbone, and nothing is downloaded).

Every model (the base, each fine-tune) is scored on the same held-out patches (the dataset's validation
images, ``val_patches``): the decode of the encoder's posterior mode ("clean"), and the decode of that
latent perturbed as training perturbs it, ``training.vae.perturbed(mean, mean, sigma * eps)`` (eps a
standard normal draw seeded by --seed, the same draw for every model and every test sigma, drawn per group
of 8 patches as ``training.metrics.validation_scores`` draws it), at each --test-sigmas value, against the
images: PSNR, SSIM and ΔE2000 from ``training.metrics.image_metrics``. The fine-tunes' own end-of-run
``val_noisy_psnr`` must equal the column of their training sigma (checked, ``trainer_check``).

One process, ``torch.set_num_threads(--threads)`` (the CPU is shared). JSON to --out, a markdown table on
stdout.

    python bench/latent_noise_bench.py --out /tmp/latent_noise.json          # the recorded run (11 min, 2-core CPU)
    python bench/latent_noise_bench.py --quick --out /tmp/ln_quick.json     # smoke test, ~30 s (too slow for a CI test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMAGES = ("astronaut", "coffee", "chelsea", "retina", "rocket", "immunohistochemistry")
CHANNELS = (32, 64, 64)


def write_images(folder: str, size: int) -> None:
    """scikit-image's photos (bundled, nothing downloaded), short side ``size``, as PNGs."""
    import numpy as np
    from PIL import Image
    from skimage import data

    for name in IMAGES:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        img = Image.fromarray(arr[..., :3])
        scale = size / min(img.size)
        img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                   Image.LANCZOS).save(os.path.join(folder, f"{name}.png"))


def random_base():
    """The small VAE, random init, loaded as a file is (ldm layout -> build_vae)."""
    import torch
    from diffusers import AutoencoderKL

    from training.families.ldm import diffusers_to_ldm
    from training.vae import build_vae

    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=list(CHANNELS), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                          down_block_types=["DownEncoderBlock2D"] * len(CHANNELS),
                          up_block_types=["UpDecoderBlock2D"] * len(CHANNELS))
    sd = {k: v.detach().clone() for k, v in diffusers_to_ldm(model.state_dict()).items()}
    return build_vae(sd, source="latent_noise_bench_vae.safetensors")


def train(vae, data, args, *, trainable: str, steps: int, lr: float, latent_noise: float, val):
    """fine_tune on the dataset's training stream (augmented as a session augments), validation at step 0 and
    at the end on ``val``. Returns (LoopResult, seconds)."""
    from training.augment import augmenter
    from training.config import TrainConfig
    from training.trainer import fine_tune

    cfg = TrainConfig(recipe="custom", trainable=trainable, steps=steps, lr=lr, batch_size=args.batch,
                      mse_weight=1.0, lpips_weight=0.0, kl_weight=1e-6 if trainable == "full" else 0.0,
                      ema=False, lr_schedule="cosine", warmup_steps=min(20, steps // 10), seed=args.seed,
                      latent_noise=latent_noise, preview_every=0, val_every=steps, val_patches=val.shape[0],
                      log_every=max(1, steps // 8), checkpoint_every=0, checkpoint_minutes=0)
    t = time.perf_counter()
    result = fine_tune(vae, lambda start: data.train_batches(args.batch, start_batch=start), cfg,
                       augment=augmenter(data.cfg), val_batch=val)
    return result, time.perf_counter() - t


def train_mse(result) -> dict:
    """{step: the logged training MSE} of a LoopResult's history (is it still falling?)."""
    return {h["step"]: round(float(h["mse"]), 5) for h in result.history if "mse" in h}


def scores(model, val, sigmas, seed: int) -> dict:
    """Mean PSNR / SSIM / ΔE2000 of decoding the posterior mode ("clean") and its perturbations at each sigma."""
    import torch

    from training.metrics import image_metrics
    from training.vae import perturbed

    model.eval()
    decodes: dict[str, list] = {"clean": []}
    decodes.update({f"sigma_{s:g}": [] for s in sigmas})
    gen = torch.Generator().manual_seed(seed)  # as validation_scores draws it: per group of 8, one stream
    with torch.no_grad():
        for x in val.split(8):
            mean = model.encode(x.float()).latent_dist.mode()
            eps = torch.randn(mean.shape, generator=gen)
            decodes["clean"].append(model.decode(mean).sample.clamp(-1, 1))
            for s in sigmas:
                decodes[f"sigma_{s:g}"].append(model.decode(perturbed(mean, mean, s * eps)).sample.clamp(-1, 1))
    out = {}
    for name, parts in decodes.items():
        m = image_metrics(torch.cat(parts), val)
        out[name] = {k: round(float(m[k].mean()), 4) for k in ("psnr", "ssim", "delta_e2000")}
    return out


def table(rows: list[dict], sigmas, metric: str, fmt: str) -> str:
    head = f"| model | clean {metric} | " + " | ".join(f"σ={s:g} {metric}" for s in sigmas) + " |"
    lines = [head, "|---" * (2 + len(sigmas)) + "|"]
    for r in rows:
        s = r["scores"]
        lines.append(f"| {r['name']} | {s['clean'][metric]:{fmt}} | "
                     + " | ".join(f"{s[f'sigma_{t:g}'][metric]:{fmt}}" for t in sigmas) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps, few patches (< 1 min)")
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--base-lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=256, help="short side of the photos, pixels")
    ap.add_argument("--val-patches", type=int, default=32)
    ap.add_argument("--train-sigmas", default="0,0.25,0.5")
    ap.add_argument("--test-sigmas", default="0.1,0.25,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.base_steps, args.ft_steps, args.val_patches, args.image_size = 12, 6, 8, 96

    import torch

    torch.set_num_threads(args.threads)
    from training.config import DataConfig
    from training.data import build_dataset

    t0 = time.perf_counter()
    train_sigmas = [float(s) for s in args.train_sigmas.split(",")]
    test_sigmas = [float(s) for s in args.test_sigmas.split(",")]
    with tempfile.TemporaryDirectory(prefix="latent_noise_bench_") as folder:  # the images: removed afterwards
        write_images(folder, args.image_size)
        data = build_dataset(folder, DataConfig(patch_size=args.patch, val_fraction=0.34, seed=args.seed))
        summary = data.summary()
        val = data.val_patches(args.val_patches, seed=args.seed)
        return _experiment(args, argv, data, summary, val, train_sigmas, test_sigmas, t0)


def _experiment(args, argv, data, summary, val, train_sigmas, test_sigmas, t0):
    """The base, then each fine-tune, scored and written (the images stay in their folder meanwhile: the
    dataset streams and re-reads them)."""
    import torch

    base_vae = random_base()
    print(f"base: {args.base_steps} steps, trainable full", file=sys.stderr, flush=True)
    base, base_s = train(base_vae, data, args, trainable="full", steps=args.base_steps, lr=args.base_lr,
                         latent_noise=0.0, val=val)
    base_vae.model.load_state_dict(base.model.state_dict())  # the fine-tunes start from the trained base
    rows = [{"name": "base (full, random init)", "steps": args.base_steps, "seconds": round(base_s, 1),
             "scores": scores(base_vae.model, val, test_sigmas, args.seed), "train_mse": train_mse(base)}]
    for sigma in train_sigmas:
        print(f"fine-tune: {args.ft_steps} steps, decoder, latent_noise {sigma:g}", file=sys.stderr, flush=True)
        res, secs = train(base_vae, data, args, trainable="decoder", steps=args.ft_steps, lr=args.ft_lr,
                          latent_noise=sigma, val=val)
        row = {"name": f"fine-tune σ={sigma:g}", "latent_noise": sigma, "steps": args.ft_steps,
               "seconds": round(secs, 1), "scores": scores(res.model, val, test_sigmas, args.seed),
               "train_mse": train_mse(res)}
        vals = [h for h in res.history if "val_psnr" in h]
        row["trainer_val"] = {k: round(v, 4) for k, v in vals[-1].items() if k.startswith("val_")} if vals else {}
        key = f"sigma_{sigma:g}"
        if sigma > 0 and key in row["scores"] and "val_noisy_psnr" in row["trainer_val"]:
            # the trainer's own noisy validation draws the same perturbation: the same number
            row["trainer_check"] = abs(row["trainer_val"]["val_noisy_psnr"] - row["scores"][key]["psnr"]) < 1e-2
        rows.append(row)

    doc = {"bench": "latent_noise_bench",
           "meta": {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                    "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
                    "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "vae": f"kl-f8 layout AutoencoderKL block_out_channels {list(CHANNELS)}, layers_per_block 1, "
                           "4 latent channels (4x downsampling), random init, trained here as the base",
                    "vae_params_M": round(sum(p.numel() for p in base_vae.model.parameters()) / 1e6, 3),
                    "images": list(IMAGES), "image_short_side": args.image_size, "patch": args.patch,
                    "train_images": summary["train_paths"], "val_images": summary["val_paths"],
                    "val_patches": int(val.shape[0]), "batch": args.batch, "seed": args.seed,
                    "base": {"trainable": "full", "steps": args.base_steps, "lr": args.base_lr, "kl_weight": 1e-6},
                    "fine_tune": {"trainable": "decoder", "steps": args.ft_steps, "lr": args.ft_lr},
                    "common": "MSE only (LPIPS off), EMA off, cosine LR, posterior sample, flips/rot90 augmentation, "
                              "fp32 on the CPU",
                    "test_sigmas": test_sigmas, "train_sigmas": train_sigmas,
                    "perturbation": "training.vae.perturbed(mean, mean, sigma * eps): eps ~ N(0, 1) seeded, the same "
                                    "for every model and test sigma, times each patch's per-channel latent std"},
           "results": rows, "seconds": round(time.perf_counter() - t0, 1)}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(table(rows, test_sigmas, "psnr", ".2f"))
    print()
    print(table(rows, test_sigmas, "ssim", ".4f"))
    print()
    print(table(rows, test_sigmas, "delta_e2000", ".2f"))
    print(f"\n{doc['seconds']} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
