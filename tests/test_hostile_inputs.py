"""Hostile inputs on the read side (issue 15): special files, degenerate and bomb-sized images,
folders that are files, batches too large for memory, and `--help` text.

Each case asserts the message (or skip reason), the exit code or error type, that nothing hangs
(FIFO reads are unblocked by a watchdog; CLI runs have timeouts and a memory cap) and that
every pre-existing file is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import save_file

from conftest import ROOT, cli_main, tiny_ldm_sd, write_images
from hostile_files import FifoWatchdog, png, snapshot
from training import imageio as tio
from training.config import DataConfig
from training.data import build_dataset, from_tensor
from training.errors import VAEFTError

P = 64  # with upscale_small, 100000×1 becomes 6400000×64: over the pixel budget
MEMORY_CAP = 8 << 30  # address-space cap of CLI runs: a regression fails fast instead of filling the machine

needs_posix = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero need a POSIX system")


# ---------------------------------------------------------------------------------------------
# Helpers


def cli(*args, timeout: float = 300):
    """``python -m training ...`` under a memory cap and a timeout, as a user runs it."""
    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=cap if sys.platform.startswith("linux") else None)


@pytest.fixture
def hostile(tmp_path):
    """A data folder with two usable photos and every kind of non-file under an image name."""
    d = tmp_path / "data"
    write_images(d, names=("astronaut", "coffee"), size=64)
    os.mkfifo(d / "x.png")
    os.symlink("/dev/zero", d / "z.png")
    os.symlink(d / "astronaut.png", d / "linked.png")  # a link to a regular file is fine
    os.symlink(tmp_path / "gone.png", d / "broken.png")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(d / "s.png"))
    except OSError:  # a long tmp path can exceed the socket path limit
        pass
    (d / "wide.png").write_bytes(png(100000, 1))
    yield d
    sock.close()


SPECIAL = {
    "x.png": "a named pipe (FIFO), not a regular file",
    "z.png": "a link to a character device (/dev/zero), not a regular file",
    "broken.png": "a broken link",
    "s.png": "a socket, not a regular file",
}


# ---------------------------------------------------------------------------------------------
# 1. Only regular files are read


@needs_posix
def test_scanner_skips_special_files_without_opening_them(hostile, monkeypatch):
    before = snapshot(hostile)
    opened = []
    real_open, real_os_open = open, os.open

    def spy_open(file, *a, **k):
        opened.append(os.path.basename(str(file)))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        opened.append(os.path.basename(str(path)))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    t0 = time.time()
    with FifoWatchdog([hostile / "x.png"]) as dog:
        s = build_dataset(hostile, DataConfig(patch_size=P, upscale_small=True)).summary()
    monkeypatch.undo()
    assert not dog.fired and time.time() - t0 < 20, "the scan blocked on the FIFO"
    reasons = {e["path"]: e["reason"] for e in s["images_skipped"]}
    for name, reason in SPECIAL.items():
        if name == "s.png" and not (hostile / "s.png").exists():
            continue
        assert reason in reasons[name], (name, reasons)
        assert name not in opened, f"{name} was opened"
    assert "100000×1" in reasons["wide.png"]
    assert s["images_used"] == ["astronaut.png", "coffee.png", "linked.png"]
    assert snapshot(hostile) == before


@needs_posix
def test_read_image_refuses_special_files_directly(hostile):
    """The reader itself (used for masks, re-reads and evaluation) refuses them too, never blocking."""
    with FifoWatchdog([hostile / "x.png"]) as dog:
        for name, reason in SPECIAL.items():
            if (hostile / name).exists() or os.path.islink(hostile / name):
                with pytest.raises(tio.ImageReadError, match=re.escape(reason.split(",")[0])):
                    tio.read_image(hostile / name)
    assert not dog.fired


def test_a_file_larger_than_any_usable_image_is_not_read(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(png(64, 64) + b"\0" * 4096)
    monkeypatch.setattr(tio, "MAX_FILE_BYTES", 1024)
    with pytest.raises(tio.ImageReadError, match="larger than any usable image"):
        tio.read_image(big)


@needs_posix
def test_special_masks_are_skipped_with_a_reason(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_images(data, names=("astronaut", "coffee", "chelsea"), size=64)
    masks.mkdir()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "astronaut.png")
    os.mkfifo(masks / "coffee.png")
    os.symlink("/dev/zero", masks / "chelsea.png")
    before = snapshot(tmp_path)
    with FifoWatchdog([masks / "coffee.png"]) as dog:
        s = build_dataset(data, DataConfig(patch_size=P, mask_dir=str(masks), val_fraction=0)).summary()
    assert not dog.fired
    reasons = {e["path"]: e["reason"] for e in s["images_skipped"]}
    assert reasons["coffee.png"].startswith("mask coffee.png: a named pipe (FIFO), not a regular file")
    assert reasons["chelsea.png"].startswith("mask chelsea.png: a link to a character device (/dev/zero)")
    assert s["images_used"] == ["astronaut.png"]
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 2. Size from the header, before decoding or upscaling


def test_degenerate_image_is_skipped_before_decoding_and_upscaling(tmp_path, monkeypatch):
    write_images(tmp_path, names=("astronaut",), size=64)
    (tmp_path / "wide.png").write_bytes(png(100000, 1))
    import training.scan as data_mod

    decoded, resized = [], []
    real_load, real_resize = ImageFile.ImageFile.load, data_mod.resize_pixels
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (decoded.append(im.size), real_load(im))[1])
    monkeypatch.setattr(data_mod, "resize_pixels", lambda px, size: (resized.append(size), real_resize(px, size))[1])
    s = build_dataset(tmp_path, DataConfig(patch_size=P, upscale_small=True)).summary()
    reason = {e["path"]: e["reason"] for e in s["images_skipped"]}["wide.png"]
    assert reason.startswith("100000×1 pixels would be 6400000×64 (409.6 megapixels) once upscaled to the "
                             "64-pixel patch (the limit is 179.0 megapixels per image)"), reason
    assert (100000, 1) not in decoded and (64, 64) in decoded  # the photo was decoded, the strip not
    assert not resized
    assert s["images_used"] == ["astronaut.png"]
    # the same image as a tensor (IMAGE batch): refused before the upscale too
    with pytest.raises(VAEFTError, match=r"image_0000: 50000×1 pixels would be 3200000×64"):
        from_tensor(torch.full((1, 3, 1, 50000), 0.5), DataConfig(patch_size=64, upscale_small=True))
    assert not resized


def test_pixel_budget_applies_to_the_upscaled_size():
    assert tio.upscaled_size(1, 100000, 64) == (64, 6400000)
    assert tio.upscaled_size(40, 48, 64) == (64, 77)  # as before: aspect kept, rounded up
    assert tio.upscaled_size(100, 200, 64) == (100, 200) and tio.upscaled_size(5, 7, 0) == (5, 7)
    tio.check_size(100000, 1)  # small enough to decode...
    with pytest.raises(tio.ImageReadError, match=r"100000×1 pixels would be 6400000×64 \(409\.6 megapixels\)"):
        tio.check_size(100000, 1, min_side=64)  # ...not to upscale
    with pytest.raises(tio.ImageReadError, match=r"20000×10000 pixels \(200\.0 megapixels\) is too large"):
        tio.check_size(20000, 10000)


def test_decompression_bomb_is_a_named_skip(tmp_path, monkeypatch):
    write_images(tmp_path, names=("astronaut",), size=64)
    (tmp_path / "bomb.png").write_bytes(png(20000, 10000))  # 200 MP in 50 KB
    s = build_dataset(tmp_path, DataConfig(patch_size=P)).summary()
    reason = {e["path"]: e["reason"] for e in s["images_skipped"]}["bomb.png"]
    assert reason.startswith("too large to decode safely") and "200000000 pixels" in reason, reason
    # a host that lifts PIL's limit (Image.MAX_IMAGE_PIXELS = None) does not lift ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    s = build_dataset(tmp_path, DataConfig(patch_size=P)).summary()
    reason = {e["path"]: e["reason"] for e in s["images_skipped"]}["bomb.png"]
    assert reason.startswith("20000×10000 pixels (200.0 megapixels) is too large to decode safely"), reason


# ---------------------------------------------------------------------------------------------
# 3. A "folder" that is a file


def test_data_or_mask_folder_that_is_a_file(tmp_path):
    write_images(tmp_path / "data", names=("astronaut",), size=64)
    afile = tmp_path / "images.png"
    afile.write_bytes(b"not a folder")
    with pytest.raises(VAEFTError) as e:
        build_dataset(afile, DataConfig(patch_size=P))
    assert "is a file, not a folder" in str(e.value) and "not found" not in str(e.value)
    with pytest.raises(VAEFTError) as e:
        build_dataset(tmp_path / "data", DataConfig(patch_size=P, mask_dir=str(afile)))
    assert f"mask folder {afile} is a file, not a folder" in str(e.value)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(VAEFTError, match=r"is a named pipe \(FIFO\), not a folder"):
            build_dataset(tmp_path / "pipe", DataConfig(patch_size=P))
    with pytest.raises(VAEFTError, match="data folder not found"):
        build_dataset(tmp_path / "nope", DataConfig(patch_size=P))
    assert afile.read_bytes() == b"not a folder"


# ---------------------------------------------------------------------------------------------
# 6. Out of CPU memory


def test_batch_too_large_for_memory_is_named(tmp_path):
    write_images(tmp_path, names=("astronaut",), size=64)
    ds = build_dataset(tmp_path, DataConfig(patch_size=1024, upscale_small=True, foreground_threshold=0))
    with pytest.raises(VAEFTError) as e:  # 100000 × 3 × 1024² float32 = 1.2 TB: refused before allocating
        next(ds.train_batches(100_000))
    msg = str(e.value)
    assert msg.startswith("out of CPU memory building a batch of 100000 patches of 1024×1024: it needs 1171.9 GiB")
    assert "batch_size" in msg


def test_allocator_failure_becomes_a_named_error():
    from training.memory import out_of_memory_named

    with pytest.raises(VAEFTError, match=r"out of CPU memory doing X \(.*can't allocate memory.*\); do Y"):
        with out_of_memory_named("doing X", "do Y"):
            torch.empty(2**60, dtype=torch.uint8)  # a real allocator failure, nothing is allocated
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with out_of_memory_named("doing X", "do Y"):
            raise ValueError("not memory")


def test_out_of_memory_while_decoding_stops_the_scan(tmp_path, monkeypatch):
    """Not a skip: which images are used must not depend on how much memory was free."""
    write_images(tmp_path, names=("astronaut", "coffee"), size=64)

    def no_memory(im):
        raise MemoryError()

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(VAEFTError, match=r"astronaut\.png: out of CPU memory decoding this 64×64 image"):
        build_dataset(tmp_path, DataConfig(patch_size=P))


# ---------------------------------------------------------------------------------------------
# The same cases through the CLI


@pytest.fixture(scope="module")
def base_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file(tiny_ldm_sd(), str(path))
    return path


@needs_posix
def test_cli_special_files_do_not_hang_and_are_listed(hostile, base_vae, tmp_path):
    before = snapshot(tmp_path)
    with FifoWatchdog([hostile / "x.png"], seconds=120) as dog:
        p = cli("patches", "--data", hostile, "--patch-size", P, "--upscale-small", "--count", 2, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        reasons = {e["path"]: e["reason"] for e in json.loads(p.stdout)["images_skipped"]}
        assert SPECIAL["x.png"] in reasons["x.png"] and SPECIAL["z.png"] in reasons["z.png"]
        assert "100000×1 pixels would be 6400000×64" in reasons["wide.png"]
        out = tmp_path / "vae-ft.safetensors"
        p = cli("fit", "--vae", base_vae, "--data", hostile, "--out", out, "--steps", 1, "--patch-size", P,
                "--batch-size", 1, "--lpips-weight", 0, "--upscale-small", "--no-progress", timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "skipped x.png: a named pipe (FIFO)" in p.stderr and "skipped z.png: a link to a character" in p.stderr
    assert not dog.fired
    after = snapshot(tmp_path)
    assert after.pop(str(out))[0] == "file"
    assert after == before


@pytest.mark.parametrize("case,expected", [
    ("data_is_file", "is a file, not a folder; give the folder that holds the images"),
    ("mask_is_file", "is a file, not a folder; give the folder that holds the masks"),
    ("huge_batch", "out of CPU memory building a batch of 100000 patches of 1024×1024"),
    ("huge_batch_fit", "out of CPU memory building a batch of 65536 patches of 1024×1024"),
])
def test_cli_named_errors(tmp_path, base_vae, case, expected):
    data = tmp_path / "data"
    write_images(data, names=("astronaut",), size=64)
    afile = tmp_path / "file.png"
    afile.write_bytes(b"precious")
    args = ["patches", "--data", data, "--patch-size", P]
    if case == "data_is_file":
        args[2] = afile
    elif case == "mask_is_file":
        args += ["--mask-dir", afile]
    elif case == "huge_batch":
        args = ["patches", "--data", data, "--patch-size", 1024, "--upscale-small", "--count", 100000]
    elif case == "huge_batch_fit":
        args = ["fit", "--vae", base_vae, "--data", data, "--out", tmp_path / "out.safetensors", "--steps", 1,
                "--patch-size", 1024, "--upscale-small", "--batch-size", 65536, "--lpips-weight", 0, "--no-progress"]
    before = snapshot(tmp_path)
    # the memory-hungry cases run in a process of their own, under MEMORY_CAP: a regression fails there
    p = cli(*args, timeout=120) if case.startswith("huge") else cli_main(*args, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert expected in p.stderr and "Traceback" not in p.stderr
    assert "not found" not in p.stderr and "does not exist" not in p.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case,expected", [
    ("nan", "holds NaN or infinite weights in 2 of"),
    ("mixed", "the encoder and decoder do not fit together: quant_conv makes 8 latent channels"),
])
def test_cli_refuses_a_broken_base_vae(tmp_path, case, expected):
    write_images(tmp_path / "data", names=("astronaut",), size=64)
    sd = tiny_ldm_sd()
    if case == "nan":
        sd["decoder.conv_out.weight"].view(-1)[0] = float("nan")
        sd["decoder.up.0.block.0.conv1.bias"].view(-1)[0] = float("inf")
    else:
        eight = tiny_ldm_sd(8)
        sd = {k: (eight[k] if k.startswith(("encoder.", "quant_conv.")) else v) for k, v in sd.items()}
    base = tmp_path / "base.safetensors"
    save_file(sd, str(base))
    before = snapshot(tmp_path)
    out = tmp_path / "out.safetensors"
    p = cli_main("fit", "--vae", base, "--data", tmp_path / "data", "--out", out, "--steps", 1, "--patch-size", P,
                 "--batch-size", 1, "--lpips-weight", 0, "--no-progress", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert expected in p.stderr and str(base) in p.stderr and "Traceback" not in p.stderr
    if case == "nan":
        assert "decoder.conv_out.weight" in p.stderr and "decoder.up.0.block.0.conv1.bias" in p.stderr
    assert snapshot(tmp_path) == before  # no export, base untouched


# ---------------------------------------------------------------------------------------------
# 4. --help


def _subparsers():
    import argparse

    from training.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_help_text_is_printed_as_written_for_every_subcommand():
    """argparse %-formats help strings: a literal "%" in an option's help (e.g. "~30% slower") must
    reach the screen as written, not as a dump of argparse's internals."""
    import dataclasses

    from training.config import TrainConfig
    from training.config import DataConfig

    choices = _subparsers()
    assert set(choices) >= {"fit", "patches", "eval", "demo"}
    declared: dict[str, list[str]] = {}  # field -> its help in each dataclass that declares it
    for cls in (TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            declared.setdefault(f.name, []).append(f.metadata.get("help", ""))
    checked = 0
    for name, parser in choices.items():
        text = "".join(parser.format_help().split())  # undo argparse's line wrapping (also at hyphens)
        assert "option_strings" not in text and "%%" not in text, name
        derived = [a for g in parser._action_groups if g.title in ("TrainConfig", "DataConfig")
                   for a in g._group_actions]  # the flags cli.add_arguments made
        for action in parser._actions:
            if action.help:
                assert "".join(action.help.replace("%%", "%").split()) in text or "%(" in action.help, action.help
            if action in derived:
                intended = action.help.replace("%%", "%")  # what the user should read
                assert any(intended.startswith(h + " (default: ") for h in declared[action.dest]), action.help
                assert "".join(intended.split()) in text, (name, action.dest)
                checked += 1
    assert checked > 40
    assert any("%" in h for hs in declared.values() for h in hs)  # the case this guards stays covered
    fit = " ".join(choices["fit"].format_help().split())
    assert "recompute activations in the backward pass (less memory, ~30% slower) (default: False)" in fit


def test_fit_help_from_the_command_line():
    p = cli_main("fit", "--help")
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    assert "~30% slower" in text and "option_strings" not in text
