"""``python -m training <command>``: fit, patches, eval — thin layers over the library.

    python -m training fit --vae BASE.safetensors --data DIR --out OUT.safetensors \
        --steps N --patch-size P --batch-size B
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

from .config import TrainConfig
from .errors import VAEFTError
from .options import add_arguments, from_arguments


def add_fit_command(sub) -> None:
    from .data import DataConfig

    p = sub.add_parser("fit", help="fine-tune a VAE on patches of a folder of images and export it",
                       description="Fine-tune a VAE. Multi-GPU: torchrun --nproc-per-node N -m training fit ...")
    p.add_argument("--vae", required=True, help="base VAE file (.safetensors/.ckpt; ldm or diffusers keys)")
    p.add_argument("--data", required=True, help="folder of training images (searched recursively)")
    p.add_argument("--out", required=True, help="output .safetensors path (ldm keys, loadable by Load VAE)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--checkpoint", help="resumable checkpoint path, written every --checkpoint-every steps "
                                        "and at the end (default: <out>.ckpt when --checkpoint-every is set)")
    p.add_argument("--resume", help="continue from this checkpoint (same training settings, data and number of "
                                    "processes; --steps may grow, which stretches a cosine schedule from there)")
    p.add_argument("--loss-plot", help="also write the loss curve as a PNG here")
    p.add_argument("--preview-dir", help="write preview reconstructions (inputs above, outputs below) here "
                                         "every --preview-every steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    add_arguments(p, TrainConfig)
    add_arguments(p, DataConfig, skip=("seed",))  # one --seed, from TrainConfig, seeds everything
    p.set_defaults(func=run_fit)


def config_from_args(args) -> TrainConfig:
    """The recipe's defaults, then the --memory preset's (sized for --patch-size), then every flag given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None and f.name != "recipe"}
    return TrainConfig.from_recipe(args.recipe or "sd-vae-ft-mse", getattr(args, "patch_size", None), **given)


def run_fit(args) -> int:
    from .data import DataConfig, augmenter, build_dataset, preview_patches
    from .export import export_vae
    from .plot import curve_image, save_png
    from .trainer import Callbacks, Distributed, fine_tune, history_curves, pick_device
    from .vae import load_vae

    cfg = config_from_args(args)
    data_cfg = from_arguments(DataConfig, args, seed=cfg.seed)
    if not args.out.endswith(".safetensors"):
        raise VAEFTError(f"--out must end in .safetensors; got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise VAEFTError(f"{args.out!r} already exists; choose another --out or pass --overwrite")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise VAEFTError(f"the folder of --out ({out_dir}) does not exist")
    checkpoint = args.checkpoint or (args.out[: -len(".safetensors")] + ".ckpt" if cfg.checkpoint_every else None)

    dist = Distributed.from_env()
    device = pick_device(args.device, dist)
    if dist.world_size > 1:
        import torch.distributed

        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        base = load_vae(args.vae)
        data = build_dataset(args.data, data_cfg)
        summary = data.summary()
        log = (lambda *a: print(*a, file=sys.stderr)) if dist.is_main else (lambda *a: None)
        log(f"data: {len(summary.get('images_used', []))} images used, {len(summary.get('images_skipped', []))} "
            f"skipped; train {summary.get('train_images')}, validation {summary.get('val_images')}")
        for item in summary.get("images_skipped", []):
            log(f"  skipped {item['path']}: {item['reason']}")

        bar = None
        if dist.is_main and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", file=sys.stderr)

        def on_step(step, total, losses):
            if bar is not None:
                bar.update(step - bar.n)
                if losses:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if k not in ("step", "lr")})
            elif losses and dist.is_main:
                print(json.dumps(losses), file=sys.stderr)

        val = data.val_patches(cfg.val_patches, seed=cfg.seed) if cfg.val_every else None
        local = cfg.batch_size // dist.world_size if cfg.batch_size % dist.world_size == 0 else cfg.batch_size
        pin = device.type == "cuda"
        preview = on_preview = None
        if args.preview_dir and dist.is_main and cfg.preview_every:
            os.makedirs(args.preview_dir, exist_ok=True)
            preview = preview_patches(data, 4, seed=cfg.seed)
            on_preview = functools.partial(_write_preview, args.preview_dir)

        result = fine_tune(
            base,
            lambda start: data.train_batches(local, start_batch=start, rank=dist.rank,
                                             world_size=dist.world_size, pin_memory=pin, with_keys=True),
            cfg, device=device, augment=augmenter(data_cfg),
            val_batch=val, preview_batch=preview, callbacks=Callbacks(on_step=on_step, on_preview=on_preview),
            resume=args.resume, checkpoint_path=checkpoint, dist=dist, data_signature=data.order_signature())
        if bar is not None:
            bar.close()
        if os.environ.get("VAEFT_REPORT_DIGEST"):  # tests: show that every rank ends with the same weights
            print(json.dumps({"rank": dist.rank, "decoder_digest": _decoder_digest(result.model)}), file=sys.stderr)
        if not dist.is_main:
            return 0
        path = export_vae(result, args.out, dataset_summary=summary, overwrite=args.overwrite)
        if args.loss_plot:
            save_png(curve_image(*history_curves(result.history)), args.loss_plot)
        print(json.dumps({"out": path, "steps": result.steps_done, "seconds": round(result.seconds, 1),
                          "micro_batch": result.micro_batch, "skipped_steps": result.skipped_steps,
                          "latent_cache_hits": result.latent_cache_hits,
                          "checkpoint": checkpoint, "best_step": result.best_step, "final": result.history[-1] if result.history else None}))
        return 0
    finally:
        if dist.world_size > 1:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def _write_preview(folder: str, step: int, images) -> None:
    from .plot import image_grid, save_png

    save_png(image_grid(images, rows=2), os.path.join(folder, f"preview-{step:07d}.png"))


def _decoder_digest(model) -> str:
    from .vae import state_dict_sha256

    return state_dict_sha256({k: v for k, v in model.state_dict().items() if k.startswith("decoder.")})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Fine-tune the Stable Diffusion kl-f8 VAE on your own images.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_fit_command(sub)
    from .data import add_patches_command
    from .demo import add_demo_command

    add_demo_command(sub)

    add_patches_command(sub)
    from .evaluate import add_eval_command

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
