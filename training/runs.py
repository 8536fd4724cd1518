"""A fine-tune run is a folder, the same for the node and the CLI::

    <run>/
        config.json       every setting, re-runnable: ``python -m training fit --config <run>/config.json``
        metrics.jsonl     one JSON object per history line: losses, lr, validation scores (the base
                          VAE's at step 0), seconds, steps/s, peak GPU memory
        previews/         preview-NNNNNNN.png (inputs above, reconstructions below)
        checkpoints/      step-NNNNNNN.ckpt, the newest few (see training.checkpoint)
        events.out.tfevents.*   the same scalars and previews for TensorBoard, when the optional
                          ``tensorboard`` package is importable

Paths written into the folder are relative to it (a run folder can be shared or moved without
carrying the user's directory layout); the node writes ComfyUI names instead. Which checkpoint a run
continues from (a checkpoint file, or a run folder's newest) is answered here: :func:`resume_point`.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from .checkpoint import Checkpoints, DamagedCheckpoint, latest_in, read_checkpoint
from .config import TrainConfig
from .errors import VAEFTError
from .export import safe_name
from .files import FolderLock, atomic_write, check_folder, describe_os_error, json_safe, write_json
from .plot import image_grid, to_pil

CONFIG_FORMAT = "vaeft-run-config-1"
MARKER = "config.json"


def portable_path(path: str | None, folder: str) -> str | None:
    """``path`` as written in a run folder's config: relative to ``folder`` (never absolute)."""
    if path is None:
        return None
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def read_config(path: str | os.PathLike) -> dict:
    """A run's config.json: {"format", "inputs": {name: path relative to the file's folder or a
    ComfyUI name}, "settings": {TrainConfig and DataConfig fields}}; paths come back resolved
    against the file's folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise VAEFTError(f"--config {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise VAEFTError(f"--config {path!r} is not a readable run config ({str(e)[:200]})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != CONFIG_FORMAT:
        raise VAEFTError(f"--config {path!r} is not a run config written by this tool ({CONFIG_FORMAT})")
    folder = os.path.dirname(os.path.abspath(path))
    inputs = {k: (os.path.normpath(os.path.join(folder, v)) if isinstance(v, str) and cfg.get("paths") == "relative"
                  else v) for k, v in (cfg.get("inputs") or {}).items()}
    return {**cfg, "inputs": inputs}


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder of this tool: its config.json is a run config (a diffusers model
    folder has a config.json too, and is not a run)."""
    try:
        with open(os.path.join(os.fspath(path), MARKER), encoding="utf-8") as f:
            return json.load(f).get("format") == CONFIG_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def what_folder(path: str | os.PathLike) -> str:
    """A word on a folder that is not a run folder, for messages."""
    try:
        with open(os.path.join(os.fspath(path), MARKER), encoding="utf-8") as f:
            if "_class_name" in json.load(f):
                return "a diffusers model folder, not a run folder of this tool"
    except (OSError, ValueError, TypeError):
        pass
    return "not a run folder of this tool"


def named_run_folder(root: str, run_name: str, continue_run: str | None, label: str) -> tuple[str, bool]:
    """(the run folder's path, whether it continues a run) under ``root`` (the node's runs folder, called
    ``label`` in messages). A new run gets a fresh folder named after ``run_name`` (-2, -3, ... when taken);
    ``continue_run`` names a run folder there."""
    check_folder(root, f"the runs folder {label} ({root!r})", "move or rename that file, then run again")
    if continue_run:
        path = os.path.join(root, safe_name(continue_run))
        if not is_run_folder(path):
            raise VAEFTError(f"continue_run {continue_run!r}: there is no such run in {label}/ (refresh the page "
                             "to see the runs there)")
        return path, True
    stem = safe_name(run_name or "vae-ft")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise VAEFTError(describe_os_error(e, root, "runs folder")) from None
    path, k = os.path.join(root, stem), 2
    while os.path.lexists(path):
        path, k = os.path.join(root, f"{stem}-{k}"), k + 1
    return path, False


# ----- where a run resumes

def resume_point(path: str | os.PathLike) -> str:
    """The checkpoint to continue from: ``path`` itself, or for a run folder its newest
    ``checkpoints/step-*.ckpt``. Refuses a run folder without a checkpoint, naming it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    if not is_run_folder(path) and not os.path.isdir(os.path.join(path, "checkpoints")):
        raise VAEFTError(f"resume checkpoint {path!r} is not a file: it is a folder, and {what_folder(path)}; give a "
                         ".ckpt file or a run folder")
    file = latest_in(os.path.join(path, "checkpoints"))
    if file is None:
        raise VAEFTError(f"run folder {path!r} has no checkpoint yet: it stopped before its first one; start it "
                         "again as a new run")
    return file


def older_whole(path: str) -> tuple[str, int] | None:
    """For a damaged newest ``step-*.ckpt`` at ``path``: the newest older one in its folder that reads
    whole, and its step (None when there is none)."""
    folder = os.path.dirname(os.path.abspath(path))
    files = [f for f in Checkpoints(folder, folder=True).step_files() if os.path.abspath(f) != os.path.abspath(path)]
    for older in reversed(files):
        try:
            return older, int(read_checkpoint(older)["step"])
        except VAEFTError:
            continue
    return None


def explain_damaged(e: DamagedCheckpoint, path: str) -> VAEFTError:
    """The refusal of a run folder whose newest checkpoint ``path`` is damaged, with what to do: when an older
    one is whole, it says so and how to continue from it; when none is, that the run cannot be continued and
    how to start it again (nothing is moved or deleted here)."""
    older = older_whole(path)
    if older is None:
        return VAEFTError(f"{e}. No older checkpoint of this run is whole, so it cannot be continued: start it again "
                          "as a new run (continue_run 'new run' on the node; on the command line, without --resume "
                          f"and with another --run-dir). {os.path.basename(path)!r} was not changed (nothing here "
                          "moves or deletes it)")
    file, step = older
    return VAEFTError(f"{e}. An older checkpoint of this run is whole: {file!r} (step {step}). To continue from it, "
                      f"move {os.path.basename(path)!r} out of {os.path.dirname(path)!r} (keep it if you like; "
                      f"nothing here deletes it) and continue the run again (the same --resume, or continue_run on "
                      f"the node); the steps after {step} are then trained again")


class RunFolder:
    """Writes one run's folder. ``create`` checks the folder before any training happens."""

    def __init__(self, path: str, warn=None):
        self.path = path
        self._warn = warn or (lambda text: None)  # told once when TensorBoard's writer fails
        self.lock: FolderLock | None = None  # this process is the folder's one writer until close()
        self.checkpoint_dir = os.path.join(path, "checkpoints")
        self.preview_dir = os.path.join(path, "previews")
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self._tb = None
        self._t0 = time.monotonic()
        self._last = (None, None)  # (step, time) of the previous metrics line

    # ----- opening

    @staticmethod
    def check(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
        """Whether ``path`` may hold this run, without writing anything: missing, empty, a run folder
        of ours being continued (``resume``), or anything with ``overwrite``. Refused otherwise, with
        what to do."""
        path = os.fspath(path)
        check_folder(path, f"run folder {path!r}", "choose another run folder")
        if os.path.isdir(path) and set(os.listdir(path)) - {FolderLock.NAME}:  # (our own lock, taken first)
            ours = is_run_folder(path)
            if not ours and not overwrite:
                raise VAEFTError(f"{path!r} exists and is {what_folder(path)}; choose another run folder "
                                 "(nothing in it was changed)")
            if ours and not (resume or overwrite):
                latest = latest_in(os.path.join(path, "checkpoints"))
                hint = f"continue it (resume from {latest!r})" if latest else "continue it"
                raise VAEFTError(f"run folder {path!r} already holds a run; {hint}, choose another run name, or "
                                 "allow overwriting")

    @classmethod
    def create(cls, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
               warn=None, lock: FolderLock | None = None) -> "RunFolder":
        """Open ``path`` for a run (see :meth:`check`), made if missing, and hold its lock (``lock``:
        already taken) until :meth:`close`. ``warn(text)``: told once if the optional TensorBoard
        writer fails (the run goes on without it)."""
        path = os.fspath(path)
        cls.check(path, resume=resume, overwrite=overwrite)
        try:
            os.makedirs(os.path.join(path, "previews"), exist_ok=True)
            probe = os.path.join(path, ".write-test")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as e:
            raise VAEFTError(describe_os_error(e, path, "run folder")) from None
        folder = cls(path, warn)
        folder.lock = lock or FolderLock.acquire(path)
        return folder

    def rewind(self, step: int) -> str | None:
        """Continuing from the checkpoint of ``step``: forget metrics lines written after it (a
        crashed run may have logged past its last checkpoint), so the log reads as one run. Lines
        that are not whole records (cut off by a crash mid-write) are set aside first, into
        ``metrics.jsonl.torn`` (``.torn-2``, ... when taken): returns that file's path, or None."""
        records, torn = split_metrics(self.metrics_path)
        aside = None
        if torn:
            aside, k = self.metrics_path + ".torn", 2
            while os.path.lexists(aside):
                aside, k = f"{self.metrics_path}.torn-{k}", k + 1
            atomic_write(aside, lambda f: f.write(torn), what="set-aside metrics lines")
        kept = [r for r in records if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics_path, lambda f: f.write(text.encode()), overwrite=True, what="metrics log")
        if kept:
            self._t0 = time.monotonic() - float(kept[-1].get("seconds") or 0.0)
        return aside

    @staticmethod
    def checkpoints(path: str | os.PathLike, cfg: TrainConfig, overwrite: bool = False) -> Checkpoints:
        """Where and when the run in folder ``path`` writes checkpoints: ``checkpoints/``, the newest
        ``keep_checkpoints`` kept (nothing is made or read until it is used)."""
        return Checkpoints(os.path.join(os.fspath(path), "checkpoints"), every_steps=cfg.checkpoint_every,
                           every_minutes=cfg.checkpoint_minutes, keep=cfg.keep_checkpoints, folder=True,
                           overwrite=overwrite)

    # ----- writing

    def write_config(self, inputs: dict, settings: dict, *, paths: str = "relative", base_sha256: str | None = None,
                     images: dict | None = None) -> str:
        """config.json. ``inputs``: {"vae", "data", "out", ...}: file paths (written relative to
        this folder) when ``paths`` is "relative", ComfyUI names when it is "comfyui". ``base_sha256``:
        the base VAE's digest (``fit --config`` checks that the file it is given is still that one).
        ``images``: what the patches were ({"channels": 3 or 4, "alpha": how transparency was handled}),
        a record only (``fit --config`` reads no setting from it)."""
        if paths == "relative":
            inputs = {k: portable_path(v, self.path) for k, v in inputs.items()}
        body = {"format": CONFIG_FORMAT, "paths": paths, "inputs": inputs, "settings": settings}
        if base_sha256:
            body["base_sha256"] = base_sha256
        if images:
            body["images"] = images
        return write_json(os.path.join(self.path, MARKER), body, what="run config")

    def log(self, line: dict, step_time: float | None = None) -> dict:
        """Append a history line to metrics.jsonl (and TensorBoard), with the seconds since the run
        started, steps/s since the previous line and peak GPU memory. Returns the written record."""
        now = time.monotonic()
        record = dict(line)
        record["seconds"] = round(now - self._t0, 3)
        prev_step, prev_time = self._last
        if prev_step is not None and line["step"] > prev_step and now > prev_time:
            record["steps_per_s"] = round((line["step"] - prev_step) / (now - prev_time), 4)
        self._last = (line["step"], now)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
        except OSError as e:
            raise VAEFTError(describe_os_error(e, self.metrics_path, "metrics log")) from None
        self._to_tensorboard(lambda tb: [tb.add_scalar(k, v, line["step"]) for k, v in record.items()
                                         if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)])
        return record

    def preview(self, step: int, images: torch.Tensor) -> str:
        """Write (2N, 3, H, W) [0, 1] images (inputs, then reconstructions) as previews/preview-NNNNNNN.png
        (see :func:`write_preview`), and to TensorBoard."""
        path, grid = write_preview(self.preview_dir, step, images)
        self._to_tensorboard(lambda tb: tb.add_image("preview", grid, step))
        return path

    def close(self) -> None:
        try:
            if self._tb:
                try:
                    self._tb.close()
                except Exception as e:  # noqa: BLE001 - optional, see _to_tensorboard
                    self._warn(f"TensorBoard's writer failed while closing ({type(e).__name__}: {str(e)[:200]})")
        finally:  # (even on a Ctrl-C inside TensorBoard's close)
            self._tb = None
            if self.lock is not None:
                self.lock.release()
            self.lock = None

    def _to_tensorboard(self, write) -> None:
        """``write(writer)`` then flush, when the optional ``tensorboard`` package is installed and
        works. TensorBoard is never required: any failure, importing it (a missing package, a broken
        protobuf) or using it, is told once through ``warn`` and TensorBoard is off for the rest of the run."""
        if self._tb is False:
            return
        try:
            if self._tb is None:
                try:  # imported on first use: TensorBoard is an optional package
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # not installed: optional, nothing to say
                    self._tb = False
                    return
                self._tb = SummaryWriter(self.path)
            write(self._tb)
            self._tb.flush()
        except Exception as e:  # noqa: BLE001 - whatever breaks in TensorBoard, training goes on
            self._tb = False
            self._warn(f"TensorBoard is off for this run: its writer failed ({type(e).__name__}: {str(e)[:200]}); "
                       "metrics.jsonl and previews/ are still written (reinstall tensorboard and protobuf to "
                       "get it back)")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (a missing file: none), up to its last whole line: a line
    cut off by a crash mid-write is left out (see :func:`split_metrics`)."""
    return split_metrics(path)[0]


def split_metrics(path: str | os.PathLike) -> tuple[list[dict], bytes]:
    """(the whole records of a run's metrics.jsonl, the bytes of the lines that are not whole records, as
    they are in the file).
    A crash (or a kill) while a line is appended leaves it cut off, with no newline or with bytes that
    do not parse: such lines are returned apart so that a continued run can set them aside."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return [], b""
    except OSError as e:
        raise VAEFTError(describe_os_error(e, path, "metrics log")) from None
    records, torn = [], []
    for line in raw.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") and line.strip() else None
        except ValueError:  # (UnicodeDecodeError too)
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            torn.append(line)
    return records, b"".join(torn)


def write_preview(folder: str, step: int, images: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Write (2N, 3, H, W) [0, 1] images (inputs, then reconstructions) as ``folder``/preview-NNNNNNN.png,
    two rows, atomically. Returns (path, the grid drawn)."""
    grid = image_grid(images, rows=2)
    path = os.path.join(folder, f"preview-{step:07d}.png")
    atomic_write(path, lambda f: to_pil(grid).save(f, format="PNG"), overwrite=True, what="preview")
    return path, grid


class RunStatus:
    """What a person watching a run wants to see, for the node's progress text and the CLI's
    progress bar: step/total, steps/s, elapsed, ETA, the latest losses, the latest validation
    scores beside the base VAE's (step 0), peak GPU memory."""

    def __init__(self, total: int, start_step: int = 0, history: list[dict] | None = None):
        self.total, self.start_step, self.step = total, start_step, start_step
        self.t0 = time.monotonic()
        self.losses: dict = {}
        self.val: dict = {}
        self.base: dict = {}
        for line in history or []:
            self.update(line)

    def update(self, line: dict) -> None:
        """Take a history line (training terms and/or validation scores)."""
        self.step = max(self.step, int(line["step"]))
        # (a number that was inf, an fp16 decode's overflowed activation, is null once read back from metrics.jsonl)
        scores = {k: v for k, v in line.items() if k.startswith(("val_", "gen_")) and isinstance(v, (int, float))}
        if scores:
            (self.base if line["step"] == 0 else self.val).update(scores)
        losses = {k: v for k, v in line.items()
                  if k not in ("step", "lr", "skipped_steps") and not k.startswith(("val_", "gen_"))}
        if losses:
            self.losses = losses

    def rates(self) -> tuple[float, float, float | None]:
        """(elapsed s, steps/s, ETA s or None) over the steps done in this session."""
        elapsed = time.monotonic() - self.t0
        done = self.step - self.start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - self.step) / rate if rate > 0 else None
        return elapsed, rate, eta

    def fields(self) -> dict[str, str]:
        """Short name -> formatted value (the CLI's progress-bar postfix)."""
        out = {k: f"{v:.4g}" for k, v in self.losses.items() if isinstance(v, (int, float))}
        for k, v in self.val.items():
            base = self.base.get(k)
            out[k] = f"{v:.4g}" + (f" (base {base:.4g})" if base is not None else "")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_gpu"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        return out

    def text(self) -> str:
        """Several lines for the node."""
        elapsed, rate, eta = self.rates()
        lines = [f"step {self.step}/{self.total}  {rate:.2f} steps/s  elapsed {_hms(elapsed)}  "
                 f"ETA {_hms(eta) if eta is not None else '-'}"]
        if self.losses:
            lines.append("loss  " + "  ".join(f"{k} {v:.4g}" for k, v in self.losses.items()
                                            if isinstance(v, (int, float))))
        keys = sorted(set(self.val) | set(self.base))
        if keys:
            lines.append("validation (now / base)  " + "  ".join(
                f"{k} {self.val[k]:.4g}/{self.base[k]:.4g}" if k in self.val and k in self.base
                else f"{k} {self.val.get(k, self.base.get(k)):.4g}" for k in keys))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            lines.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        return "\n".join(lines)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
