"""Does a narrow student initialised from its teacher converge faster than one started from random weights (issue 30)?

A random-init VAE decodes noise, so a small kl-f8-layout VAE (diffusers AutoencoderKL, 3 levels [64, 128, 128],
1 resnet per level, 4 latent channels; built through ``training.vae.build_vae`` from its ldm-layout state dict, as a
file is loaded) is first trained whole (``trainable='full'``, MSE, KL 1e-6, lr --base-lr, --base-steps steps) on 64²
patches of real photos from scikit-image: that is the **teacher**. Then ``training.distil.run_distil`` trains a
narrow student of width --width (half the teacher's) twice, with the same data, seed, recipe (distil-narrow, LPIPS
off, EMA off) and --steps: once as distil builds it (each decoder GroupNorm group's first channels of the teacher,
``training.students.narrow_student``), once with the same architecture's decoder re-initialised at random (PyTorch's
default init, ``reset_parameters``). Both are scored every --val-every steps on the same held-out patches:
``val_teacher_psnr``, the student's decode against the teacher's.

    python bench/distil_convergence.py --out /tmp/distil_convergence.json     # the recorded run (2-core CPU)
    python bench/distil_convergence.py --quick                                 # smoke test

JSON to --out and as the last line of stdout, a markdown table before it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def small_teacher():
    from diffusers import AutoencoderKL

    from training.families.ldm import diffusers_to_ldm
    from training.vae import build_vae

    torch.manual_seed(0)
    m = AutoencoderKL(block_out_channels=[64, 128, 128], layers_per_block=1, norm_num_groups=32, latent_channels=4,
                      down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    return build_vae({k: v.contiguous() for k, v in diffusers_to_ldm(m.state_dict()).items()}, "teacher.safetensors")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--base-lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of each: a smoke test")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.base_steps, args.steps, args.val_every = 4, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from skimage import data as skdata
    from PIL import Image

    from training.config import DataConfig, DistilConfig, TrainConfig
    from training.data import build_dataset
    from training.distil import run_distil
    from training.session import run_session
    from training.vae import LoadedVAE

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("astronaut", "coffee", "chelsea", "retina", "rocket", "camera"):
            a = getattr(skdata, name)()
            a = a if a.ndim == 3 else a[..., None].repeat(3, -1)
            Image.fromarray(a[..., :3]).save(os.path.join(tmp, f"{name}.png"))
        data = build_dataset(tmp, DataConfig(patch_size=64, val_fraction=0.34, seed=0))
        base_cfg = TrainConfig.from_recipe("custom", 64, mse_weight=1.0, lpips_weight=0.0, kl_weight=1e-6,
                                           trainable="full", lr=args.base_lr, steps=args.base_steps,
                                           batch_size=args.batch, ema=False, val_every=args.base_steps,
                                           preview_every=0, log_every=max(1, args.base_steps // 4))
        base = run_session(small_teacher(), data, base_cfg)
        teacher = LoadedVAE(base.trained.model, small_teacher().layout)
        base_val = base.loop.history[-1].get("val_psnr")
        cfg = TrainConfig.from_recipe("distil-narrow", 64, lpips_weight=0.0, ema=False, steps=args.steps,
                                      batch_size=args.batch, val_every=args.val_every, preview_every=0,
                                      log_every=args.val_every)
        curves = {}
        for init in ("teacher", "random"):
            def randomise(student, spec, init=init):
                if init == "random":
                    torch.manual_seed(1)
                    for m in student.model.decoder.modules():
                        if hasattr(m, "reset_parameters") and m is not student.model.decoder:
                            m.reset_parameters()
            r = run_distil(teacher, data, cfg, DistilConfig(student="narrow", width=args.width),
                           before_training=randomise)
            curves[init] = [(h["step"], round(h["val_teacher_psnr"], 3)) for h in r.session.loop.history
                            if "val_teacher_psnr" in h]
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": "python bench/distil_convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "teacher_val_psnr_vs_images": base_val, "width": args.width, "curves": curves,
              "seconds": round(time.perf_counter() - t0, 1)}
    print("| step | from the teacher (dB) | random init (dB) |\n|---|---|---|")
    for (s, a), (_, b) in zip(curves["teacher"], curves["random"]):
        print(f"| {s} | {a:.2f} | {b:.2f} |")
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
