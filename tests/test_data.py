"""Patch dataset engine: reading, sampling, split, stream determinism, CLI (augmentation: test_augment.py)."""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

skimage_data = pytest.importorskip("skimage.data")

from training import imageio as tio  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data import build_dataset, from_tensor, worker_start_method  # noqa: E402
from training.foreground import grid_positions  # noqa: E402
from training.cli import add_patches_command, run_patches  # noqa: E402
from training.errors import VAEFTError  # noqa: E402

P = 64  # patch size for most tests: small keeps the file fast


# ---------------------------------------------------------------------------------------------
# Fixture files


def png16(arr: np.ndarray) -> bytes:
    """Minimal 16-bit PNG encoder (PIL cannot write 16-bit RGB): (H, W, C) uint16, C in 1..4."""
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def linear_rgb_icc() -> bytes:
    """An ICC v2 RGB matrix/TRC profile with sRGB primaries and gamma 1.0 (linear light)."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    desc_text = b"Linear RGB test\0"
    tags = [
        (b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(desc_text)) + desc_text
         + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100) + b"\0\0"),
        (b"gTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100) + b"\0\0"),
        (b"bTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100) + b"\0\0"),
        (b"cprt", b"text\0\0\0\0none\0\0\0\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


DEEP16 = (np.random.default_rng(1).integers(3000, 60000, size=(96, 128, 3)) | 1).astype(np.uint16)
GRAY16 = (np.arange(72 * 80).reshape(72, 80) * 7 + 4001).astype(np.uint16)
TIFF16 = (np.random.default_rng(2).integers(5000, 65000, size=(80, 100, 3)) | 1).astype(np.uint16)
ROT_SRC = skimage_data.astronaut()[100:196:, 150:278]  # H=96, W=128, smooth enough for JPEG

USED = {"retina.png", "astronaut.png", "coffee.jpg", "chelsea.webp", "deep16.png", "gray16.png", "gray.png",
        "rgba.png", "palette.png", "rotated.jpg", "icc.png", "sub/deep.tiff"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import tifffile

    d = tmp_path_factory.mktemp("data")
    (d / "sub").mkdir()
    Image.fromarray(skimage_data.retina()).save(d / "retina.png", compress_level=1)
    Image.fromarray(skimage_data.astronaut()).save(d / "astronaut.png", compress_level=1)
    Image.fromarray(skimage_data.coffee()).save(d / "coffee.jpg", quality=92)
    Image.fromarray(skimage_data.chelsea()).save(d / "chelsea.webp", quality=90)
    (d / "deep16.png").write_bytes(png16(DEEP16))
    Image.fromarray(GRAY16).save(d / "gray16.png")
    Image.fromarray(skimage_data.astronaut()[:100, :120].mean(-1).astype(np.uint8)).save(d / "gray.png")
    rgba = np.full((80, 80, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :40, 3] = 0
    rgba[:40, 40:, 3] = 128
    Image.fromarray(rgba).save(d / "rgba.png")
    Image.fromarray(skimage_data.chelsea()[:100, :100]).quantize(32).save(d / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    Image.fromarray(ROT_SRC).save(d / "rotated.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(np.full((72, 72, 3), 128, np.uint8)).save(d / "icc.png", icc_profile=linear_rgb_icc())
    tifffile.imwrite(d / "sub" / "deep.tiff", TIFF16, photometric="rgb")
    good = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(good, "PNG")
    (d / "corrupt.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((32, 40, 3), 200, np.uint8)).save(d / "tiny.png")
    return d


@pytest.fixture(scope="module")
def mixed(folder):
    return build_dataset(folder, DataConfig(patch_size=P, scale_jitter=0.2))


def fg_fraction(patches: torch.Tensor, threshold: float = 0.04) -> torch.Tensor:
    """Independent foreground measure of [-1, 1] patches: Rec. 601 luminance > threshold."""
    x = (patches.double() + 1) / 2
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return (lum > threshold).double().mean(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# Reading


def test_scan_lists_used_and_skipped_with_reasons(mixed):
    s = mixed.summary()
    json.dumps(s)  # JSON-serialisable
    assert set(s["images_used"]) == USED
    assert s["images_used"] == sorted(s["images_used"])
    reasons = {e["path"]: e["reason"] for e in s["images_skipped"]}
    assert set(reasons) == {"corrupt.png", "empty.png", "notes.txt", "tiny.png"}
    assert "corrupt or truncated" in reasons["corrupt.png"]
    assert "empty file" in reasons["empty.png"]
    assert "not an image file" in reasons["notes.txt"]
    assert "smaller than the patch" in reasons["tiny.png"] and "upscale_small" in reasons["tiny.png"]
    assert s["patch_size"] == P and "black" in s["alpha"]
    assert s["bit_depth"] == {"8": 9, "16": 3}
    assert s["train_images"] + s["val_images"] == len(USED)
    assert s["val_images"] == 1  # round(12 * 0.1)
    notes = {(n["path"], n["note"]) for n in s["notes"]}
    assert ("rotated.jpg", "EXIF orientation 6 applied") in notes
    assert ("icc.png", "ICC profile 'Linear RGB test' converted to sRGB") in notes


def test_not_recursive_lists_subfolder(folder):
    s = build_dataset(folder, DataConfig(patch_size=P, recursive=False)).summary()
    assert "sub/deep.tiff" not in s["images_used"]
    assert {"path": "sub/", "reason": "subfolder not scanned (recursive is off)"} in s["images_skipped"]


def test_16bit_precision_is_kept(folder):
    for name, ref in [("deep16.png", DEEP16), ("gray16.png", GRAY16[..., None].repeat(3, -1)),
                      ("sub/deep.tiff", TIFF16)]:
        dec = tio.read_image(folder / name)
        assert dec.bits == 16 and dec.pixels.dtype == torch.uint16, name
        assert torch.equal(dec.pixels, torch.from_numpy(ref).permute(2, 0, 1)), name
        assert (ref % 257 != 0).any()  # not 8-bit values in disguise
    # ...and through to float patches: values off the 8-bit lattice
    ds = build_dataset(folder, DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0))
    i = ds.summary()["images_used"].index("deep16.png")
    x = ds._extract([ds._random_spec(i, np.random.default_rng(0), {}, 0.0)])
    steps = (x + 1) / 2 * 255
    assert (steps - steps.round()).abs().max() > 0.01


def test_exif_orientation_applied(folder):
    px = tio.read_image(folder / "rotated.jpg").pixels
    assert px.shape == (3, 128, 96)  # stored 128 wide × 96 high, displayed rotated
    shown = px.permute(1, 2, 0).numpy().astype(float)
    cw = np.rot90(ROT_SRC, k=-1).astype(float)
    assert np.abs(shown - cw).mean() < 6  # JPEG noise only
    assert np.abs(shown - np.rot90(ROT_SRC, k=1)).mean() > 20  # the other direction is wrong


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil(orientation):
    from PIL import ImageOps
    a = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3)).astype(np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    mine = tio.orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert mine.shape == ref.shape and (mine == ref).all()


def test_icc_profile_converted_to_srgb(folder):
    px = tio.read_image(folder / "icc.png").pixels
    raw = np.asarray(Image.open(folder / "icc.png"))
    assert (raw == 128).all()
    # linear 128/255 -> sRGB encoded 0.735 -> 187.5; ignoring the profile would leave 128
    assert abs(px.float().mean().item() - 187.5) < 3
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(linear_rgb_icc()))).strip() \
        == "Linear RGB test"


def test_alpha_gray_palette(folder):
    rgba = tio.read_image(folder / "rgba.png").pixels
    assert rgba.shape == (3, 80, 80)
    assert (rgba[:, :, :40] == 0).all()  # transparent -> black
    assert (rgba[:, 40:, 40:] == 200).all()  # opaque kept
    assert (rgba[:, :40, 40:] == 100).all()  # half alpha -> half
    gray = tio.read_image(folder / "gray.png").pixels
    assert gray.shape == (3, 100, 120) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    pal = tio.read_image(folder / "palette.png").pixels
    ref = np.array(Image.open(folder / "palette.png").convert("RGB"))
    assert torch.equal(pal, torch.from_numpy(ref).permute(2, 0, 1))


def test_unreadable_file_is_skipped(folder, monkeypatch):
    # tests run as root, so chmod 000 would not block reads: fake it at the read call
    real = tio.read_bytes

    def fake(path):
        if str(path).endswith("astronaut.png"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(tio, "read_bytes", fake)
    s = build_dataset(folder, DataConfig(patch_size=P)).summary()
    reasons = {e["path"]: e["reason"] for e in s["images_skipped"]}
    assert "permission denied" in reasons["astronaut.png"]
    assert "astronaut.png" not in s["images_used"]


def test_lazy_reading_matches_cache(folder):
    cfg = DataConfig(patch_size=P, scale_jitter=0.2, seed=3)
    cached = build_dataset(folder, cfg)
    lazy = build_dataset(folder, DataConfig(patch_size=P, scale_jitter=0.2, seed=3, cache_mb=1))
    assert 0 < lazy.summary()["cached_images"] < len(USED)  # 1 MiB: the small ones only
    assert cached.summary()["cached_images"] == len(USED)
    a, b = cached.train_batches(16), lazy.train_batches(16)
    for _ in range(3):
        assert torch.equal(next(a), next(b))


def test_order_signature_names_what_fixes_the_patch_stream(folder, mixed):
    """What a resume checks: patch settings and training images, not speed settings."""
    sig = mixed.order_signature()
    json.dumps(sig)  # stored in checkpoints
    assert sig["patch_size"] == P and sig["masked"] is False and "cache_mb" not in sig
    assert sorted(s.split(" ")[0] for s in sig["train_images"]) == sorted(mixed.summary()["train_paths"])
    assert all(re.fullmatch(r"\S+ \d+x\d+", s) for s in sig["train_images"])
    lazy = build_dataset(folder, DataConfig(patch_size=P, scale_jitter=0.2, cache_mb=1, num_workers=1))
    assert lazy.order_signature() == sig
    assert build_dataset(folder, DataConfig(patch_size=P)).order_signature()["scale_jitter"] == 0.0


# ---------------------------------------------------------------------------------------------
# Errors


def test_patch_size_must_be_multiple_of_8(folder):
    with pytest.raises(VAEFTError, match="multiple of 8.*use 56 or 64"):
        DataConfig(patch_size=60)
    cfg = DataConfig(patch_size=P)
    cfg.patch_size = 100
    with pytest.raises(VAEFTError, match="multiple of 8"):
        build_dataset(folder, cfg)


def test_missing_empty_and_unusable_folders(tmp_path, folder):
    with pytest.raises(VAEFTError, match="not found"):
        build_dataset(tmp_path / "nope", DataConfig(patch_size=P))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEFTError, match="is empty"):
        build_dataset(tmp_path / "empty", DataConfig(patch_size=P))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("x")
    (bad / "b.png").write_bytes(b"")
    (bad / "c.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(VAEFTError) as e:
        build_dataset(bad, DataConfig(patch_size=P))
    msg = str(e.value)
    assert "no usable image" in msg and "a.txt: not an image file" in msg and "b.png: empty file" in msg
    assert "c.jpg: not a readable image" in msg
    # patch larger than every image
    with pytest.raises(VAEFTError, match="smaller than the patch"):
        build_dataset(folder, DataConfig(patch_size=2048))


# ---------------------------------------------------------------------------------------------
# Sampling


def test_fundus_patches_are_foreground(folder, tmp_path):
    """Full-size retina photo: every sampled patch is mostly fundus, not black background."""
    (tmp_path / "retina.png").write_bytes((folder / "retina.png").read_bytes())
    ds = build_dataset(tmp_path, DataConfig(patch_size=P))
    s = ds.summary()
    assert s["train_images"] == 1 and s["val_images"] == 0 and "only 1" in s["validation"]
    with pytest.raises(VAEFTError, match="no validation images"):
        ds.val_patches(4)
    it = ds.train_batches(32)
    fg = torch.cat([fg_fraction(next(it)) for _ in range(8)])
    assert fg.min() >= 0.5 - 1e-3, fg.min()
    assert s["mean_foreground"] >= 0.5
    # the check matters: uniformly placed patches are often mostly background
    img = torch.from_numpy(skimage_data.retina()).permute(2, 0, 1).float() / 255 * 2 - 1
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 1411 - P, 256), rng.integers(0, 1411 - P, 256)
    naive = fg_fraction(torch.stack([img[:, y:y + P, x:x + P] for y, x in zip(ys, xs)]))
    assert (naive < 0.5).float().mean() > 0.15
    # bigger patches and scale jitter on the same photo
    jit = build_dataset(tmp_path, DataConfig(patch_size=256, scale_jitter=0.2))
    fg = fg_fraction(next(jit.train_batches(16)))
    assert fg.min() >= 0.45
    prev = jit.preview(9, seed=0)  # 256² patches: many cross the disc's edge
    assert prev.shape == (3, 3 * 258 + 2, 3 * 258 + 2) and prev.min() >= 0 and prev.max() <= 1
    red = (prev[0] == 1) & (prev[1] == 0) & (prev[2] == 0)
    assert red.any()  # the disc's edge is outlined where a patch crosses it


def test_black_image_is_skipped_with_reason(tmp_path):
    img = np.zeros((96, 96, 3), np.uint8)
    img[:20, :20] = 255
    Image.fromarray(img).save(tmp_path / "dark.png")
    Image.fromarray(skimage_data.astronaut()[:96, :96]).save(tmp_path / "ok.png")
    s = build_dataset(tmp_path, DataConfig(patch_size=P)).summary()
    assert s["images_used"] == ["ok.png"]
    assert "foreground" in s["images_skipped"][0]["reason"]


def test_upscale_small(tmp_path):
    Image.fromarray(skimage_data.astronaut()[:40, :48]).save(tmp_path / "small.png")
    s = build_dataset(tmp_path, DataConfig(patch_size=P, upscale_small=True)).summary()
    assert s["images_used"] == ["small.png"]
    assert {"path": "small.png", "note": "upscaled from 48×40 to 77×64"} in s["notes"]


def test_grid_covers_every_patch_once_per_epoch():
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 160, 200)
    ds = from_tensor(imgs, DataConfig(patch_size=P, sampling="grid", grid_overlap=16, foreground_threshold=0,
                                      val_fraction=0))
    ys, xs = grid_positions(160, P, 16), grid_positions(200, P, 16)
    assert ys == [0, 48, 96] and xs == [0, 48, 96, 136]
    n = 2 * len(ys) * len(xs)
    assert ds.summary()["patches_per_epoch"] == n
    q = (imgs * 65535).round() / 65535 * 2 - 1  # stored as uint16
    expected = {(b, y, x): q[b, :, y:y + P, x:x + P] for b in range(2) for y in ys for x in xs}
    it = ds.train_batches(8)
    got = torch.cat([next(it) for _ in range(n // 8)])
    hits = []
    for patch in got:
        match = [k for k, v in expected.items() if torch.allclose(patch, v, atol=1e-6)]
        assert len(match) == 1
        hits.append(match[0])
    assert sorted(hits) == sorted(expected)  # each grid patch exactly once in the epoch


def test_grid_keys_name_the_same_patch_all_run_and_random_mode_has_none():
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 96, 128)
    cfg = DataConfig(patch_size=P, sampling="grid", foreground_threshold=0, val_fraction=0, flip=False,
                     rotate90=False)
    assert not cfg.augments and DataConfig().augments
    ds = from_tensor(imgs, cfg)
    n = ds.summary()["patches_per_epoch"]
    seen: dict[int, torch.Tensor] = {}
    it = ds.train_batches(4, with_keys=True)
    for _ in range(3 * n // 4 + 1):  # three epochs (each shuffled differently) and a bit
        batch, keys = next(it)
        assert keys.dtype == torch.int64 and keys.shape == (4,)
        for patch, k in zip(batch, keys.tolist()):
            if k in seen:
                assert torch.equal(seen[k], patch)
            seen[k] = patch
    assert sorted(seen) == list(range(n))
    # resuming at batch k gives batch k's keys
    again = next(ds.train_batches(4, start_batch=5, with_keys=True))[1]
    it = ds.train_batches(4, with_keys=True)
    assert torch.equal(again, [next(it) for _ in range(6)][-1][1])
    rnd = from_tensor(imgs, DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0))
    batch, keys = next(rnd.train_batches(4, with_keys=True))
    assert keys is None and batch.shape == (4, 3, P, P)


def test_grid_mode_with_foreground(folder):
    ds = build_dataset(folder, DataConfig(patch_size=P, sampling="grid", val_fraction=0))
    s = ds.summary()
    assert s["patches_per_epoch"] > 0 and s["mean_foreground"] >= 0.5
    fg = fg_fraction(next(ds.train_batches(32)))
    assert fg.min() >= 0.5 - 1e-3


def test_mask_folder(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    img = np.zeros((128, 160, 3), np.uint8)
    img[:, :80] = (255, 0, 0)  # red left half, green right half: both bright
    img[:, 80:] = (0, 255, 0)
    mask = np.zeros((128, 160), np.uint8)
    mask[:, :80] = 255
    Image.fromarray(img).save(data / "a.png")
    Image.fromarray(img).save(data / "sub" / "b.png")
    Image.fromarray(mask).save(masks / "a.tif")  # any extension
    Image.fromarray(mask).save(masks / "sub" / "b.png")
    ds = build_dataset(data, DataConfig(patch_size=P, mask_dir=str(masks), min_foreground=1.0, val_fraction=0))
    assert ds.summary()["images_used"] == ["a.png", "sub/b.png"]
    x = torch.cat([next(ds.train_batches(16, start_batch=k)) for k in range(4)])
    assert (x[:, 0] == 1).all() and (x[:, 1] == -1).all()  # only the masked (red) half
    prev = ds.preview(4)
    assert prev.shape[0] == 3
    (masks / "sub" / "b.png").unlink()
    with pytest.raises(VAEFTError, match=r"no mask.*sub/b\.png"):
        build_dataset(data, DataConfig(patch_size=P, mask_dir=str(masks)))


# ---------------------------------------------------------------------------------------------
# Split and stream


def colour_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    colours = torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.3
    return colours[:, :, None, None].expand(n, 3, 48, 48).contiguous(), colours


def test_split_is_by_image_and_seeded():
    imgs, colours = colour_batch()

    def source(patches):  # which image each uniform patch came from
        mean = (patches.mean(dim=(2, 3)) + 1) / 2
        return [int(torch.cdist(m[None], colours).argmin()) for m in mean]

    cfg = DataConfig(patch_size=32, val_fraction=0.34, seed=5)
    ds = from_tensor(imgs, cfg)
    s = ds.summary()
    assert (s["train_images"], s["val_images"]) == (4, 2)
    val = {int(p[-4:]) for p in s["val_paths"]}
    assert from_tensor(imgs, cfg).summary()["val_paths"] == s["val_paths"]  # same seed, same split
    it = ds.train_batches(32)
    trained = {i for _ in range(5) for i in source(next(it))}
    assert trained == set(range(6)) - val  # every train image, no validation image
    assert set(source(ds.val_patches(10))) == val
    assert torch.equal(ds.val_patches(6, seed=1), ds.val_patches(6, seed=1))
    splits = {tuple(from_tensor(imgs, DataConfig(patch_size=32, val_fraction=0.34, seed=k)).summary()["val_paths"])
              for k in range(8)}
    assert len(splits) > 1  # the seed chooses the split


def test_worker_start_method():
    assert worker_start_method(importable=True) is None                       # CLI, tests: Python's default
    assert worker_start_method(importable=False, methods=["fork", "spawn", "forkserver"]) == "fork"
    assert worker_start_method(importable=False, methods=["spawn"]) is None   # Windows: main process


def test_stream_is_resumable_worker_independent_and_sharded(mixed):
    it = mixed.train_batches(4, num_workers=0)
    ref = [next(it) for _ in range(6)]
    assert all(b.shape == (4, 3, P, P) and b.dtype == torch.float32 for b in ref)
    assert all(b.min() >= -1 and b.max() <= 1 for b in ref)
    resumed = mixed.train_batches(4, start_batch=3)
    for k in range(3, 6):
        assert torch.equal(next(resumed), ref[k])
    workers = mixed.train_batches(4, num_workers=2)
    for k in range(6):
        assert torch.equal(next(workers), ref[k])
    del workers
    # the start method the ComfyUI node picks (fork: its package is not importable by name elsewhere)
    if "fork" in multiprocessing.get_all_start_methods():
        forked = mixed.train_batches(4, num_workers=1, start_method="fork")
        assert torch.equal(next(forked), ref[0])
        del forked
    r0 = mixed.train_batches(4, rank=0, world_size=2)
    r1 = mixed.train_batches(4, rank=1, world_size=2)
    for k in range(3):  # rank r's batch k is global batch 2k + r: disjoint shards of one stream
        a, b = next(r0), next(r1)
        assert torch.equal(a, ref[2 * k]) and torch.equal(b, ref[2 * k + 1])
        assert not torch.equal(a, b)
    with pytest.raises(VAEFTError, match="rank"):
        mixed.train_batches(4, rank=2, world_size=2)


def test_from_tensor():
    imgs = torch.rand(3, 3, 96, 80)
    ds = build_dataset(imgs, DataConfig(patch_size=P, foreground_threshold=0))
    s = ds.summary()
    assert s["images_used"] == ["image_0000", "image_0001", "image_0002"]
    assert s["train_images"] == 2 and s["val_images"] == 1
    b = next(ds.train_batches(5))
    assert b.shape == (5, 3, P, P) and b.min() >= -1 and b.max() <= 1
    rgba = torch.rand(1, 4, 64, 64)
    rgba[:, 3] = 0
    with pytest.raises(VAEFTError, match="no usable image"):  # all transparent = all black
        from_tensor(rgba, DataConfig(patch_size=P))
    with pytest.raises(VAEFTError, match="permute"):
        from_tensor(torch.rand(2, 96, 80, 3), DataConfig(patch_size=P))
    with pytest.raises(VAEFTError, match=r"\[0, 1\]"):
        from_tensor(imgs * 2 - 1, DataConfig(patch_size=P))


# ---------------------------------------------------------------------------------------------
# CLI


def test_patches_command(folder, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="training")
    add_patches_command(parser.add_subparsers(dest="command"))
    png = tmp_path / "out" / "grid.png"
    args = parser.parse_args(["patches", "--data", str(folder), "--patch-size", str(P), "--count", "4",
                              "--preview", str(png), "--json", "--no-flip"])
    assert args.func is run_patches
    assert run_patches(args) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    report = json.loads(out)
    assert report["patch_size"] == P and set(report["images_used"]) == USED
    assert report["sample"]["count"] == 4 and report["sample"]["shape"] == [4, 3, P, P]
    assert min(report["sample"]["foreground"]) >= 0.5
    grid = Image.open(png)
    assert grid.mode == "RGB" and grid.size == (2 * (P + 2) + 2, 2 * (P + 2) + 2)
