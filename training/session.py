"""One training session, the same for every front end.

The CLI (flags, a progress bar, Ctrl-C) and the ComfyUI node (widgets, ComfyUI's progress, Cancel, the
status text) each load the base VAE and build the dataset in their own way, then call
:func:`run_session`, which does everything else, in this order:

1. check, reading but never writing: the resumed checkpoint against this run (base VAE, settings,
   every tensor by name, data), the run folder, the checkpoints' place (claimed for this run), the
   LPIPS weights, the settings against the number of processes;
   The data gives patches of the VAE's image channels (RGB, or RGBA with straight alpha: what changed in
   the images for them is said once, and recorded in the dataset summary the export's metadata keeps);
2. held-out patches for validation (off, with a note, when the dataset has none), patches of the
   optional general images, fixed preview patches;
3. only then the run folder: config.json, metrics.jsonl cut back to the checkpoint's step on resume;
4. :func:`training.trainer.fine_tune`, with its history, previews and checkpoints written to the
   run folder and the front end's hooks told of each step;
5. after a finished run, the export probe (:func:`training.probe.make_probe`) and the
   :class:`~training.trained.Trained` result that :func:`training.export.export_vae` writes.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .augment import augmenter
from .checkpoint import Checkpoints, DamagedCheckpoint, load_checkpoint
from .config import TrainConfig, check_preset_holds
from .data import PatchDataset, preview_patches, worker_start_method
from .device import Distributed, pick_device
from .errors import VAEFTError
from .evaluate import evaluation_patches
from .families import trained
from .files import FolderLock
from .losses import load_lpips
from .probe import make_probe
from .runs import RunFolder, RunStatus, explain_damaged, read_metrics, resume_point
from .trained import Trained
from .trainer import Callbacks, LoopResult, check_run, fine_tune
from .vae import LoadedVAE, check_patch_side, image_channels, trainable_shapes


@dataclass
class Hooks:
    """What a front end is told during a session, and how it stops one; every hook is optional.

    note(text): information for the user (what the data holds, which files were skipped).
    warn(text): something the user asked for that the session changed (validation switched off
        without held-out images, loader workers that cannot start here).
    step(status): after every optimizer step; ``status`` (a :class:`training.runs.RunStatus`) has
        the step, rates, latest losses and validation scores.
    log(line, status): after every history line (training terms at logging steps, validation
        scores, the base VAE's scores at step 0), once it is in metrics.jsonl.
    preview(step, images): (2N, 3, H, W) in [0, 1], inputs then reconstructions (also written to
        the run folder's previews/).
    checkpoint(step, path): after a checkpoint was written.
    should_stop(): polled before every micro-batch; True stops the run at the step reached, which is
        checkpointed (Cancel, Ctrl-C).
    """

    note: Callable[[str], None] | None = None
    warn: Callable[[str], None] | None = None
    step: Callable[[RunStatus], None] | None = None
    log: Callable[[dict, RunStatus], None] | None = None
    preview: Callable[[int, torch.Tensor], None] | None = None
    checkpoint: Callable[[int, str], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class SessionResult:
    trained: Trained | None  # None when the run was stopped, and on processes other than the main one
    loop: LoopResult         # what the loop did: steps, history, micro-batch, checkpoint, ...
    run_dir: str | None      # the run folder written, if any
    stopped: bool = False    # stopped by should_stop (during training, or once it had ended: nothing exported)


def run_session(vae: LoadedVAE, data: PatchDataset, cfg: TrainConfig, *,
                general: PatchDataset | None = None,
                run_dir: str | os.PathLike | None = None,
                resume: str | os.PathLike | None = None,
                checkpoint: str | os.PathLike | None = None,
                overwrite: bool = False,
                inputs: dict | None = None,
                input_paths: str = "relative",
                device: torch.device | str | None = None,
                dist: Distributed | None = None,
                importable: bool = True,
                hooks: Hooks | None = None,
                teacher: LoadedVAE | None = None,
                settings: dict | None = None) -> SessionResult:
    """Fine-tune a copy of ``vae`` on ``data`` with ``cfg`` (see the module's docstring).

    general: other images, scored beside the validation patches as ``gen_*`` (does the fine-tune harm them?).
    run_dir: the run's folder (config.json, metrics.jsonl, previews/, checkpoints/); made when
        missing. An existing one is used only to continue it (``resume``), or with ``overwrite``.
    resume: a checkpoint file, or a run folder (its newest checkpoint; it becomes ``run_dir`` when
        none is given). Refused before anything is written when it does not fit this run.
    checkpoint: without a run folder, a checkpoint file written every ``cfg.checkpoint_every`` steps /
        ``cfg.checkpoint_minutes``, at the end and when stopped (None: no checkpoints).
    overwrite: the user allows replacing a run folder or checkpoint file that holds something else.
    inputs / input_paths: what config.json records as the run's inputs ({"vae": ..., "data": ...}):
        file paths written relative to the run folder ("relative"), or ComfyUI names ("comfyui").
    dist: torchrun's view of this process (its process group already initialised).
    importable: whether a fresh interpreter can import this package by its module name (False in
        ComfyUI: loader workers then start by fork, or patches load in the main process).
    teacher: distil (:mod:`training.distil`): ``vae`` is a student with the teacher's encoder, and learns the
        teacher's decode of its latents; the export's probe is the teacher's.
    settings: more settings for config.json beside the data's and ``cfg``'s (distil's).
    """
    hooks = hooks or Hooks()
    if cfg.recipe.startswith("distil-") and teacher is None:
        raise VAEFTError(f"recipe {cfg.recipe!r} is distil's (python -m training distil, the VAE Distil Decoder node): "
                         "a fine-tune has no teacher to learn from; choose sd-vae-ft-mse or another fine-tune recipe")
    if cfg.image_weight and teacher is None:
        raise VAEFTError("image_weight weighs the images beside a teacher's decode (distil); a fine-tune learns the "
                         "images themselves: leave it at 0")
    dist = dist or Distributed()
    device = torch.device(device) if device is not None else pick_device(None, dist)
    note = hooks.note or (lambda text: None)
    warn = hooks.warn or note
    # patches as the VAE takes them: RGB, or RGBA (straight alpha; images without one opaque)
    data = data.for_channels(image_channels(vae.model))
    general = general.for_channels(data.channels) if general is not None else None

    # 1. every check before any file changes (an existing run folder is locked first: one writer)
    ckpt, run_dir, checkpoints, lock = _checked_start(vae, data, cfg, resume=resume, run_dir=run_dir,
                                                      checkpoint=checkpoint, overwrite=overwrite, dist=dist)
    run_id = checkpoints.run_id if checkpoints is not None else None  # claimed: the resumed run's, or a new one
    folder = run_dir is not None and dist.is_main
    with _released_on_error(lock):  # (until step 3's run folder holds it)
        lpips_net = load_lpips(cfg.lpips_net, cfg.lpips_backbone) if cfg.lpips_weight > 0 else None

        # 2. the patches the run watches
        cfg, val, general_batch, preview = _watched_patches(data, general, cfg, dist, note=note, warn=warn,
                                                            previews=folder or hooks.preview is not None)

    # 3. the run folder (it holds the lock from here until run.close())
    start = int(ckpt["step"]) if ckpt is not None else 0
    run = _open_run(run_dir, ckpt, lock, overwrite=overwrite, warn=warn, inputs=inputs or {},
                    settings={**dataclasses.asdict(data.cfg), **dataclasses.asdict(cfg), **(settings or {})},
                    input_paths=input_paths,
                    base_sha256=vae.layout.base_sha256 if vae.layout.from_file else None,
                    images={"channels": data.channels, "alpha": data.summary()["alpha"]}) if folder else None
    # 4. training
    try:
        status = RunStatus(cfg.steps, start, read_metrics(run.path) if run is not None and ckpt is not None else None)
        loop = fine_tune(vae, _batches(data, cfg, device, dist, importable, warn), cfg, device=device,
                         lpips_net=lpips_net, augment=augmenter(data.cfg), val_batch=val, general_batch=general_batch,
                         preview_batch=preview, callbacks=_callbacks(hooks, run, status), resume=ckpt,
                         checkpoints=checkpoints, dist=dist, data_signature=data.order_signature(), run_id=run_id,
                         teacher=teacher.model if teacher is not None else None)
    finally:
        if run is not None:
            run.close()
    run_path = run.path if run is not None else None
    stopped = loop.stopped_early or bool(hooks.should_stop and hooks.should_stop())  # also: asked once it ended
    if stopped or not dist.is_main:
        return SessionResult(None, loop, run_path, stopped)

    # 5. what the export needs
    loop.model.to("cpu")  # the probe runs the base VAE on the device: make room for it first
    probe = make_probe(teacher or vae, data, seed=cfg.seed, device=device)
    return SessionResult(trained_result(vae, loop, probe=probe, dataset=data.summary()), loop, run_path, False)


def trained_result(vae: LoadedVAE, loop: LoopResult, *, probe=None, dataset: dict | None = None) -> Trained:
    """The :class:`Trained` result of a finished loop over ``vae`` (with the export's ``probe`` and the
    training data's ``dataset`` summary when there are any)."""
    return Trained(model=loop.model, layout=vae.layout, config=loop.config, history=loop.history,
                   steps_done=loop.steps_done, base_frozen_sha256=loop.base_frozen_sha256, stopped_early=loop.stopped_early,
                   used_ema=loop.used_ema, best_step=loop.best_step, precision=loop.precision,
                   seconds=loop.seconds, probe=probe, dataset=dataset, fp16_fix=loop.fp16_fix)


def _checked_start(vae: LoadedVAE, data: PatchDataset, cfg: TrainConfig, *, resume, run_dir, checkpoint,
                   overwrite: bool, dist: Distributed
                   ) -> tuple[dict | None, str | None, Checkpoints | None, FolderLock | None]:
    """Step 1 of :func:`run_session`, reading but never writing: an existing run folder locked (a second
    writer refused), the resumed checkpoint checked against this run (a run folder as ``resume``
    becomes ``run_dir``), the run folder, and the checkpoints' place claimed for this run. Returns
    (the checkpoint, the run folder, where checkpoints go, the lock held). A refusal lets go of the
    lock and leaves the folder as it was."""
    vae.family.check_config(cfg)
    check_patch_side(vae.model, data.cfg.patch_size)
    sizes = [(p.numel(), trained(k, cfg.trainable, vae.family)) for k, p in vae.model.named_parameters()]
    check_preset_holds(cfg, sum(n for n, t in sizes if t), sum(n for n, t in sizes if not t),
                       f"this {vae.family.short} VAE ({sum(n for n, _ in sizes) / 1e6:.0f} M parameters, "
                       f"{'decoder' if cfg.trainable == 'decoder' else 'all'} trained)")
    if resume is not None and run_dir is None and os.path.isdir(resume):
        run_dir = resume  # a run folder continues writing into itself
    lock = FolderLock.acquire(run_dir) if run_dir is not None and dist.is_main and os.path.isdir(run_dir) else None
    with _released_on_error(lock):
        ckpt = None
        if resume is not None:
            point = resume_point(resume)
            try:
                ckpt = load_checkpoint(point, vae.layout, cfg, trainable_shapes(vae.model, cfg.trainable),
                                       dist.world_size, data.order_signature())
            except DamagedCheckpoint as e:
                raise (explain_damaged(e, point) if os.path.isdir(resume) else
                       VAEFTError(f"{e}. Resume from an earlier checkpoint of the run if you have one, or start it "
                                  "again")) from None
        if run_dir is not None and dist.is_main:
            RunFolder.check(run_dir, resume=ckpt is not None, overwrite=overwrite)
        checkpoints = _checkpoints(run_dir, checkpoint, cfg, overwrite)
        if checkpoints is not None and dist.is_main:
            run_id = (ckpt.get("run_id") if ckpt is not None else None) or uuid.uuid4().hex
            checkpoints.claim(run_id, resumed_from=ckpt["path"] if ckpt is not None else None)
    return ckpt, run_dir, checkpoints, lock


def _open_run(run_dir: str, ckpt: dict | None, lock: FolderLock | None, *, overwrite: bool, warn, inputs: dict,
              settings: dict, input_paths: str, base_sha256: str, images: dict | None = None) -> RunFolder:
    """Step 3 of :func:`run_session`: the run folder opened (holding its lock until closed), config.json
    written, and on resume metrics.jsonl cut back to the checkpoint's step (a torn line set aside)."""
    with _released_on_error(lock):
        run = RunFolder.create(run_dir, resume=ckpt is not None, overwrite=overwrite, warn=warn, lock=lock)
    try:
        run.write_config(inputs, settings, paths=input_paths, base_sha256=base_sha256, images=images)
        if ckpt is not None:
            aside = run.rewind(int(ckpt["step"]))
            if aside:
                warn(f"metrics.jsonl ended in a line cut off by a crash; it was set aside in {aside!r} and the log "
                     f"continues from step {ckpt['step']}")
    except BaseException:
        run.close()
        raise
    return run


@contextmanager
def _released_on_error(lock: FolderLock | None):
    """Lets go of ``lock`` (forgetting it: the folder is left as it was) when the block raises anything,
    a Ctrl-C included, and raises it on; the lock stays held when the block ends normally."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release(forget=True)
        raise


def _checkpoints(run_dir, checkpoint, cfg: TrainConfig, overwrite: bool) -> Checkpoints | None:
    """Where checkpoints go: the run folder's checkpoints/, or without one the ``checkpoint`` file, or nowhere."""
    if run_dir is not None:
        return RunFolder.checkpoints(run_dir, cfg, overwrite=overwrite)
    if checkpoint is not None:
        return Checkpoints(checkpoint, every_steps=cfg.checkpoint_every, every_minutes=cfg.checkpoint_minutes,
                           overwrite=overwrite)
    return None


def _describe(data: PatchDataset, note: Callable[[str], None]) -> None:
    summary = data.summary()
    note(f"data: {len(summary.get('images_used', []))} images used, {len(summary.get('images_skipped', []))} "
         f"skipped; train {summary.get('train_images')}, validation {summary.get('val_images')}")
    for item in summary.get("images_skipped", []):
        note(f"  skipped {item['path']}: {item['reason']}")
    if data.alpha_note():  # once per run: an RGBA VAE's opaque RGB images, an RGB VAE's composited RGBA ones
        note(f"alpha: {data.alpha_note()}")


def _watched_patches(data: PatchDataset, general: PatchDataset | None, cfg: TrainConfig, dist: Distributed, *,
                     previews: bool, note: Callable[[str], None], warn: Callable[[str], None]
                     ) -> tuple[TrainConfig, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Step 2 of :func:`run_session`: the data described to the user, then the patches the run watches:
    held-out validation patches (off, with a warning, when the dataset has none), the optional general
    images' patches, and fixed preview patches when someone looks at them (``previews``: a run folder or
    a preview hook). Returns (the config to train with, checked against the processes, the validation,
    general and preview patches)."""
    _describe(data, note)
    val, cfg, why = validation_patches(data, cfg)
    if why:
        warn(why)
    cfg = check_run(cfg, dist, val)
    general_batch = evaluation_patches(general, cfg.val_patches, cfg.seed, use_validation=False)[0] \
        if general is not None and cfg.val_every else None
    watched = dist.is_main and cfg.preview_every and previews
    preview = preview_patches(data, 4, seed=cfg.seed) if watched else None
    return cfg, val, general_batch, preview


def validation_patches(data: PatchDataset, cfg: TrainConfig) -> tuple[torch.Tensor | None, TrainConfig, str | None]:
    """Held-out patches for ``cfg.val_every``, the config to train with, and a note for the user.
    Without held-out images validation is switched off with a note, unless a setting needs it (export_best,
    stop_when_safe): then the refusal names the setting, the cause and the fix."""
    if not cfg.val_every:
        return None, cfg, None
    if not data.summary().get("val_images"):
        note = f"the dataset has no held-out images ({data.summary().get('validation')})"
        if not (cfg.export_best or cfg.stop_when_safe):
            return None, cfg.replace(val_every=0), f"validation is off: {note}; add images or raise val_fraction"
        needs = "export_best" if cfg.export_best else "stop_when_safe"
        raise VAEFTError(f"{needs} needs validation on held-out patches, but {note}: no validation images. Add "
                         "images or raise val_fraction (validation is split by image)")
    return data.val_patches(cfg.val_patches, seed=cfg.seed), cfg, None


def _batches(data: PatchDataset, cfg: TrainConfig, device: torch.device, dist: Distributed, importable: bool,
             warn: Callable[[str], None]):
    """The loop's batches: ``start_step -> iterator`` of this process's share of each step, with
    patch ids (the latent cache's keys)."""
    local = cfg.batch_size // dist.world_size if cfg.batch_size % dist.world_size == 0 else cfg.batch_size
    workers, method = data.cfg.num_workers, None
    if workers and not importable:
        method = worker_start_method(importable=False)
        if method is None:
            warn(f"num_workers={workers} needs the 'fork' start method, which this platform lacks here; "
                 "loading patches in the main process")
            workers = 0
    return lambda start: data.train_batches(local, start_batch=start, rank=dist.rank, world_size=dist.world_size,
                                            pin_memory=device.type == "cuda", with_keys=True, num_workers=workers,
                                            start_method=method)


def _callbacks(hooks: Hooks, run: RunFolder | None, status: RunStatus) -> Callbacks:
    """The loop's callbacks: history lines to the run folder and the status, then to the hooks."""

    def on_step(step, total, losses):
        status.step = step
        if hooks.step:
            hooks.step(status)

    def on_log(line):
        status.update(line)
        if run is not None:
            run.log(line)
        if hooks.log:
            hooks.log(line, status)

    def on_preview(step, images):
        if run is not None:
            run.preview(step, images)
        if hooks.preview:
            hooks.preview(step, images)

    return Callbacks(on_step=on_step, on_log=on_log, on_preview=on_preview, on_checkpoint=hooks.checkpoint,
                     should_stop=hooks.should_stop)
