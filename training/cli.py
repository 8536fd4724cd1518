"""``python -m training <command>``: fit, patches, eval — thin layers over the library.

    python -m training fit --vae BASE.safetensors --data DIR --out OUT.safetensors \
        --steps N --patch-size P --batch-size B
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import TrainConfig
from .errors import VAEFTError
from .options import add_arguments, from_arguments


def add_fit_command(sub) -> None:
    from .data import DataConfig

    p = sub.add_parser("fit", help="fine-tune a VAE on patches of a folder of images and export it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae", required=True, help="base VAE file (.safetensors/.ckpt; ldm or diffusers keys)")
    p.add_argument("--data", required=True, help="folder of training images (searched recursively)")
    p.add_argument("--out", required=True, help="output .safetensors path (ldm keys, loadable by Load VAE)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--loss-plot", help="also write the loss curve as a PNG here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    add_arguments(p, TrainConfig)
    add_arguments(p, DataConfig, skip=("seed",))  # one --seed, from TrainConfig, seeds everything
    p.set_defaults(func=run_fit)


def run_fit(args) -> int:
    from .data import DataConfig, augment, build_dataset
    from .export import export_vae
    from .plot import curve_image, save_png
    from .trainer import Callbacks, fine_tune, pick_device
    from .vae import load_vae

    cfg = from_arguments(TrainConfig, args)
    data_cfg = from_arguments(DataConfig, args, seed=cfg.seed)
    if os.path.exists(args.out) and not args.overwrite:
        raise VAEFTError(f"{args.out!r} already exists; choose another --out or pass --overwrite")
    if not args.out.endswith(".safetensors"):
        raise VAEFTError(f"--out must end in .safetensors; got {args.out!r}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise VAEFTError(f"the folder of --out ({out_dir}) does not exist")

    base = load_vae(args.vae)
    data = build_dataset(args.data, data_cfg)
    summary = data.summary()
    print(f"data: {len(summary.get('images_used', []))} images used, "
          f"{len(summary.get('images_skipped', []))} skipped; train {summary.get('train_images')}, "
          f"validation {summary.get('val_images')}", file=sys.stderr)
    for item in summary.get("images_skipped", []):
        print(f"  skipped {item['path']}: {item['reason']}", file=sys.stderr)
    device = pick_device(args.device)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", file=sys.stderr)

    def on_step(step, total, losses):
        if bar is not None:
            bar.update(step - bar.n)
            if losses:
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if k not in ("step", "lr")})
        elif losses:
            print(json.dumps(losses), file=sys.stderr)

    result = fine_tune(base, data.train_batches(cfg.batch_size, pin_memory=device.type == "cuda"), cfg,
                       device=device, augment=lambda x, g: augment(x, data_cfg, g),
                       callbacks=Callbacks(on_step=on_step))
    if bar is not None:
        bar.close()
    path = export_vae(result, args.out, dataset_summary=summary, overwrite=args.overwrite)
    if args.loss_plot:
        series = {k: [h[k] for h in result.history] for k in ("total", "mse", "l1", "lpips")
                  if result.history and k in result.history[0]}
        save_png(curve_image(series, [h["step"] for h in result.history]), args.loss_plot)
    print(json.dumps({"out": path, "steps": result.steps_done, "seconds": round(result.seconds, 1),
                      "final": result.history[-1] if result.history else None}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Fine-tune the Stable Diffusion kl-f8 VAE on your own images.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_fit_command(sub)
    from .data import add_patches_command
    from .demo import add_demo_command

    add_demo_command(sub)

    add_patches_command(sub)
    try:
        from .evaluate import add_eval_command
    except ImportError:  # evaluation module not installed in this checkout
        pass
    else:
        add_eval_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"command {args.command!r} has no handler")
    try:
        return int(func(args) or 0)
    except VAEFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
