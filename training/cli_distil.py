"""``python -m training distil``: a faster decoder distilled from a teacher VAE on a folder of images (issue 30).

    python -m training distil --vae TEACHER.safetensors --data DIR --student narrow --width 64 --out OUT.safetensors
    python -m training distil --vae TEACHER.safetensors --data DIR --student tiny --out ComfyUI/models/vae_approx

The flags are fit's (the same session: steps, patch size, batch, seed, LPIPS weight, run folder, checkpoints,
resume, progress, Ctrl-C), the recipe distil-narrow / distil-tiny by default, and :class:`DistilConfig`'s.
"""

from __future__ import annotations

import json
import os
import sys

from . import families
from .cli_common import (_StopOnSigint, _check_outputs, _fit_hooks, _stopped, add_arguments, config_from_args,
                         from_arguments)
from .config import DataConfig, DistilConfig, TrainConfig
from .data import build_dataset
from .device import Distributed, distributed, pick_device
from .distil import check_tiny_out, export_narrow, export_tiny, run_distil, tiny_names
from .errors import VAEFTError
from .files import json_safe
from .vae import load_vae


def add_distil_command(sub) -> None:
    p = sub.add_parser("distil", help="distil a faster decoder (narrow drop-in, or tiny for ComfyUI's previews) from "
                                      "a VAE on a folder of images",
                       description="The student learns the teacher's decode of the teacher's own latents on your "
                                   "patches. narrow: the teacher's layout with a narrower decoder, a VAE file ComfyUI's "
                                   "Load VAE reads (kl-f8, Flux.2). tiny: a TAESD-layout decoder for ComfyUI's "
                                   "previews, written into --out (ComfyUI's models/vae_approx).")
    p.add_argument("--vae", help=f"the teacher VAE file: a {families.labels_text('or')} (tiny: kl-f8 or Flux.2)")
    p.add_argument("--data", help="folder of training images (searched recursively)")
    p.add_argument("--out", help="narrow: the output .safetensors path (the teacher's layout); tiny: the folder the "
                                 "decoder (and encoder) files go into, ComfyUI's models/vae_approx")
    p.add_argument("--name", help="tiny: the name in the files' names, <taesd>_decoder.ft-<name>.safetensors "
                                  "(default: the teacher file's name)")
    p.add_argument("--family", choices=families.LATENT_CHOICES, default="auto",
                   help="kl-f8: the latent family its diffusion models use (sd, sdxl, sd3, flux; auto: from the file's "
                        "name or its latents): the tiny decoder's name and latent scaling, the narrow export's metadata")
    p.add_argument("--time-size", type=int, metavar="PIXELS",
                   help="the side of the image the decode is timed at, teacher against student (default: the patch size)")
    p.add_argument("--run-dir", metavar="DIR", help="the run's folder (config.json, metrics.jsonl, previews/, "
                                                     "checkpoints/); continue a stopped run with --resume DIR")
    p.add_argument("--overwrite", action="store_true", help="replace --out's files, --checkpoint or --run-dir if they "
                                                            "hold something else (never the teacher)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--checkpoint", help="resumable checkpoint file (see fit --help)")
    p.add_argument("--resume", help="continue from this checkpoint, or the newest one of this run folder")
    p.add_argument("--preview-dir", help="write preview reconstructions here every --preview-every steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    add_arguments(p, DistilConfig)
    add_arguments(p, TrainConfig)
    add_arguments(p, DataConfig, skip=("seed",))
    for action in p._actions:  # the student's recipe is distil's default, not fit's
        if action.dest == "recipe":
            action.help = action.help.replace("(default: sd-vae-ft-mse)", "(default: distil-narrow or distil-tiny, "
                                                                          "after --student)")
    p.set_defaults(func=run_distil_command)


def run_distil_command(args) -> int:
    """Load the teacher and the data, distil through the one session with a progress bar and Ctrl-C, then write the
    student and print its figures."""
    missing = [f"--{k}" for k in ("vae", "data", "out") if not getattr(args, k)]
    if missing:
        raise VAEFTError(f"{', '.join(missing)} required")
    dcfg = from_arguments(DistilConfig, args)
    args.recipe = args.recipe or f"distil-{dcfg.student}"
    cfg = config_from_args(args)
    if dcfg.student == "tiny" and cfg.grad_checkpointing and args.grad_checkpointing is None:
        cfg = cfg.replace(grad_checkpointing=False)  # a --memory preset's, sized for the family decoders
    data_cfg = from_arguments(DataConfig, args, seed=cfg.seed)
    args.format, args.loss_plot, args.general, args.config = "safetensors", None, None, None
    tiny = dcfg.student == "tiny"
    if tiny:
        if args.out.endswith(".safetensors"):
            raise VAEFTError(f"--student tiny writes its files into a folder (ComfyUI's models/vae_approx); give --out "
                             f"a folder, not {args.out!r}")
        check_tiny_out(args.out, {}, args.overwrite)
        if args.checkpoint_every and not (args.checkpoint or args.run_dir or args.resume):
            raise VAEFTError("--checkpoint-every with --student tiny needs --checkpoint FILE or --run-dir DIR: a tiny "
                             "student's checkpoints do not belong in --out (ComfyUI's models/vae_approx)")
    # fit's checks: --out (narrow: the .safetensors path, its folder), --checkpoint, --run-dir, --resume, --preview-dir,
    # and no output over an input (the teacher above all)
    _check_outputs(args, out_folder=tiny)
    checkpoint = None
    if not (args.run_dir or (args.resume and os.path.isdir(args.resume))) and (args.checkpoint or args.checkpoint_every):
        checkpoint = args.checkpoint or args.out[: -len(".safetensors")] + ".ckpt"
    args.writes = (args.run_dir or (args.resume if args.resume and os.path.isdir(args.resume) else None), checkpoint)
    name = args.name or os.path.splitext(os.path.basename(args.vae))[0]
    dist = Distributed.from_env()
    device = pick_device(args.device, dist)
    with distributed(dist, device):
        teacher = load_vae(args.vae)
        data = build_dataset(args.data, data_cfg)
        bar = None
        if dist.is_main and not args.no_progress:
            from tqdm import tqdm  # only for a progress bar (it comes with diffusers' huggingface_hub)

            bar = tqdm(total=cfg.steps, desc=f"distil {dcfg.label}", unit="step", file=sys.stderr)
        hooks = _fit_hooks(args, dist, bar)
        stop = _StopOnSigint()
        hooks.should_stop = stop.requested

        def before_training(student, spec):
            if tiny:  # on every process: one refusing alone would leave the others waiting
                check_tiny_out(args.out, tiny_names(spec, name, dcfg.with_encoder), args.overwrite)

        with stop:
            result = run_distil(teacher, data, cfg, dcfg, family=args.family, time_side=args.time_size, device=device,
                                before_training=before_training, run_dir=args.run_dir, resume=args.resume,
                                checkpoint=checkpoint, overwrite=args.overwrite,
                                inputs={"vae": args.vae, "data": args.data, "out": args.out}, dist=dist, hooks=hooks)
        if bar is not None:
            bar.close()
        loop = result.session.loop
        if result.stopped:
            print(f"interrupted at step {loop.steps_done} of {loop.config.steps}; {_stopped(args)}", file=sys.stderr)
            return 130
        if result.session.trained is None:  # not the main process
            return 0
        if tiny:
            written = export_tiny(result, args.out, name, overwrite=args.overwrite)
            print(written["text"], file=sys.stderr)
            files = written["files"]
        else:
            report = export_narrow(result, args.out, overwrite=args.overwrite, device=device, family=args.family)
            print(report.text(), file=sys.stderr)
            files = [report.path]
        summary = {"student": dcfg.label, "files": files, "steps": loop.steps_done, "seconds": round(loop.seconds, 1),
                   "run_dir": result.session.run_dir, "checkpoint": loop.checkpoint, "figures": result.figures,
                   "tiny": result.spec, "final": loop.history[-1] if loop.history else None}
        print(json.dumps(json_safe(summary)))
        return 0
