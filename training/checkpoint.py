"""Checkpoint files: one dict each (see ``trainer.checkpoint_state``), written atomically, carrying
a digest of its tensors and the identity of the run that wrote it.

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

import errno
import hashlib
import os
import re
import time

import torch

from .errors import VAEFTError
from .files import atomic_write

CHECKPOINT_FORMAT = "vaeft-checkpoint-2"
_STEP_FILE = re.compile(r"^step-(\d{7,})\.ckpt$")


def tensors_digest(obj) -> str:
    """sha256 over every tensor in a nested dict/list/tuple (dtype, shape and bytes, in a fixed
    order: dict keys sorted by their text). Other values are not part of it."""
    h = hashlib.sha256()

    def walk(o, where: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{where}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]")

    walk(obj, "")
    return h.hexdigest()


def write_checkpoint(path: str | os.PathLike, state: dict, *, overwrite: bool) -> str:
    """Write ``state`` (with its tensors' digest added) to ``path`` atomically: a crash or a full
    disk leaves the previous file whole. OS errors become a VAEFTError naming the path."""
    body = {k: v for k, v in state.items() if k != "digest"}
    body["digest"] = tensors_digest(body)

    def save(f) -> None:
        try:
            torch.save(body, f)
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            full = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < 64 * 2**20
            raise OSError(errno.ENOSPC if full else errno.EIO, f"writing the checkpoint failed ({str(e)[:200]})") \
                from None

    return atomic_write(path, save, overwrite=overwrite, what="checkpoint")


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
        raise VAEFTError(f"resume checkpoint {path!r} is unreadable or corrupt: {str(e)[:300]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VAEFTError(f"{path!r} is not a checkpoint written by this tool ({CHECKPOINT_FORMAT})")
    if state.get("digest") != tensors_digest({k: v for k, v in state.items() if k != "digest"}):
        raise VAEFTError(f"resume checkpoint {path!r} is damaged: its tensors do not match the digest written with "
                         "them (a disk or copy error). Resume from an earlier checkpoint; this file was not changed")
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

    def claim(self, run_id: str, steps: int) -> None:
        """Check that this run may write at ``target`` before any training happens: refuse with
        what to do when a file there belongs to another run (or is not a checkpoint at all)."""
        self.run_id = run_id
        if self.folder:
            if os.path.lexists(self.target) and not os.path.isdir(self.target):
                raise VAEFTError(f"checkpoint folder {self.target!r} is a file; choose another run folder")
            files = self._step_files()
            owner = peek(files[-1]) if files else None
            if files and not self.overwrite and (owner is None or owner["run_id"] != run_id):
                raise VAEFTError(self._foreign(files[-1], owner, "run folder"))
            return
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
            owner = peek(self.target)
            if owner is None or owner["run_id"] != run_id:
                raise VAEFTError(self._foreign(self.target, owner, "checkpoint path"))

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
            for old in self._step_files()[:-self.keep]:
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
            files = self._step_files()
            return files[-1] if files else None
        return self.target if os.path.isfile(self.target) else None

    def _step_files(self) -> list[str]:
        if not os.path.isdir(self.target):
            return []
        names = [n for n in os.listdir(self.target) if _STEP_FILE.match(n)]
        return [os.path.join(self.target, n) for n in sorted(names, key=lambda n: int(_STEP_FILE.match(n)[1]))]


def latest_in(folder: str | os.PathLike) -> str | None:
    """The newest ``step-*.ckpt`` of a checkpoint folder, or None."""
    return Checkpoints(folder, folder=True).latest()


__all__ = ["CHECKPOINT_FORMAT", "Checkpoints", "latest_in", "peek", "read_checkpoint", "tensors_digest",
           "write_checkpoint"]
