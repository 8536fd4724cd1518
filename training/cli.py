"""``python -m training <command>``: fit, patches, eval, compare, demo, distil (its runner: cli_distil). The one command-line layer: each
subcommand's parser and runner live here, over library functions (no other module imports argparse).

    python -m training fit --vae BASE.safetensors --data DIR --out OUT.safetensors \
        --steps N --patch-size P --batch-size B
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from typing import Any

from . import families, metrics
from .config import DataConfig, TrainConfig
from .data import build_dataset
from .demo import write_demo
from .errors import VAEFTError
from .device import Distributed, distributed, pick_device
from .alpha import to_channels
from .cli_common import (_StopOnSigint, _check_outputs, _fit_hooks, _refuse_outputs_over_inputs, _stopped,
                         add_arguments, config_from_args, from_arguments)
from .cli_distil import add_distil_command
from .evaluate import DATA_FLAGS, compare, eval_patches, full_image_report, image_channels_of, metric_deltas
from .export import FORMATS, export_vae
from .files import atomic_write, json_safe
from .imageio import ImageReadError, read_image, to_signed
from .latent_compare import DIFFERENCE_MAX, compare_on_latents
from .latents import latent_files, read_latents
from .plot import curve_image, history_curves, save_png, to_pil
from .probe import half_precision_check
from .runs import read_config
from .session import run_session
from .vae import latent_channels, load_vae

# ----------------------------------------------------------------------------- flags from the configs


# ----------------------------------------------------------------------------- fit

def add_fit_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fine-tune a VAE on patches of a folder of images and export it",
                       description="Fine-tune a VAE. Multi-GPU: torchrun --nproc-per-node N -m training fit ...")
    p.add_argument("--config", metavar="FILE", help="a run's config.json (or its run folder): every setting "
                                                      "and input of that run; flags given here override it")
    p.add_argument("--vae", help=f"base VAE file (.safetensors/.ckpt; the layouts ComfyUI and diffusers use, or a "
                                 f"checkpoint that contains one): a {families.labels_text('or')}")
    p.add_argument("--data", help="folder of training images (searched recursively)")
    p.add_argument("--out", help="output .safetensors path (the base file's layout, loadable by Load VAE); with "
                                 "--format diffusers a model folder")

    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors: one file in the base's layout (ComfyUI; Automatic1111 for kl-f8); diffusers: a folder that "
                        "diffusers' from_pretrained loads (config.json + diffusion_pytorch_model.safetensors: "
                        f"{families.diffusers_text()})")
    p.add_argument("--family", choices=families.LATENT_CHOICES, default="auto",
                   help="latent family whose scaling_factor/shift_factor the export records (auto: from the base "
                        "file's name or its latents; re-estimated when the encoder is trained). "
                        f"{families.latent_choices_text()}")
    p.add_argument("--general", metavar="DIR", help="optional folder of other images, validated beside the "
                                                     "domain's (gen_* scores): does the fine-tune harm them?")
    p.add_argument("--run-dir", metavar="DIR", help="the run's folder: config.json, metrics.jsonl, previews/, "
                                                     "checkpoints/ (TensorBoard events when tensorboard is "
                                                     "installed). Continue a stopped run with --resume DIR")
    p.add_argument("--overwrite", action="store_true", help="replace --out, --checkpoint or --run-dir if they "
                                                            "hold something else (never one of the run's inputs, "
                                                            "such as --vae)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--checkpoint", help="resumable checkpoint file, written every --checkpoint-every steps or "
                                        "--checkpoint-minutes, at the end and on Ctrl-C (default: <out>.ckpt when "
                                        "--checkpoint-every is given; the run folder's checkpoints/ with --run-dir)")
    p.add_argument("--resume", help="continue from this checkpoint, or from the newest one of this run folder "
                                    "(same training settings, data and number of processes; --steps may grow, "
                                    "which stretches a cosine schedule from there)")
    p.add_argument("--loss-plot", help="also write the loss curve as a PNG here")
    p.add_argument("--preview-dir", help="write preview reconstructions (inputs above, outputs below) here "
                                         "every --preview-every steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--allow-changed-base", action="store_true",
                   help="with --config: train although --vae is not the base VAE file the run recorded (its "
                        "digest differs)")
    add_arguments(p, TrainConfig)
    add_arguments(p, DataConfig, skip=("seed",))  # one --seed, from TrainConfig, seeds everything
    p.set_defaults(func=run_fit)
    return p


def run_fit(args) -> int:
    """Load the base VAE and the data as the flags say, run the one training session
    (:func:`training.session.run_session`) with a progress bar and Ctrl-C, then export."""
    missing = [f"--{k}" for k in ("vae", "data", "out") if not getattr(args, k)]
    if missing:
        where = "a --config names --vae and --data, never --out" if args.config else \
            "or a --config that names --vae and --data"
        raise VAEFTError(f"{', '.join(missing)} required ({where})")
    cfg = config_from_args(args)
    data_cfg = from_arguments(DataConfig, args, seed=cfg.seed)
    _check_outputs(args)
    checkpoint = None
    if not (args.run_dir or (args.resume and os.path.isdir(args.resume))) and (args.checkpoint or args.checkpoint_every):
        stem = args.out[: -len(".safetensors")] if args.format == "safetensors" else args.out.rstrip("/\\")
        checkpoint = args.checkpoint or stem + ".ckpt"  # only where asked: --checkpoint FILE or <out>.ckpt

    args.writes = (args.run_dir or (args.resume if args.resume and os.path.isdir(args.resume) else None),
                   checkpoint)  # what a stop message looks at
    dist = Distributed.from_env()
    device = pick_device(args.device, dist)
    with distributed(dist, device):
        base = load_vae(args.vae)
        _check_recorded_base(args, base.layout.base_sha256)
        base.family.check_latent_choice(base.model, args.family)  # the export's --family, refused before training
        data = build_dataset(args.data, data_cfg)
        # the general images are all scored: none held out, and --mask-dir's masks belong to --data's images
        general = build_dataset(args.general, dataclasses.replace(data_cfg, mask_dir=None, val_fraction=0.0)) \
            if args.general and cfg.val_every else None
        bar = None
        if dist.is_main and not args.no_progress:
            from tqdm import tqdm  # only for a progress bar (it comes with diffusers' huggingface_hub)

            bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", file=sys.stderr)
        hooks = _fit_hooks(args, dist, bar)
        stop = _StopOnSigint()
        hooks.should_stop = stop.requested
        with stop:
            session = run_session(base, data, cfg, general=general, run_dir=args.run_dir, resume=args.resume,
                                  checkpoint=checkpoint, overwrite=args.overwrite,
                                  inputs={"vae": args.vae, "data": args.data, "out": args.out,
                                          "general": args.general},
                                  device=device, dist=dist, hooks=hooks)
        if bar is not None:
            bar.close()
        loop = session.loop
        if session.stopped:
            print(f"interrupted at step {loop.steps_done} of {loop.config.steps}; {_stopped(args)}", file=sys.stderr)
            return 130
        if session.trained is None:  # not the main process
            return 0
        report = export_vae(session.trained, args.out, overwrite=args.overwrite, device=device, format=args.format,
                            family=args.family)
        print(report.text(), file=sys.stderr)
        if args.loss_plot:
            save_png(curve_image(*history_curves(loop.history)), args.loss_plot)
        summary = {"out": report.path, "steps": loop.steps_done, "seconds": round(loop.seconds, 1),
                   "micro_batch": loop.micro_batch, "skipped_steps": loop.skipped_steps,
                   "latent_cache_hits": loop.latent_cache_hits, "checkpoint": loop.checkpoint,
                   "run_dir": session.run_dir, "best_step": loop.best_step, "rank_digests": loop.rank_digests,
                   "final": loop.history[-1] if loop.history else None}
        if loop.fp16_fix is not None:
            summary["fp16_fix"] = loop.fp16_fix
        print(json.dumps(json_safe(summary)))
        return 0


# ----------------------------------------------------------------------------- patches

def add_patches_command(sub) -> None:
    """``patches``: inspect a dataset (summary, sample stats, preview PNG)."""
    p = sub.add_parser("patches", help="scan a folder, sample patches, print one JSON summary",
                       description="Scan a folder of images as training would, sample patches and "
                                   "print one JSON object: the dataset summary plus stats of "
                                   "--count sampled patches (the first training batch).")
    p.add_argument("--data", required=True, help="folder of training images")
    p.add_argument("--count", type=int, default=16, help="patches to sample for stats and the preview (default: 16)")
    p.add_argument("--preview", default=None, help="write a PNG grid of sampled patches with foreground outlines")
    p.add_argument("--json", action="store_true", help="output is always one JSON object (accepted for symmetry)")
    add_arguments(p, DataConfig)
    p.set_defaults(func=run_patches)


def run_patches(args) -> int:
    cfg = from_arguments(DataConfig, args)
    if args.count < 1:
        raise VAEFTError(f"--count must be at least 1, got {args.count}")
    data = build_dataset(args.data, cfg)
    out = dict(data.summary())
    batch = data.inspect_batch(0, args.count)  # = the first training batch
    x, masks = batch["patches"], batch["foreground"]
    out["sample"] = {
        "count": x.shape[0],
        "shape": list(x.shape),
        "min": round(float(x.min()), 4),
        "max": round(float(x.max()), 4),
        "mean_rgb": [round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist()],
        "std_rgb": [round(v, 4) for v in x.std(dim=(0, 2, 3)).tolist()],
        "foreground": None if masks is None else [round(v, 4) for v in masks.float().mean(dim=(1, 2)).tolist()],
        "images": batch["images"],
    }
    out["preview"] = None
    if args.preview:
        os.makedirs(os.path.dirname(os.path.abspath(args.preview)), exist_ok=True)
        save_png(data.preview(args.count, seed=cfg.seed), args.preview)
        out["preview"] = args.preview
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- eval

def add_eval_command(sub) -> None:
    """``eval``: compare VAEs on the same seeded patches (see training/evaluate.py)."""
    p = sub.add_parser(
        "eval", help="compare VAEs on the same seeded patches (PSNR, SSIM, LPIPS, CIEDE2000, colour shift)",
        description="Encode and decode the same seeded patches with every --vae and print one JSON "
                    "object of metrics (mean and std over patches). Use the --seed and --val-fraction "
                    "of the fit run to evaluate on its held-out validation images.")
    p.add_argument("--vae", action="append", required=True, metavar="PATH",
                   help="VAE file; repeat to compare several (each named by its file stem; the first is "
                        "the reference for --general deltas)")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images like those fine-tuned on")
    p.add_argument("--general", metavar="DIR", help="optional folder of other (general) images, to measure harm")
    p.add_argument("--count", type=int, default=64, help="patches per folder (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="patches per forward pass (default: 8)")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default: alex)")
    p.add_argument("--lpips-backbone", metavar="PATH",
                   help="torchvision ImageNet weights for LPIPS (default: torchvision's cache); never downloaded")
    p.add_argument("--inception", metavar="PATH",
                   help="Inception v3 weights for rFID (default: torch hub cache); rFID is skipped without them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the JSON object to PATH (stdout is always one JSON object; a bare --json "
                        "is accepted for symmetry with other commands)")
    p.add_argument("--grid", metavar="PATH", help="also write a PNG: original | each VAE | error heat map "
                                                   "for the first 4 patches of --data")
    p.add_argument("--full-image", metavar="PATH", help="also reconstruct this whole image in tiles and report "
                                                         "seams along tile borders")
    p.add_argument("--half", action="store_true",
                   help="also decode a few of the patches (2 of 64x64 on a CPU, 4 of up to 256x256 on a GPU) in fp16 "
                        "and bf16: NaN/inf pixels, the largest activation per decoder block, PSNR against the first "
                        "VAE's fp32 decode (does it run in half precision? the fp16-fix recipe makes it)")
    p.add_argument("--tile", type=int, default=512, help="tile size for --full-image, px (default: 512)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap for --full-image, px (default: 64)")
    add_arguments(p, DataConfig, skip=tuple(f.name for f in dataclasses.fields(DataConfig) if f.name not in DATA_FLAGS))
    p.set_defaults(func=run_eval)


def _vae_names(paths: list[str]) -> dict[str, str]:
    """name (file stem, made unique with -2, -3, ...) -> path."""
    names: dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "vae"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names[name] = path
    return names


def run_eval(args) -> int:
    """Print one JSON object: {"patch_size", "seed", "count", "vaes": {name: path}, "sources":
    {"data": {...}, "general": {...}}, "data": {name: {metric: {"mean", "std"}, "patches": n, ...}},
    "general": {...} (with --general), "general_delta" / "data_delta" (with 2+ VAEs), "lpips" and
    "rfid": availability, "grid" (with --grid), "full_image": {...} (with --full-image), "notes": [...]}."""
    cfg = from_arguments(DataConfig, args)
    if args.count < 1:
        raise VAEFTError(f"--count must be at least 1, got {args.count}")
    if args.batch_size < 1:
        raise VAEFTError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.full_image and not os.path.isfile(args.full_image):
        raise VAEFTError(f"--full-image {args.full_image!r} does not exist")
    for flag, path in (("--json", args.json), ("--grid", args.grid)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise VAEFTError(f"the folder of {flag} {path!r} does not exist")
    device = pick_device(args.device)
    names = _vae_names(args.vae)
    vaes = {name: load_vae(path).model for name, path in names.items()}

    lpips_net, lpips_info = metrics.try_load_lpips(args.lpips_net, args.lpips_backbone)
    inception, rfid_info = metrics.load_inception(args.inception)
    if inception is not None:
        rfid_info["note"] = ("rFID over few patches is biased upward (it is meant for thousands); compare "
                             "values only between VAEs of this run")
    common = dict(lpips_net=lpips_net, lpips_unavailable='see "lpips" at the top level', inception=inception,
                  rfid_unavailable='see "rfid" at the top level', batch_size=args.batch_size, device=device)

    out: dict[str, Any] = {"patch_size": cfg.patch_size, "seed": cfg.seed, "count": args.count,
                           "vaes": names, "sources": {}, "lpips": lpips_info, "rfid": rfid_info}
    notes: list[str] = []
    latents = {n: latent_channels(m) for n, m in vaes.items()}
    if len(set(latents.values())) > 1:
        notes.append(f"the VAEs have different latent layouts ({latents} latent channels): each encodes and "
                     "decodes its own latents, so these reconstruction metrics are comparable, but their "
                     "latents are not interchangeable and cannot be compared with each other")

    channels = image_channels_of(vaes)  # RGB or RGBA patches, as the VAEs take them (all alike)
    patches, out["sources"]["data"] = eval_patches(args.data, cfg, args.count, use_validation=True,
                                                   channels=channels)
    out["data"], grid = compare(vaes, patches, rows=4 if args.grid else 0, **common)
    if args.general:
        # the masks of --mask-dir belong to --data's images
        gpatches, out["sources"]["general"] = eval_patches(args.general, dataclasses.replace(cfg, mask_dir=None),
                                                           args.count, use_validation=False, channels=channels)
        out["general"], _ = compare(vaes, gpatches, **common)
        if len(vaes) > 1:
            out["general_delta"] = metric_deltas(out["general"], next(iter(vaes)))
    if len(vaes) > 1:
        out["data_delta"] = metric_deltas(out["data"], next(iter(vaes)))
    if grid is not None:
        save_png(grid, args.grid)
        out["grid"] = {"path": args.grid, "columns": ["original"] + list(vaes) + [f"|{list(vaes)[-1]} - original|"]}
    if args.half:

        out["half_precision"] = json_safe(half_precision_check(vaes, patches, device), infinity="overflow")
    if args.full_image:
        try:
            image = to_channels(to_signed(read_image(args.full_image, alpha=channels == 4).pixels)[None], channels)
        except ImageReadError as e:
            raise VAEFTError(f"--full-image {args.full_image!r}: {e}") from None
        out["full_image"] = full_image_report(vaes, image, args.full_image, args.tile, args.overlap, device)
    out["notes"] = notes
    text = json.dumps(json_safe(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------- compare

def add_compare_command(sub) -> None:
    """``compare``: a base and a tuned VAE decode the same saved latents (see training/latent_compare.py)."""
    p = sub.add_parser(
        "compare", help="decode your own generations' latents with a base and a tuned VAE, side by side",
        description="Decode the same latents (ComfyUI's Save Latent .latent files, or tensors in .safetensors/.pt) "
                    "with --base and --tuned: per VAE the round trip (decode, encode, distance to the given latent) "
                    "and fp16/bf16 safety on these latents; between them PSNR, LPIPS and CIEDE2000. Prints the "
                    "table, writes rows of base | tuned | |tuned - base| (amplified) to --out.")
    p.add_argument("--base", required=True, metavar="PATH", help="the base VAE file")
    p.add_argument("--tuned", required=True, metavar="PATH", help="the fine-tuned VAE file")
    p.add_argument("--latents", required=True, metavar="FILE_OR_DIR",
                   help="a .latent / .safetensors / .pt / .pth file, or a folder of them (its own files, not its "
                        "subfolders'; e.g. ComfyUI's output/latents)")
    p.add_argument("--out", required=True, metavar="GRID.png", help="the comparison image to write (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --json) when they exist")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--limit", type=int, default=16, metavar="N",
                   help="compare at most N latents, each latent of a batch counting as one (default: 16)")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=None,
                   help="decode in fp16 and bf16 too (NaN/inf, saturated pixels, PSNR against the VAE's own fp32 "
                        "decode); default: on a GPU; on a CPU, where it takes minutes per full-size VAE even on the "
                        "64-pixel crops of 2 latents it uses there, only with --half")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default: alex)")
    p.add_argument("--lpips-backbone", metavar="PATH",
                   help="torchvision ImageNet weights for LPIPS (default: torchvision's cache); never downloaded")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.set_defaults(func=run_compare)


def run_compare(args) -> int:
    """Every input read and checked, then the decodes, then --out (and --json) written whole or not at all."""
    if args.limit < 1:
        raise VAEFTError(f"--limit must be at least 1, got {args.limit}")
    if not args.out.lower().endswith(".png"):
        raise VAEFTError(f"--out {args.out!r}: the comparison image is a PNG; name it ….png")
    outputs = [("--out", args.out)] + ([("--json", args.json)] if args.json else [])
    for flag, path in outputs:
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise VAEFTError(f"the folder of {flag} {path!r} does not exist")
        if os.path.lexists(path) and not args.overwrite:
            raise VAEFTError(f"{flag} {path!r} exists; choose another name or pass --overwrite")
    inputs = [("--base", args.base), ("--tuned", args.tuned), ("--lpips-backbone", args.lpips_backbone)]
    _refuse_outputs_over_inputs(outputs, inputs + [("--latents", f) for f in latent_files(args.latents)], "compare")
    items, notes = read_latents(args.latents)
    base, tuned = load_vae(args.base).model, load_vae(args.tuned).model
    result = compare_on_latents(base, tuned, items, lpips=args.lpips_net, lpips_backbone=args.lpips_backbone,
                                device=pick_device(args.device), limit=args.limit, half=args.half, notes=notes)
    png = io.BytesIO()
    to_pil(result.grid).save(png, format="PNG")
    report = {"vaes": {"base": args.base, "tuned": args.tuned}, **result.report, "grid": args.out}
    text = json.dumps(json_safe(report, infinity="overflow"), indent=2) + "\n"  # made before anything is written
    atomic_write(args.out, lambda f: f.write(png.getvalue()), overwrite=args.overwrite, what="comparison image")
    if args.json:
        atomic_write(args.json, lambda f: f.write(text.encode()), overwrite=args.overwrite, what="JSON report")
    print(result.text)
    print(f"comparison image: {args.out} (a row per latent: base | tuned | |tuned - base|, pale yellow = "
          f"{DIFFERENCE_MAX:g} mean difference)")
    return 0


# ----------------------------------------------------------------------------- demo

def add_demo_command(sub) -> None:
    """``demo``: a random-init VAE and synthetic fundus-like images to try the tool on."""
    p = sub.add_parser("demo", help="write a random-init VAE and synthetic fundus-like images to try the tool")
    p.add_argument("--out", default="demo", help="folder to write into")
    p.add_argument("--images", type=int, default=6, help="number of images")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--latent-channels", type=int, default=4, help="4 (SD1/2/XL layout) or 16 (SD3/Flux layout)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    print(json.dumps(write_demo(args.out, args.images, args.size, args.latent_channels, args.seed)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Fine-tune a diffusion model's VAE on your own images: the "
                                                 f"{families.labels_text('or')}.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.fit_parser = add_fit_command(sub)
    for add in (add_demo_command, add_patches_command, add_eval_command, add_compare_command, add_distil_command):
        add(sub)
    return parser


# What a run's config.json may give ``fit --config``: its settings and the files it reads. Everything that
# writes, replaces or redirects files (--out, --overwrite, --checkpoint, --run-dir, --resume, ...) comes
# from the command line only, so a shared config can never replace a file nobody asked to replace.
CONFIG_INPUTS = ("vae", "data", "general")
CONFIG_FIELDS = ("format", "paths", "inputs", "settings", "base_sha256", "images")  # what a run's config.json holds


def _apply_config(parser: argparse.ArgumentParser, argv: list[str] | None, args) -> argparse.Namespace:
    """``fit --config FILE``: the run's settings and inputs become the defaults, flags override; the
    file's switches that write files are ignored (said on stderr). A config the ComfyUI node wrote
    names ComfyUI files: --vae and --data must be given."""
    run = read_config(args.config)
    fit = parser.fit_parser
    dests = {a.dest for a in fit._actions}
    settings = {f.name for cls in (TrainConfig, DataConfig) for f in dataclasses.fields(cls)}
    node = run.get("paths") == "comfyui"
    inputs = {("data" if k == "dataset" and node else k): v for k, v in (run.get("inputs") or {}).items()}
    if "distil" in (run.get("settings") or {}):
        raise VAEFTError(f"--config {args.config!r} is a distil run's: fit does not repeat it; run python -m training "
                         "distil with its flags (continue the run with distil's --resume RUN_FOLDER)")
    values = {**(run.get("settings") or {}), **{k: v for k, v in inputs.items() if v is not None}}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise VAEFTError(f"--config {args.config!r} has settings this version does not know: {', '.join(unknown)}")
    # switches in the settings or inputs, or beside them (a hand-edited file's own): said, never used
    ignored = sorted({k for k in values if k not in settings and k not in CONFIG_INPUTS and k != "out"}
                     | {k for k in run if k not in CONFIG_FIELDS})
    if ignored:
        print(f"--config {args.config!r}: ignored {', '.join(ignored)} from the file: switches that write, replace "
              "or redirect files are taken only from the command line", file=sys.stderr)
    fit.set_defaults(**{k: v for k, v in values.items() if k in settings or (k in CONFIG_INPUTS and not node)})
    args = parser.parse_args(argv)
    if node and not (args.vae and args.data):
        names = ", ".join(f"{k} {v!r}" for k, v in inputs.items() if k in ("vae", "data") and v)
        raise VAEFTError(f"--config {args.config!r} was written by the ComfyUI node: its inputs are names inside "
                         f"ComfyUI ({names}), not files here; give --vae BASE.safetensors and --data DIR")
    if node and inputs.get("general") and not args.general:
        print(f"--config {args.config!r}: the node's run also validated on general images ({inputs['general']!r} in "
              "ComfyUI); this run does not: give --general DIR to do the same", file=sys.stderr)
    args.recorded_base_sha256 = run.get("base_sha256")
    return args


def _check_recorded_base(args, sha256: str) -> None:
    """``fit --config``: the base VAE must be the file the run recorded (by digest), unless
    --allow-changed-base says otherwise."""
    recorded = getattr(args, "recorded_base_sha256", None)
    if recorded and recorded != sha256 and not args.allow_changed_base:
        raise VAEFTError(f"--vae {args.vae!r} is not the base VAE the run in --config {args.config!r} was trained "
                         f"from (its sha256 {sha256[:12]}…, recorded {recorded[:12]}…): the file was replaced or "
                         "another one given. Give the original base VAE, or pass --allow-changed-base to train "
                         "from this one")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _apply_config(parser, argv, args)
        args.argv = argv
        return int(args.func(args) or 0)
    except VAEFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C twice: stopped at once, perhaps while a checkpoint was written
        print(f"interrupted at once: {_stopped(args)}", file=sys.stderr)
        return 130
