"""distil: a faster student decoder learns a teacher VAE's decode on the user's own patches (issue 30).

The same session as a fine-tune (:func:`training.session.run_session`: data, validation, run folder, checkpoints,
resume, progress, stop), with a student (:mod:`training.students`) in place of the base and the teacher's decode of
the teacher's own latents as the target. Then the figures users decide by, on held-out patches: the student against
the teacher's decode and against the images, and decode time against the teacher at the user's resolution. A narrow
student exports as a VAE file in the teacher's layout (:func:`training.export.export_vae`); a tiny one as the
decoder (and encoder) files ComfyUI's previews and Load VAE read from ``models/vae_approx``
(:func:`export_tiny`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors import safe_open

from .config import DistilConfig, TrainConfig
from .data import PatchDataset
from .errors import VAEFTError
from .export import ExportReport, export_vae, safe_name, write_safetensors
from .files import json_safe
from .losses import load_lpips
from .metrics import validation_scores
from .device import pick_device
from .probe import latent_statistics, stats_patches
from .runs import MARKER, read_config
from .session import SessionResult, run_session
from .students import TinyStudent, check_student, decoder_widths, narrow_student, tiny_files, tiny_spec, tiny_student
from .vae import LoadedVAE, latent_channels, pixels_per_latent

# ComfyUI's model file extensions (folder_paths.supported_pt_extensions): the files its lists may show
COMFY_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


@dataclass
class DistilResult:
    """What :func:`run_distil` did: the session, the student trained, and (a finished run) its figures."""

    session: SessionResult
    student: LoadedVAE
    teacher: LoadedVAE
    dcfg: DistilConfig
    spec: dict | None = None        # tiny: {"name", "scale", "shift", "channels", "latent_family", "why"}
    figures: dict = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return self.session.stopped

    def lines(self) -> list[str]:
        """The figures in words, for the CLI and the node's status."""
        f = self.figures
        if not f:
            return []
        where = f"{f['patches']} {'held-out' if f['held_out'] else 'training'} patches of {f['side']}²"
        out = [f"student {f['student']} against the teacher's decode on {where}: PSNR {f['teacher_psnr']:.2f} dB"
               + (f", LPIPS {f['teacher_lpips']:.4f}" if "teacher_lpips" in f else "")]
        out.append(f"against the images: student PSNR {f['psnr']:.2f} dB, teacher {f['teacher_own_psnr']:.2f} dB"
                   + (f"; LPIPS {f['lpips']:.4f} vs {f['teacher_own_lpips']:.4f}" if "lpips" in f else ""))
        t = f["decode"]
        out.append(f"decode of one {t['side']}² image on {t['device']}: teacher {t['teacher_s'] * 1000:.1f} ms, student "
                   f"{t['student_s'] * 1000:.1f} ms ("
                   + (f"{t['speedup']:.2f}× faster" if t["speedup"] >= 1 else f"{1 / t['speedup']:.2f}× SLOWER")
                   + f"; median of {t['repeats']})")
        return out


def check_distil(teacher: LoadedVAE, cfg: TrainConfig, dcfg: DistilConfig) -> None:
    """Refuse, before anything is written, settings distil cannot train with and a teacher it cannot distil."""
    if not isinstance(teacher, LoadedVAE):
        raise VAEFTError(f"the teacher must be a VAE loaded by the library; got {type(teacher).__name__}")
    if cfg.trainable != "decoder":
        raise VAEFTError("distil trains a decoder (trainable 'decoder'): the student keeps the teacher's encoder, "
                         "so that its latents stay the teacher's")
    fix = [n for n, on in (("target 'base'", cfg.target == "base"), ("act_weight", cfg.act_weight > 0),
                           ("exact_rescale", cfg.exact_rescale), ("stop_when_safe", cfg.stop_when_safe)) if on]
    if fix:
        raise VAEFTError(f"{', '.join(fix)}: the fp16-fix settings do not apply to distil (its target is already the "
                         "teacher's decode); make the teacher fp16-safe first with the fp16-fix recipe, then distil it")
    if cfg.latent_weight:
        raise VAEFTError("latent_weight applies when the encoder trains; distil keeps the teacher's encoder")
    if dcfg.student == "tiny" and cfg.gan_weight > 0:
        raise VAEFTError("gan_weight: the GAN term is not available for a tiny student (its adaptive weight needs the "
                         "family decoder's last layer); set gan_weight to 0")
    if dcfg.student == "tiny" and cfg.grad_checkpointing:
        raise VAEFTError("grad_checkpointing is for the family decoders; a tiny student needs little memory: turn it off")
    if dcfg.student == "narrow" and dcfg.with_encoder:
        raise VAEFTError("with_encoder is for a tiny student; a narrow one keeps the teacher's encoder")


def make_student(teacher: LoadedVAE, dcfg: DistilConfig, data: PatchDataset | None = None, family: str = "auto",
                 seed: int = 0) -> tuple[LoadedVAE, dict | None]:
    """The student ``dcfg`` asks for, and for a tiny one its spec (the latent family: ``family``, or with 'auto' the
    base file's name, else the teacher's latent statistics on a few of ``data``'s training patches)."""
    if dcfg.student == "narrow":
        return narrow_student(teacher, dcfg.width), None
    stats = None
    if family == "auto" and data is not None and teacher.family.tiny is not None:
        patches = next(iter(data.train_batches(4, start_batch=0, num_workers=0)))
        stats = latent_statistics(teacher.model, stats_patches(patches.float(), "cpu"), "cpu", seed)
    spec = tiny_spec(teacher, family, stats)
    return tiny_student(teacher, spec, dcfg.with_encoder, seed=seed), spec


def run_distil(teacher: LoadedVAE, data: PatchDataset, cfg: TrainConfig, dcfg: DistilConfig, *,
               family: str = "auto", time_side: int | None = None, device: torch.device | str | None = None,
               before_training: Callable[[LoadedVAE, dict | None], None] | None = None, **session) -> DistilResult:
    """Distil ``teacher``'s decoder into the student ``dcfg`` names, on ``data`` with ``cfg`` (recipe distil-narrow /
    distil-tiny), through :func:`training.session.run_session` (``session``: its run_dir, resume, checkpoint,
    overwrite, inputs, dist, hooks, ...). ``family``: a tiny decoder's latent family (see :func:`make_student`).
    ``time_side``: the side of the image the decode is timed at (default the patch size). ``before_training(student,
    spec)``: the caller's last checks once the student is known (a tiny decoder's file names), before anything is
    written."""
    check_distil(teacher, cfg, dcfg)
    teacher.family.check_config(cfg)
    check_student(teacher, dcfg.student, dcfg.width, family)
    time_side = time_side or data.cfg.patch_size
    recorded = _check_resumed_student(session.get("resume"), dcfg)
    student, spec = make_student(teacher, dcfg, data, family, cfg.seed)
    _check_sides(student, data.cfg.patch_size, time_side)
    if spec and recorded and recorded.get("tiny") and recorded["tiny"]["name"] != spec["name"]:
        raise VAEFTError(f"run folder {os.fspath(session['resume'])!r} distils a {recorded['tiny']['name']} decoder "
                         f"({recorded['tiny']['latent_family']} latents); this run would make a {spec['name']} one: "
                         f"continue it with family {recorded['tiny']['latent_family']}, or start a new run folder")
    if before_training is not None:
        before_training(student, spec)
    settings = {"distil": {**{k: getattr(dcfg, k) for k in ("student", "width", "with_encoder")},
                           "teacher": teacher.layout.base_name, "teacher_sha256": teacher.layout.base_sha256,
                           **({"tiny": spec} if spec else {})}}
    result = DistilResult(run_session(student, data, cfg, teacher=teacher, settings=settings, device=device, **session),
                          student, teacher, dcfg, spec)
    trained = result.session.trained
    if trained is not None:
        result.student = LoadedVAE(trained.model, student.layout)
        device = torch.device(device) if device is not None else pick_device(None, session.get("dist"))
        result.figures = distil_figures(teacher, trained.model, trained.probe.patches, trained.config, dcfg,
                                        held_out=trained.probe.held_out, device=device, time_side=time_side)
    return result


def _check_sides(student: LoadedVAE, patch: int, time_side: int) -> None:
    """Refuse a patch or timing side the student cannot decode back to itself: a multiple of its pixels per latent
    as its decoder gets them (a Flux.2 tiny decoder: 16, its 2x2-patchified latents)."""
    unit = pixels_per_latent(student.model)
    if isinstance(student.model, TinyStudent):
        z = torch.zeros(1, latent_channels(student.model), 2, 2)
        unit *= 2 // int(student.model.vaeft_family.held_latent(student.model.teacher, z).shape[-1])
    for what, side in (("patch_size", patch), ("the timing side (--time-size)", time_side)):
        if side < unit or side % unit:
            raise VAEFTError(f"{what} {side} is not a multiple of {unit}: this student decodes one latent into "
                             f"{unit}x{unit} pixels; use {max(unit, side // unit * unit)} or {(side // unit + 1) * unit}")


def _check_resumed_student(resume, dcfg: DistilConfig) -> dict | None:
    """A run folder continues only the student it trains (its config.json says which): refused by name otherwise.
    Returns what the run folder recorded of the student (None: nothing to compare, a checkpoint file)."""
    if not resume or not os.path.isfile(os.path.join(os.fspath(resume), MARKER)):
        return None  # a checkpoint file: its tensors' names and shapes are checked against the student's
    recorded = (read_config(resume).get("settings") or {}).get("distil")
    if not recorded:
        raise VAEFTError(f"run folder {os.fspath(resume)!r} is a fine-tune's, not a distil run: continue it with fit "
                         "(VAE Fine-tune), or distil into a new run folder")
    was = DistilConfig(**{k: recorded[k] for k in ("student", "width", "with_encoder") if k in recorded})
    if was.label != dcfg.label:
        raise VAEFTError(f"run folder {os.fspath(resume)!r} distils {was.label}, not {dcfg.label}: continue it as "
                         f"student {was.student}" + (f", width {was.width}" if was.student == "narrow" else "")
                         + (", with encoder" if was.with_encoder else "") + " (--student "
                         + was.student + (f" --width {was.width}" if was.student == "narrow" else "")
                         + (" --with-encoder" if was.with_encoder else "") + " on the command line), or start a "
                         "new run folder")
    return recorded


@torch.no_grad()
def distil_figures(teacher: LoadedVAE, student: torch.nn.Module, patches: torch.Tensor, cfg: TrainConfig,
                   dcfg: DistilConfig, *, held_out: bool, device, time_side: int) -> dict:
    """The student on ``patches`` (BCHW in [-1, 1]) against the teacher's decode and the images (the teacher's own
    error beside it), and the decode time of one ``time_side``² image, teacher against student."""
    lpips_net = load_lpips(cfg.lpips_net, cfg.lpips_backbone) if cfg.lpips_weight > 0 else None
    if lpips_net is not None:
        lpips_net = lpips_net.to(device)
    off = contextlib.nullcontext()
    was = next(teacher.model.parameters()).device
    try:
        mine = validation_scores(student.to(device), patches, device, off, lpips_net, teacher=teacher.model.to(device))
        own = validation_scores(teacher.model, patches, device, off, lpips_net)
        decode = teacher_against_student(teacher.model, student, time_side, device)
    finally:
        teacher.model.to(was)  # the caller's teacher where it was (the student stays on the device)
    figures = {"student": dcfg.label, "patches": int(patches.shape[0]), "side": int(patches.shape[-1]),
               "held_out": held_out, **{k: round(v, 6) for k, v in mine.items()},
               **{f"teacher_own_{k}": round(v, 6) for k, v in own.items()}}
    figures["decode"] = decode
    return figures


def decode_times(models: dict[str, torch.nn.Module], side: int, device, repeats: int = 3, warmup: int = 1,
                 dtype: torch.dtype = torch.float32) -> dict[str, list[float]]:
    """{name: seconds of each timed decode} of one ``side``² image by each of ``models`` (the first one's latent
    shape, a fixed standard-normal draw in ``dtype``): ``warmup`` rounds untimed, then ``repeats``, the models
    interleaved in every round so that all see the same machine (CUDA: bracketed by synchronize)."""
    from .vae import latent_channels, pixels_per_latent  # (the first model's latent shape, as the library reads it)

    device = torch.device(device)
    first = next(iter(models.values()))
    down = pixels_per_latent(first)
    z = torch.randn(1, latent_channels(first), side // down, side // down,
                    generator=torch.Generator().manual_seed(0)).to(device, dtype)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model.decode(z)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times


def teacher_against_student(teacher: torch.nn.Module, student: torch.nn.Module, side: int, device,
                            repeats: int = 3) -> dict:
    """The decode times' medians (:func:`decode_times`), teacher and student, and the speedup."""
    times = decode_times({"teacher": teacher, "student": student}, side, device, repeats)
    t, s = statistics.median(times["teacher"]), statistics.median(times["student"])
    return {"side": side, "device": str(device), "teacher_s": round(t, 5), "student_s": round(s, 5),
            "speedup": round(t / s, 3), "repeats": repeats}


def distil_metadata(result: DistilResult) -> dict[str, str]:
    """``vaeft.distil.*``: what the student is, what it was distilled from, and its figures."""
    meta = {"vaeft.distil.student": result.dcfg.label, "vaeft.distil.teacher": result.teacher.layout.base_name,
            "vaeft.distil.teacher_sha256": result.teacher.layout.base_sha256,
            "vaeft.distil.figures": json.dumps(json_safe(result.figures), sort_keys=True)}
    if result.spec:
        meta["vaeft.distil.latents"] = json.dumps({k: result.spec[k] for k in ("name", "latent_family", "scale", "shift")})
    return meta


def export_narrow(result: DistilResult, path: str | os.PathLike, **kw) -> ExportReport:
    """Write a narrow student as a VAE file in the teacher's layout (see :func:`training.export.export_vae`)."""
    trained = result.session.trained
    if trained is None or result.dcfg.student != "narrow":
        raise VAEFTError("export_narrow needs a finished narrow distil run")
    notes = [f"a narrow decoder (widths {decoder_widths(trained.model)}; the teacher's "
             f"{decoder_widths(result.teacher.model)}): "
             f"ComfyUI's Load VAE reads it; {trained.layout.family.narrow_loaders}"] + result.lines()
    return export_vae(trained, path, metadata=distil_metadata(result), extra_notes=notes, **kw)


def tiny_names(spec: dict, name: str, with_encoder: bool) -> dict[str, str]:
    """{"decoder": file name, "encoder": ...}: ``<taesd>_decoder.ft-<name>.safetensors``. Load VAE pairs the first
    ``<taesd>_encoder.*`` and ``<taesd>_decoder.*`` of models/vae_approx (sorted by name) and previews use the first
    file starting with ``<taesd>_decoder``: '.ft-' sorts before the stock files' '.pth' / '.safetensors'."""
    stem = safe_name(name)
    return {part: f"{spec['name']}_{part}.ft-{stem}.safetensors"
            for part in (("decoder", "encoder") if with_encoder else ("decoder",))}


def check_tiny_out(folder: str, names: dict[str, str], overwrite: bool, own: dict | None = None) -> None:
    """Refuse, before training, a folder that is not one and files there that are not to be replaced: any existing
    one without ``overwrite``, except (``own``: {"teacher_sha256", "student"}) a file of the same teacher and student
    (its ``vaeft.distil.*`` metadata says so), which a continued run replaces."""
    if not os.path.isdir(folder):
        raise VAEFTError(f"the tiny decoder's folder {folder!r} does not exist: give ComfyUI's models/vae_approx (or "
                         "another existing folder)")
    for n in names.values():
        path = os.path.join(folder, n)
        if os.path.lexists(path) and not overwrite and not (own is not None and _distilled_as(path, own)):
            raise VAEFTError(f"{path!r} already exists; choose another name (the command line's --overwrite replaces "
                             "it; move it away to keep it)")


def own_files(teacher: LoadedVAE, dcfg: DistilConfig) -> dict:
    """What marks a tiny student's files as this teacher's and student's (see :func:`check_tiny_out`)."""
    return {"teacher_sha256": teacher.layout.base_sha256, "student": dcfg.label}


def _distilled_as(path: str, own: dict) -> bool:
    """Whether ``path`` is a tiny student's file of ``own``'s teacher and student (its metadata)."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable or not a safetensors file: not ours to replace
        return False
    return (meta.get("vaeft.distil.teacher_sha256") == own["teacher_sha256"]
            and meta.get("vaeft.distil.student") == own["student"])


def export_tiny(result: DistilResult, folder: str | os.PathLike, name: str, overwrite: bool = False,
                replace_own: bool = False) -> dict:
    """Write a tiny student's decoder (and encoder) into ``folder`` (ComfyUI's models/vae_approx) under
    :func:`tiny_names`; ``replace_own``: a file of the same teacher and student may be replaced (a continued run's,
    see :func:`check_tiny_out`). Returns {"files": [paths], "text": what was written and how ComfyUI uses it}."""
    trained = result.session.trained
    if trained is None or not isinstance(trained.model, TinyStudent):
        raise VAEFTError("export_tiny needs a finished tiny distil run")
    folder = os.fspath(folder)
    names = tiny_names(result.spec, name, result.dcfg.with_encoder)
    own = own_files(result.teacher, result.dcfg) if replace_own else None
    check_tiny_out(folder, names, overwrite, own)
    meta = {"format": "pt", **distil_metadata(result)}
    files = tiny_files(LoadedVAE(trained.model, trained.layout))
    written = [write_safetensors(files[part], os.path.join(folder, n), metadata=meta,
                                 overwrite=overwrite or own is not None) for part, n in names.items()]
    return {"files": written, "text": "\n".join([f"saved {p}" for p in written] + tiny_usage(result.spec, folder, names)
                                                 + result.lines())}


def tiny_usage(spec: dict, folder: str, names: dict[str, str]) -> list[str]:
    """How ComfyUI uses the files, which file it picks first now, and how to switch back."""
    tae = spec["name"]
    listed = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in COMFY_EXTENSIONS) \
        if os.path.isdir(folder) else []
    first = next((f for f in listed if f.startswith(f"{tae}_decoder")), None)
    lines = [f"latents: {spec['latent_family']} ({spec['why']}): the decoder is fed (latent - {spec['shift']}) × "
             f"{spec['scale']}, as ComfyUI's previews and Load VAE's {tae} feed it",
             f"previews: start ComfyUI with --preview-method taesd (or pick TAESD in its settings); for "
             f"{spec['latent_family']} models it uses the first file in {folder} whose name starts with "
             f"'{tae}_decoder'"]
    if first == names["decoder"]:
        lines.append(f"that is {first} now (it sorts before the stock {tae}_decoder.safetensors / .pth); to switch back, "
                     f"move {first} out of the folder")
    else:
        lines.append(f"WARNING: that is {first} now, not {names['decoder']}: rename or move {first} to use this one")
    if "encoder" in names:
        lines.append(f"Load VAE lists '{tae}' (the first {tae}_encoder.* with the first {tae}_decoder.*): the tiny pair "
                     "as a VAE for quick encode/decode")
    else:
        lines.append(f"Load VAE's '{tae}' entry, when you have a stock {tae}_encoder.*, now pairs it with this decoder "
                     "(the first of each, by name)")
    return lines
