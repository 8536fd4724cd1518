"""What the command line's runs share (``fit`` in :mod:`training.cli`, ``distil`` in :mod:`training.cli_distil`):
flags from the config dataclasses, the output checks made before anything is loaded, the progress hooks, Ctrl-C,
and the message that says how to continue a stopped run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
from typing import Any

from .checkpoint import latest_in, peek
from .config import TrainConfig
from .errors import VAEFTError
from .files import check_folder, json_safe
from .options import base_type, field_type, validate
from .runs import RunFolder, resume_point, write_preview
from .session import Hooks


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per field of the config dataclass `cls` (underscores become dashes; metadata
    as in training/options.py)."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = base_type(field_type(cls, f))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # argparse %-formats help strings ("%(default)s"): a literal "%" ("~30%") must be doubled
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if tp is bool:
            group.add_argument(flag, dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, type=tp,
                               choices=f.metadata.get("choices"), help=help_text)


def from_arguments(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    """Build `cls` from parsed flags: flags left unset keep the field's default."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            kwargs[f.name] = value
    kwargs.update(overrides)
    obj = cls(**kwargs)
    validate(obj)
    return obj


def config_from_args(args) -> TrainConfig:
    """The recipe's defaults, then the --memory preset's (sized for --patch-size), then every flag given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None and f.name != "recipe"}
    return TrainConfig.from_recipe(args.recipe or "sd-vae-ft-mse", getattr(args, "patch_size", None), **given)


def _check_outputs(args, out_folder: bool = False) -> None:
    """Every output path, before anything is loaded: a bad path costs seconds, not a finished run. ``out_folder``:
    --out is an existing folder the command writes files into (distil's tiny student), checked by the command."""
    if out_folder:
        _check_not_an_input(args)
    elif args.format == "safetensors" and not args.out.endswith(".safetensors"):
        raise VAEFTError(f"--out must end in .safetensors; got {args.out!r} (or pass --format diffusers for a folder)")
    if out_folder:
        pass
    elif args.format == "diffusers" and args.out.endswith(".safetensors"):
        raise VAEFTError(f"--format diffusers writes a model folder; give --out a folder path, not {args.out!r}")
    elif args.format == "safetensors" and os.path.isdir(args.out):
        raise VAEFTError(f"--out {args.out!r} is a folder; give a file name ending in .safetensors")
    if not out_folder:
        _check_not_an_input(args)
    if not out_folder and os.path.exists(args.out) and not args.overwrite and \
            not (os.path.isdir(args.out) and not os.listdir(args.out)):
        raise VAEFTError(f"{args.out!r} already exists; choose another --out or pass --overwrite")
    for flag, path in (("--out", None if out_folder else args.out), ("--loss-plot", args.loss_plot),
                       ("--checkpoint", getattr(args, "checkpoint", None))):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise VAEFTError(f"the folder of {flag} ({folder}) does not exist; create it or choose another path")
        # the writer resolves the path as written: "missing/../x" goes through "missing", which must exist
        written = os.path.dirname(path.rstrip("/\\")) if path else None
        if written and not os.path.isdir(written):
            raise VAEFTError(f"{flag} {path!r} goes through a folder that does not exist ({written!r}: a '..' is "
                             "resolved after the folders before it); create it or give the path without '..'")
        if folder and not os.access(folder, os.W_OK):
            raise VAEFTError(f"cannot write {flag} {path!r}: its folder is not writable")
    if args.loss_plot and os.path.isdir(args.loss_plot):
        raise VAEFTError(f"--loss-plot {args.loss_plot!r} is a folder; give a .png file name")
    if args.preview_dir:
        check_folder(args.preview_dir, f"--preview-dir {args.preview_dir!r}", "choose another path")

    if args.resume:
        resume_point(args.resume)  # a run folder without a checkpoint yet: said now
    run_dir = args.run_dir or (args.resume if args.resume and os.path.isdir(args.resume) else None)
    if run_dir:
        RunFolder.check(run_dir, resume=bool(args.resume), overwrite=args.overwrite)


def _same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file (or would, for one that does not exist yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _check_not_an_input(args) -> None:
    """No output is one of the run's own input files, whatever --overwrite says: replacing one's input (the
    base VAE above all) is never what it means."""
    inputs = [(flag, getattr(args, dest, None)) for flag, dest in
              (("--vae", "vae"), ("--config", "config"), ("--resume", "resume"), ("--lpips-backbone", "lpips_backbone"))]
    outputs = [("--out", args.out), ("--loss-plot", args.loss_plot), ("--checkpoint", getattr(args, "checkpoint", None))]
    _refuse_outputs_over_inputs(outputs, inputs, "a fine-tune")


def _refuse_outputs_over_inputs(outputs: list[tuple[str, str | None]], inputs: list[tuple[str, str | None]],
                                who: str) -> None:
    """Refuse, whatever --overwrite says, an output (flag, path) that is one of the inputs (flag, path) or another
    output: ``who`` ("a fine-tune") never writes over what it reads, nor one file twice."""
    for i, (out_flag, out) in enumerate(outputs):
        for in_flag, path in inputs:
            if out and path and not os.path.isdir(path) and _same_path(out, path):
                raise VAEFTError(f"{out_flag} {out!r} is the run's own input {in_flag} {path!r}: {who} never "
                                 f"writes over its inputs, with or without --overwrite; choose another {out_flag}")
        for other_flag, other in outputs[:i]:
            if out and other and _same_path(out, other):
                raise VAEFTError(f"{out_flag} and {other_flag} are the same file {out!r}: choose two names")


def _stopped(args) -> str:
    """What a stopped ``fit`` wrote and the exact command that continues it (or starts it again)."""
    run_dir, checkpoint = getattr(args, "writes", (None, None))
    newest = latest_in(os.path.join(run_dir, "checkpoints")) if run_dir else \
        (checkpoint if checkpoint and os.path.isfile(checkpoint) and peek(checkpoint) else None)
    argv, skip = [], False
    for token in getattr(args, "argv", None) or []:
        if skip or token == "--resume" or token.startswith("--resume="):
            skip = token == "--resume"
            continue
        argv.append(token)
    if newest is not None:
        step = (peek(newest) or {}).get("step")
        again = shlex.join(["python", "-m", "training", *argv, "--resume", run_dir or newest])
        return f"the newest checkpoint is {newest} (step {step}); continue with: {again}"
    if run_dir:
        again = shlex.join(["python", "-m", "training", *argv, "--overwrite"]) if "--overwrite" not in argv else \
            shlex.join(["python", "-m", "training", *argv])
        return (f"no checkpoint was written yet (stopped before the first step): run folder {run_dir} holds only "
                f"the run's config.json and metrics.jsonl. Start it again with: {again}")
    if checkpoint:
        return "no checkpoint was written yet (stopped before the first step); run the same command again"
    return "nothing was written (no checkpoint was asked for: --run-dir or --checkpoint-every keep one)"


def _fit_hooks(args, dist, bar):
    """The session's hooks for ``fit``: the progress bar (or one JSON line per history line without
    one), notes on stderr, previews into --preview-dir; only the main process speaks."""
    if not dist.is_main:
        return Hooks()

    def step(status):
        if bar is not None:
            bar.update(status.step - bar.n)

    def log(line, status):
        if bar is not None:
            bar.set_postfix(status.fields())
        else:
            print(json.dumps(json_safe(line)), file=sys.stderr)

    def checkpoint(step, path):
        if bar is None:
            print(json.dumps({"checkpoint": path, "step": step}), file=sys.stderr)

    def preview(step, images):
        os.makedirs(args.preview_dir, exist_ok=True)
        write_preview(args.preview_dir, step, images)
    preview = preview if args.preview_dir and args.preview_every != 0 else None
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    return Hooks(note=say, warn=say, step=step, log=log, preview=preview, checkpoint=checkpoint)


class _StopOnSigint:
    """Ctrl-C once: finish the current micro-batch, checkpoint the step reached, stop. Twice: stop at once."""

    def __init__(self):
        self.flag, self.previous = False, None

    def requested(self) -> bool:
        return self.flag

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
