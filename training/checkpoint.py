"""Checkpoints, in one place: what one holds (:func:`checkpoint_state`), how it is checked against a
run and restored into it (:func:`load_checkpoint`, :func:`restore_checkpoint`), and the files
themselves, written atomically with a digest of their tensors and the identity of the run that wrote
them. Which checkpoint a run folder resumes from is :mod:`training.runs`' answer (it owns the folder).

- Every tensor is kept by name: the trained parameters, their EMA and export_best's pick by
  parameter name, the optimizer's state by parameter name (not by torch's positional index), the
  discriminator by its state-dict names. A resume checks the key set and the shapes and refuses a
  mismatch, naming the first differing key; nothing is restored by position.
- What a run did before its first step and a resumed run does not redo is kept by name too: the
  fp16-fix settings' record (``fp16_fix``: the exact rescaling's report, for the export's report and
  metadata); a checkpoint written before it was kept resumes with that record unknown.

- A damaged file (truncated, bits flipped, a block zeroed) is refused on reading: the digest of
  its tensors no longer matches the one written with them.
- A file is only ever replaced by the run that wrote it (same ``run_id``), or when the user
  asks (``overwrite``): a fresh run never writes over an unfinished run's checkpoint or over any
  other file (:meth:`Checkpoints.claim`, called before the first training step).
- :class:`Checkpoints` says where (one file replaced at each write, or a folder of numbered
  files of which the newest few are kept) and when (every N steps, every M minutes, at the end,
  and when the run is stopped).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time

import torch

from .config import TrainConfig
from .errors import VAEFTError
from .files import atomic_write, check_folder
from .fp16fix import UNKNOWN
from .tensors import sha256
from .vae import FileLayout

CHECKPOINT_FORMAT = "vaeft-checkpoint-3"
# Earlier formats, refused by name with what to do: 2 (version 0.1.0) kept tensors in positional lists.
_OLD_FORMATS = {"vaeft-checkpoint-2": "0.1.0"}
_STEP_FILE = re.compile(r"^step-(\d{7,})\.ckpt$")
# Fields a resumed run must share with the run that wrote the checkpoint (steps may grow).
RESUME_MUST_MATCH = ("recipe", "lr", "batch_size", "mse_weight", "l1_weight", "lpips_weight", "kl_weight",
                     "gan_weight", "disc_start", "latent_weight", "lpips_net", "trainable", "ema", "ema_decay",
                     "weight_decay", "warmup_steps", "lr_schedule", "grad_clip", "posterior", "seed",
                     "target", "act_weight", "act_threshold", "latent_noise", "image_weight")
# a setting newer than a checkpoint is compared at its default (what that checkpoint's run trained with)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def write_checkpoint(path: str | os.PathLike, state: dict, *, overwrite: bool) -> str:
    """Write ``state`` (with its tensors' digest added) to ``path`` atomically: a crash or a full
    disk leaves the previous file whole. OS errors become a VAEFTError naming the path."""
    body = {k: v for k, v in state.items() if k != "digest"}
    body["digest"] = sha256(body)

    def save(f) -> None:
        try:
            torch.save(body, f)
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            full = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < 64 * 2**20
            raise OSError(errno.ENOSPC if full else errno.EIO, f"writing the checkpoint failed ({str(e)[:200]})") \
                from None

    return atomic_write(path, save, overwrite=overwrite, what="checkpoint")


class DamagedCheckpoint(VAEFTError):
    """A checkpoint file that cannot be read whole (truncated, corrupt, its digest wrong)."""


def _first_line(text: str, limit: int = 300) -> str:
    """A library's error, short: its first line, cut at a word under ``limit`` characters ("…" where cut)."""
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " …"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint of this tool and verify its digest; refuse anything else with the reason.
    The file is only read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VAEFTError(f"resume checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise VAEFTError(f"resume checkpoint {path!r} is not a file (a folder or a device); give a .ckpt file")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would treat a *.safetensors name as safetensors
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign file: same answer
        raise DamagedCheckpoint(f"resume checkpoint {path!r} is unreadable or corrupt: {_first_line(str(e))}") from None
    old = _OLD_FORMATS.get(state.get("format")) if isinstance(state, dict) else None
    if old:
        raise VAEFTError(f"resume checkpoint {path!r} was written by version {old} of this tool, which kept weights "
                         "by position; this version keeps them by name and cannot continue it safely. Finish that "
                         f"run with version {old}, or start it again as a new run (the file was not changed)")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VAEFTError(f"{path!r} is not a checkpoint written by this tool ({CHECKPOINT_FORMAT})")
    if state.get("digest") != sha256({k: v for k, v in state.items() if k != "digest"}):
        raise DamagedCheckpoint(f"resume checkpoint {path!r} is damaged: its tensors do not match the digest written "
                                "with them (a disk or copy error); this file was not changed")
    return state


def peek(path: str | os.PathLike) -> dict | None:
    """Who wrote the file at ``path``: {"run_id", "step", "steps"} for a checkpoint of this tool,
    None for anything else (no digest check)."""
    try:
        with open(os.fspath(path), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours, whatever it is
        return None
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("vaeft-checkpoint"):
        return None
    return {"run_id": state.get("run_id"), "step": state.get("step"),
            "steps": (state.get("config") or {}).get("steps")}


class Checkpoints:
    """Where and when one run writes checkpoints.

    target: a file, replaced at each write; or, with ``folder=True``, a folder of
        ``step-NNNNNNN.ckpt`` files of which the newest ``keep`` are kept.
    every_steps / every_minutes: write when either interval has passed (0 = not by that
        measure); the last step is always written, and so is the step reached when the run
        is stopped (:meth:`due` with ``final``).
    overwrite: the user allows replacing a file at ``target`` that another run wrote.
    """

    def __init__(self, target: str | os.PathLike, *, every_steps: int = 0, every_minutes: float = 0.0,
                 keep: int = 3, folder: bool = False, overwrite: bool = False):
        self.target, self.folder = os.fspath(target), folder
        self.every_steps, self.every_minutes, self.keep = every_steps, every_minutes, max(1, keep)
        self.overwrite = overwrite
        self.run_id: str | None = None
        self.last_step, self.last_time = -1, time.monotonic()
        self.written: list[str] = []

    # ----- before the first step

    def claim(self, run_id: str, resumed_from: str | None = None) -> None:
        """Check that this run may write at ``target`` before any training happens: refuse with
        what to do when a file there belongs to another run (or is not a checkpoint at all).
        ``resumed_from``: the checkpoint this run continues, already read and checked (it is this
        run's own, and is not read again). Claiming twice is a no-op."""
        if self.run_id == run_id:
            return
        self.run_id = run_id
        own = os.path.abspath(resumed_from) if resumed_from else None

        def owner(path: str) -> dict | None:
            return {"run_id": run_id} if own == os.path.abspath(path) else peek(path)

        if self.folder:
            check_folder(self.target, f"checkpoint folder {self.target!r}", "choose another run folder")
            files = self.step_files()
            found = owner(files[-1]) if files else None
            if files and not self.overwrite and (found is None or found["run_id"] != run_id):
                self.run_id = None
                raise VAEFTError(self._foreign(files[-1], found, "run folder"))
            return
        self.run_id = None  # set again below once every check has passed
        if os.path.isdir(self.target):
            raise VAEFTError(f"checkpoint path {self.target!r} is a folder; give a file name such as "
                             f"{os.path.join(self.target, 'run.ckpt')!r}")
        folder = os.path.dirname(os.path.abspath(self.target))
        if not os.path.isdir(folder):
            raise VAEFTError(f"the folder of checkpoint {self.target!r} ({folder}) does not exist; create it or "
                             "choose another path")
        if not os.access(folder, os.W_OK):
            raise VAEFTError(f"cannot write checkpoint {self.target!r}: its folder {folder!r} is not writable; "
                             "choose a folder you can write to")
        if os.path.lexists(self.target) and not self.overwrite:
            found = owner(self.target)
            if found is None or found["run_id"] != run_id:
                raise VAEFTError(self._foreign(self.target, found, "checkpoint path"))
        self.run_id = run_id

    def _foreign(self, path: str, owner: dict | None, where: str) -> str:
        if owner is None:
            return (f"{path!r} exists and is not a checkpoint of this run; it is never replaced. Choose another "
                    f"{where}, or pass --overwrite if you mean to replace it")
        state = ("an unfinished run" if (owner["step"] or 0) < (owner["steps"] or 0) else "a finished run")
        return (f"{path!r} holds the checkpoint of {state} (step {owner['step']} of {owner['steps']}). Continue "
                f"that run by resuming from it, write this run's checkpoints elsewhere, or pass --overwrite "
                "to replace it")

    # ----- during the run

    def due(self, step: int, final: bool = False) -> bool:
        if step <= self.last_step or step <= 0:
            return False
        if final:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self.last_time >= 60 * self.every_minutes

    def write(self, step: int, state: dict) -> str:
        """Write the checkpoint of ``step``; in a folder, remove the oldest beyond ``keep``."""
        if self.run_id is None:
            raise VAEFTError("internal error: Checkpoints.claim was not called before writing")
        state = {**state, "run_id": self.run_id}
        if self.folder:
            os.makedirs(self.target, exist_ok=True)
            path = os.path.join(self.target, f"step-{step:07d}.ckpt")
            write_checkpoint(path, state, overwrite=True)
            for old in self.step_files()[:-self.keep]:
                try:
                    os.unlink(old)
                except OSError:
                    pass  # a leftover old checkpoint costs disk space, nothing else
        else:
            # the first write replaces another run's file only with overwrite (claim checked it)
            path = write_checkpoint(self.target, state, overwrite=True)
        self.last_step, self.last_time = step, time.monotonic()
        self.written.append(path)
        return path

    def latest(self) -> str | None:
        """The newest checkpoint at ``target`` (None when there is none)."""
        if self.folder:
            files = self.step_files()
            return files[-1] if files else None
        return self.target if os.path.isfile(self.target) else None

    def step_files(self) -> list[str]:
        """The ``step-*.ckpt`` files of a checkpoint folder, oldest first (none when it is missing)."""
        if not os.path.isdir(self.target):
            return []
        names = [n for n in os.listdir(self.target) if _STEP_FILE.match(n)]
        return [os.path.join(self.target, n) for n in sorted(names, key=lambda n: int(_STEP_FILE.match(n)[1]))]


def latest_in(folder: str | os.PathLike) -> str | None:
    """The newest ``step-*.ckpt`` of a checkpoint folder, or None."""
    return Checkpoints(folder, folder=True).latest()


# ----- what a checkpoint holds, checked and restored by name

def checkpoint_state(*, cfg: TrainConfig, layout: FileLayout, step: int, params: dict[str, torch.Tensor],
                     opt: torch.optim.Optimizer, ema=None, disc: torch.nn.Module | None = None,
                     disc_opt: torch.optim.Optimizer | None = None, loop: dict, world_size: int,
                     data_signature: dict | None, fp16_fix: dict | None = None) -> dict:
    """The checkpoint of a run at ``step``: the trained ``params`` ({name: parameter}), the optimizers'
    and EMA's state and the discriminator, all keyed by name; ``loop``: the loop's own state (a dict
    of tensors and plain values); what the run's data order depends on; ``fp16_fix``: what the fp16-fix
    settings did before the first step (``FP16Fix.record``: the exact rescaling's report, which a resumed
    run does not redo), None without them. :func:`restore_checkpoint` and :func:`fp16_fix_record` are its
    inverse."""
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": dataclasses.asdict(cfg),
        "base_sha256": layout.base_sha256,
        "params": {k: p.detach().cpu().clone() for k, p in params.items()},
        "optimizer": optimizer_state(opt, params),
        "ema": ema.state_dict() if ema is not None else None,
        "disc": disc.state_dict() if disc is not None else None,
        "disc_optimizer": optimizer_state(disc_opt, dict(disc.named_parameters())) if disc_opt is not None else None,
        "loop": loop,
        "world_size": world_size,
        "data_signature": data_signature,
        "fp16_fix": fp16_fix,
    }


def fp16_fix_record(ckpt: dict) -> dict:
    """The fp16-fix record a checkpoint carries (``FP16Fix.record``; {"rescale": None} for a run without the
    fp16-fix settings: nothing was rescaled). A checkpoint written before checkpoints kept it says
    {"rescale": "unknown"}: whether and how its run rescaled is not known."""
    if "fp16_fix" not in ckpt:
        return {"rescale": UNKNOWN}
    return ckpt["fp16_fix"] or {"rescale": None}


def optimizer_state(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict:
    """``opt.state_dict()`` with torch's positional parameter indices replaced by ``params``' names."""
    name_of = {id(p): k for k, p in params.items()}
    sd = opt.state_dict()
    index = {i: name_of[id(p)] for group, saved in zip(opt.param_groups, sd["param_groups"])
             for p, i in zip(group["params"], saved["params"])}
    return {"state": {index[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, params: dict[str, torch.Tensor], where: str) -> None:
    """Load :func:`optimizer_state`'s dict into ``opt``, matching parameters by name (torch's own
    load matches by position); refuses other parameter groups, naming the first differing name."""
    name_of = {id(p): k for k, p in params.items()}
    current = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
    saved = [g["params"] for g in state["param_groups"]]
    if len(saved) != len(current):
        raise VAEFTError(f"{where}: the optimizer has {len(saved)} parameter group(s) in the checkpoint, "
                         f"{len(current)} here; resume with the same settings")
    for names_then, names_now in zip(saved, current):
        _same_names(set(names_then), set(names_now), f"{where}: the optimizer's parameters")
    index = {n: i for i, n in enumerate(n for names in current for n in names)}
    opt.load_state_dict({
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in names]} for g, names in zip(state["param_groups"], current)],
    })


def _same_names(saved: set[str], current: set[str], what: str) -> None:
    """Refuse two name sets that differ, naming the first differing name (in sorted order)."""
    if saved == current:
        return
    first = sorted(saved ^ current)[0]
    where = "is missing from the checkpoint" if first in current else "is in the checkpoint but not in this run"
    raise VAEFTError(f"{what} do not match: {first!r} {where} ({len(current - saved)} missing, "
                     f"{len(saved - current)} extra). Resume with the same base VAE and trainable setting, or "
                     "start a new run")


def check_tensors(saved: dict[str, torch.Tensor], current: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse ``saved`` tensors whose names or shapes differ from ``current`` ({name: shape}), naming
    the first differing key."""
    _same_names(set(saved), set(current), what)
    for k in sorted(current):
        if tuple(saved[k].shape) != tuple(current[k]):
            raise VAEFTError(f"{what} do not match: {k!r} has shape {tuple(saved[k].shape)} in the checkpoint, "
                             f"{tuple(current[k])} in this run. Resume with the same base VAE, or start a new run")


def load_checkpoint(path: str | os.PathLike, layout: FileLayout, cfg: TrainConfig,
                    params: dict[str, tuple[int, ...]], world_size: int = 1,
                    data_signature: dict | None = None) -> dict:
    """Read a checkpoint and check it against this run before anything is changed: the same base VAE,
    the same training settings (RESUME_MUST_MATCH; steps may grow), the same trained tensors by name
    and shape (``params``: {name: shape}), the same number of processes and data (``data_signature``,
    when both have one). Refused with the reason; the file is only read."""
    path = os.fspath(path)
    state = read_checkpoint(path)
    if state["base_sha256"] != layout.base_sha256:
        raise VAEFTError(f"resume checkpoint {path!r} was trained from a different base VAE "
                         f"(base sha256 {state['base_sha256'][:12]}…, this run's {layout.base_sha256[:12]}…)")
    old = state["config"]
    diff = [f"{k}: {old.get(k, _DEFAULTS[k])!r} -> {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
            if old.get(k, _DEFAULTS[k]) != getattr(cfg, k)]
    if diff:
        raise VAEFTError(f"resume checkpoint {path!r} was written with other settings ({'; '.join(diff)}); "
                         "resume with the same training settings (steps may grow; speed and memory settings may differ)")
    where = f"resume checkpoint {path!r}"
    check_tensors(state["params"], params, f"{where}: the trained tensors")
    if state.get("ema") is not None:
        check_tensors(state["ema"], params, f"{where}: the EMA's tensors")
    best = (state.get("loop") or {}).get("best") or {}
    if best.get("params") is not None:
        check_tensors(best["params"], params, f"{where}: export_best's weights")
    _same_names(set(state["optimizer"]["state"]) | {n for g in state["optimizer"]["param_groups"] for n in g["params"]},
                set(params), f"{where}: the optimizer's parameters")
    if state.get("world_size", 1) != world_size:
        raise VAEFTError(f"resume checkpoint {path!r} was written by a run of {state.get('world_size', 1)} "
                         f"process(es), this one has {world_size}: the data order would differ; resume with "
                         "the same number of processes")
    old_data = state.get("data_signature")
    if old_data is not None and data_signature is not None and old_data != data_signature:
        diff = [f"{k}: {old_data.get(k)!r} -> {data_signature.get(k)!r}"
                for k in sorted(set(old_data) | set(data_signature)) if old_data.get(k) != data_signature.get(k)]
        raise VAEFTError(f"resume checkpoint {path!r} was trained on other data or data settings "
                         f"({'; '.join(d[:200] for d in diff)}); resume with the same images and data settings")
    if state["step"] > cfg.steps:
        raise VAEFTError(f"resume checkpoint {path!r} is at step {state['step']}, past steps={cfg.steps}")
    state["path"] = path
    return state


@torch.no_grad()
def restore_checkpoint(ckpt: dict, *, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, ema=None,
                       disc: torch.nn.Module | None = None, disc_opt: torch.optim.Optimizer | None = None) -> dict:
    """Put a checked checkpoint (from :func:`load_checkpoint`) into the run's objects, by name;
    returns its loop state (the dict :func:`checkpoint_state` was given)."""
    where = f"resume checkpoint {ckpt.get('path', '')!r}"
    for k, p in params.items():
        p.copy_(ckpt["params"][k])
    load_optimizer_state(opt, ckpt["optimizer"], params, where)
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    if disc is not None:
        disc.load_state_dict(ckpt["disc"])
        load_optimizer_state(disc_opt, ckpt["disc_optimizer"], dict(disc.named_parameters()), where)
    return ckpt["loop"]
