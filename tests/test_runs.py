"""The run folder on its own (no training): TensorBoard optional, the one-writer lock, what counts as a run."""

from __future__ import annotations

import json
import sys
import types

import pytest

from training.errors import VAEFTError
from training.runs import RunFolder, read_metrics


class _BrokenModule(types.ModuleType):
    """``from torch.utils.tensorboard import SummaryWriter`` raising what a broken protobuf raises."""

    def __getattr__(self, name):
        raise TypeError("Descriptors cannot be created directly (protobuf)")


def _log_twice(folder, warnings):
    run = RunFolder.create(folder, warn=warnings.append)
    run.log({"step": 1, "total": 0.5})
    run.log({"step": 2, "total": 0.4})
    run.close()
    return [r["step"] for r in read_metrics(folder)]


def test_a_broken_tensorboard_import_is_told_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _BrokenModule("torch.utils.tensorboard"))
    warnings = []
    assert _log_twice(tmp_path / "run", warnings) == [1, 2]
    assert len(warnings) == 1 and "TensorBoard is off" in warnings[0] and "TypeError" in warnings[0]


def test_a_tensorboard_writer_failing_in_use_is_told_once_and_the_run_goes_on(tmp_path, monkeypatch):
    class Writer:
        def __init__(self, path):
            pass

        def add_scalar(self, *a):
            raise OSError("disk quota exceeded")

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    warnings = []
    assert _log_twice(tmp_path / "run", warnings) == [1, 2]
    assert len(warnings) == 1 and "disk quota exceeded" in warnings[0]


def test_the_node_runs_folder_being_a_file_is_named(tmp_path):
    from training.runs import named_run_folder

    root = tmp_path / "vae_ft_runs"
    root.write_text("not a folder")
    for cont in (None, "old"):
        with pytest.raises(VAEFTError, match=r"output/vae_ft_runs .* is a file, not a folder; move or rename"):
            named_run_folder(str(root), "fundus", cont, "output/vae_ft_runs")
    assert root.read_text() == "not a folder"


def test_a_diffusers_model_folder_is_not_a_run(tmp_path):
    from training.runs import is_run_folder, named_run_folder, resume_point

    model = tmp_path / "runs" / "vae-ft-x"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    assert not is_run_folder(model)
    with pytest.raises(VAEFTError, match="a diffusers model folder, not a run folder"):
        RunFolder.check(model)
    with pytest.raises(VAEFTError, match="a diffusers model folder, not a run folder"):
        resume_point(model)
    with pytest.raises(VAEFTError, match="no such run"):
        named_run_folder(str(tmp_path / "runs"), "x", "vae-ft-x", "output/vae_ft_runs")


def test_the_lock_a_run_takes_first_does_not_make_an_empty_folder_look_used(tmp_path):
    """The lock is taken before the folder is checked: an empty folder (with only our .lock) still takes a run."""
    from training.files import FolderLock

    (tmp_path / "empty").mkdir()
    lock = FolderLock.acquire(tmp_path / "empty")
    try:
        RunFolder.check(tmp_path / "empty")  # would say "exists and is not a run folder" if .lock counted
    finally:
        lock.release(forget=True)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_filesystem_without_flock_runs_without_a_lock_and_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl

    from training.files import FolderLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="running without a lock"):
        lock = FolderLock.acquire(tmp_path)
    assert lock.fd is None and not (tmp_path / FolderLock.NAME).exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork (the loader workers' start method)")
def test_a_forked_loader_worker_does_not_keep_the_run_folder_locked(tmp_path):
    """Loader workers started by fork share the lock's open file: the worker's init closes its copy, so the
    lock ends with the writing process (a second writer gets it while the worker still runs)."""
    import os
    import time

    from training.data import _worker_init
    from training.files import FolderLock

    lock = FolderLock.acquire(tmp_path)
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            _worker_init(0)
            time.sleep(3)
        finally:
            os._exit(0)
    try:
        time.sleep(0.5)
        lock.release()
        again = FolderLock.acquire(tmp_path)  # refused as "another process" if the worker kept the lock
        again.release()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
