"""training.files: atomic writes that never leave half a file, never clobber, and explain OS errors.

Disk full and read-only are tested for real on a tiny tmpfs when the tests run as root (where mount
works); the portable variants make the OS error happen inside the writer instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_ldm_sd
from training.errors import VAEFTError
from training.files import atomic_write, atomic_write_dir

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def _mount_tmpfs(folder, options="size=64k"):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full / read-only file system needs root to mount a tmpfs")
    os.makedirs(folder, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs holding one 10-byte file, 'precious.bin'."""
    d = tmp_path / "tiny"
    _mount_tmpfs(d)
    try:
        (d / "precious.bin").write_bytes(b"0123456789")
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _listing(folder):
    return sorted(os.listdir(folder))


def test_writes_the_bytes_with_the_umask_applied(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            path = atomic_write(tmp_path / f"u{umask:o}.bin", lambda f: f.write(b"abc"))
        finally:
            os.umask(old)
        assert open(path, "rb").read() == b"abc"
        assert os.stat(path).st_mode & 0o777 == mode
    assert _listing(tmp_path) == ["u22.bin", "u77.bin"]


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"precious")
    with pytest.raises(VAEFTError, match="already exists"):
        atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"precious" and _listing(tmp_path) == ["a.bin"]
    atomic_write(path, lambda f: f.write(b"new"), overwrite=True)
    assert path.read_bytes() == b"new" and _listing(tmp_path) == ["a.bin"]


def test_a_racing_writer_is_never_clobbered(tmp_path):
    path = tmp_path / "a.bin"

    def slow_writer(f):  # another process creates the name while we are still writing
        f.write(b"ours")
        path.write_bytes(b"theirs")

    with pytest.raises(VAEFTError, match="another writer"):
        atomic_write(path, slow_writer)
    assert path.read_bytes() == b"theirs" and _listing(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "No space left on device.*free some space"),
                                        (errno.EROFS, "Read-only file system.*writable folder"),
                                        (errno.EACCES, "Permission denied.*folder you can write to"),
                                        (errno.EIO, "Input/output error")])
def test_os_errors_while_writing_become_clear_errors_and_leave_nothing(tmp_path, code, words):
    path = tmp_path / "a.bin"
    path.write_bytes(b"precious")

    def failing(f):
        f.write(PAYLOAD[:1000])  # part of the file is already written when the disk gives up
        raise OSError(code, os.strerror(code))

    for target, overwrite in ((tmp_path / "new.bin", False), (path, True)):
        with pytest.raises(VAEFTError, match=words) as e:
            atomic_write(target, failing, overwrite=overwrite, what="VAE file")
        assert str(target) in str(e.value) and "VAE file" in str(e.value) and "Nothing was written" in str(e.value)
        assert path.read_bytes() == b"precious" and _listing(tmp_path) == ["a.bin"]


def test_other_errors_of_the_writer_propagate_after_cleanup(tmp_path):
    def failing(f):
        f.write(b"half")
        raise ValueError("bad tensor")

    with pytest.raises(ValueError, match="bad tensor"):
        atomic_write(tmp_path / "a.bin", failing)
    assert _listing(tmp_path) == []


def test_missing_folder_and_folder_target(tmp_path):
    with pytest.raises(VAEFTError, match="does not exist; create it"):
        atomic_write(tmp_path / "no" / "a.bin", lambda f: f.write(b"x"))
    (tmp_path / "d").mkdir()
    with pytest.raises(VAEFTError, match="is a folder|that is a folder"):
        atomic_write(tmp_path / "d", lambda f: f.write(b"x"), overwrite=True)
    assert _listing(tmp_path) == ["d"] and _listing(tmp_path / "d") == []


def test_a_folder_removed_while_writing_is_explained(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()

    def remove_folder(f):
        f.write(b"x")
        shutil.rmtree(folder)

    with pytest.raises(VAEFTError, match="No such file or directory.*does not exist"):
        atomic_write(folder / "a.bin", remove_folder)


def test_disk_full_for_real(tiny_disk):
    path = tiny_disk / "precious.bin"
    for target, overwrite in ((path, True), (tiny_disk / "new.bin", False)):
        with pytest.raises(VAEFTError, match="No space left on device") as e:
            atomic_write(target, lambda f: f.write(PAYLOAD), overwrite=overwrite)
        assert str(target) in str(e.value)
        assert _listing(tiny_disk) == ["precious.bin"] and path.read_bytes() == b"0123456789"
    assert shutil.disk_usage(tiny_disk).used <= 8192  # the failed temporaries gave their space back


def test_read_only_file_system_for_real(tiny_disk):
    r = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    for target, overwrite in ((tiny_disk / "precious.bin", True), (tiny_disk / "new.bin", False)):
        with pytest.raises(VAEFTError, match="Read-only file system.*writable folder"):
            atomic_write(target, lambda f: f.write(b"x"), overwrite=overwrite)
    assert _listing(tiny_disk) == ["precious.bin"] and (tiny_disk / "precious.bin").read_bytes() == b"0123456789"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions (the tmpfs test covers read-only)")
def test_read_only_folder_by_permissions(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"precious")
    folder.chmod(0o555)
    try:
        with pytest.raises(VAEFTError, match="Permission denied"):
            atomic_write(folder / "a.bin", lambda f: f.write(b"x"), overwrite=True)
    finally:
        folder.chmod(0o755)
    assert _listing(folder) == ["a.bin"] and (folder / "a.bin").read_bytes() == b"precious"


def test_export_on_a_full_disk_keeps_the_previous_file(tiny_disk):
    from training.export import write_safetensors

    tensors = {k: v.half() for k, v in tiny_ldm_sd().items()}  # ~1.3 MB: does not fit in 64 KiB
    with pytest.raises(VAEFTError, match="cannot write VAE file.*No space left"):
        write_safetensors(tensors, tiny_disk / "precious.bin", overwrite=True)
    assert _listing(tiny_disk) == ["precious.bin"] and (tiny_disk / "precious.bin").read_bytes() == b"0123456789"


def test_export_disk_full_portable(tmp_path, monkeypatch):
    """Without root: the OS error comes from the file object the tensors are written to."""
    import training.files as files_mod
    from training.export import write_safetensors

    real_fdopen = files_mod.os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files_mod.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(VAEFTError, match="No space left on device"):
        write_safetensors({"a": torch.zeros(1000)}, path, overwrite=True)
    assert _listing(tmp_path) == ["v.safetensors"] and path.read_bytes() == b"precious"


def test_refuses_non_finite_tensors_by_name(tmp_path):
    from training.export import write_safetensors

    good = {k: v.clone() for k, v in tiny_ldm_sd().items()}
    bad = dict(good)
    bad["decoder.conv_out.weight"] = good["decoder.conv_out.weight"].clone()
    bad["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(VAEFTError, match=r"NaN or infinite values \(decoder\.conv_out\.weight; stored as float32"):
        write_safetensors(bad, tmp_path / "v.safetensors")
    # fp32 values beyond fp16's range become infinite in an fp16 file
    big = dict(good)
    big["decoder.conv_in.bias"] = good["decoder.conv_in.bias"] + 1e5
    with pytest.raises(VAEFTError, match=r"decoder\.conv_in\.bias; stored as float16.*bf16 or fp32"):
        write_safetensors({k: v.half() for k, v in big.items()}, tmp_path / "v.safetensors")
    assert _listing(tmp_path) == []
    write_safetensors({k: v.bfloat16() for k, v in big.items()}, tmp_path / "v.safetensors")
    assert set(load_file(tmp_path / "v.safetensors")) == set(good)


def test_folder_write_is_atomic_and_guarded(tmp_path):
    def two_files(d):
        open(os.path.join(d, "config.json"), "w").write("{}")
        open(os.path.join(d, "weights.bin"), "wb").write(b"w")

    out = tmp_path / "model"
    atomic_write_dir(out, two_files)
    assert _listing(out) == ["config.json", "weights.bin"]
    with pytest.raises(VAEFTError, match="already exists"):
        atomic_write_dir(out, two_files)
    (out / "weights.bin").write_bytes(b"old")
    atomic_write_dir(out, two_files, overwrite=True)
    assert (out / "weights.bin").read_bytes() == b"w" and _listing(tmp_path) == ["model"]
    # a folder holding anything else is never replaced, even with overwrite
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VAEFTError, match=r"holds other files \(notes\.txt\)"):
        atomic_write_dir(out, two_files, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and _listing(tmp_path) == ["model"]
    # an empty folder made beforehand is filled
    (tmp_path / "empty").mkdir()
    atomic_write_dir(tmp_path / "empty", two_files)
    assert _listing(tmp_path / "empty") == ["config.json", "weights.bin"]

    def failing(d):
        open(os.path.join(d, "config.json"), "w").write("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(VAEFTError, match="No space left"):
        atomic_write_dir(out, failing, overwrite=True)
    assert _listing(tmp_path) == ["empty", "model"] and _listing(out) == ["config.json", "notes.txt", "weights.bin"]
    with pytest.raises(VAEFTError, match="a file of that name exists"):
        atomic_write_dir(out / "config.json", two_files, overwrite=True)
