"""Read one image file into a CHW integer tensor (RGB, or RGBA with ``alpha``), fully decoded and validated.

Handles PNG, JPEG, WebP, TIFF and BMP; 8- and 16-bit samples; grayscale, palette, RGBA;
EXIF orientation; embedded ICC profiles (converted to sRGB). Pure PIL/numpy/torch
(torchvision and tifffile, when installed, keep 16 bits of RGB PNG and TIFF files).

Alpha: by default images with transparency are composited over black (RGB × alpha), which suits
photographs on a dark background such as fundus images, and the alpha channel is dropped. With
``alpha=True`` (how the training data is read) it is kept as a 4th channel, **straight** (not
premultiplied: the convention of :mod:`training.alpha`): PNG, WebP, GIF-like palettes with transparency,
grey + alpha, and TIFF, whose premultiplied ("associated") alpha is un-premultiplied.

Hostile files: only regular files are opened (a named pipe would block ``open`` forever, a
link to ``/dev/zero`` would be read until memory runs out), and an image's size is read
from its header and checked against :data:`MAX_PIXELS` before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from .files import describe_path
from .memory import is_out_of_memory

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".webp", ".tif", ".tiff", ".bmp")
ALPHA_POLICY = "composited over black (RGB × alpha), then dropped"
ALPHA_KEPT = "kept as the 4th channel (straight, not premultiplied)"

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112

# Pixels one decoded (and, with upscale_small, upscaled) image may have: the size at which PIL
# itself refuses a file as a decompression bomb (2 × its default MAX_IMAGE_PIXELS), ~179 MP,
# i.e. 1 GiB as 16-bit RGB. Fixed here, so a program that lifts PIL's global limit lifts not ours.
MAX_PIXELS = 2 * 89_478_485
# Bytes one image file may have: an uncompressed 16-bit RGBA image of MAX_PIXELS plus 64 MiB of
# metadata. Bigger is not an image we could use, and reading it could exhaust memory.
MAX_FILE_BYTES = MAX_PIXELS * 8 + (64 << 20)


class ImageReadError(Exception):
    """A file that cannot be used; the message is the user-facing reason (no path)."""


class ImageMemoryError(ImageReadError):
    """Out of CPU memory while decoding: the machine's state, not the file's fault (callers
    should stop rather than skip the file, or the dataset would depend on memory luck)."""


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) when it is a regular file; otherwise ImageReadError
    naming what it is. Never opens the file: opening a FIFO blocks until someone writes to it,
    and opening some devices has side effects."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = describe_path(path)
        raise ImageReadError(f"{what}, nothing to read" if what else "the file no longer exists") from None
    except PermissionError:
        raise ImageReadError("cannot examine the file (permission denied); check its permissions") from None
    except OSError as e:
        raise ImageReadError(f"cannot examine the file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{describe_path(path)}, not a regular file; only image files are read")
    return st


@dataclass
class Decoded:
    """A decoded image: ``pixels`` (3, H, W) uint8 or uint16 (4, H, W: RGBA, straight alpha, when read with
    ``alpha`` from a file that has transparency), plus what was done to it."""

    pixels: torch.Tensor
    bits: int
    notes: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    """True for a file name with a supported image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, if it is a regular file of at most :data:`MAX_FILE_BYTES`.

    Anything else raises ImageReadError without being opened (see :func:`check_regular_file`).
    The open itself is non-blocking and re-checked, so a file swapped for a FIFO between the
    check and the open cannot hang us either.
    """
    st = check_regular_file(path)
    if st.st_size > MAX_FILE_BYTES:
        raise ImageReadError(f"file of {st.st_size / 2**20:.0f} MiB is larger than any usable image "
                             f"(at most {MAX_FILE_BYTES / 2**20:.0f} MiB)")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ImageReadError("the file was replaced by something that is not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ImageReadError(f"file grew past {MAX_FILE_BYTES / 2**20:.0f} MiB while being read")
    return data


def upscaled_size(height: int, width: int, min_side: int) -> tuple[int, int]:
    """(height, width) after scaling up so the short side is at least ``min_side`` pixels (aspect
    kept, rounded up); unchanged when it already is, or when ``min_side`` is 0."""
    if min_side <= 0 or min(height, width) >= min_side:
        return height, width
    s = min_side / min(height, width)
    return max(min_side, math.ceil(height * s - 1e-6)), max(min_side, math.ceil(width * s - 1e-6))


def check_size(width: int, height: int, min_side: int = 0, max_pixels: int = MAX_PIXELS) -> None:
    """ImageReadError naming the size when a ``width``×``height`` image, after upscaling to
    ``min_side`` (see :func:`upscaled_size`), would have more than ``max_pixels`` pixels."""
    limit = f"the limit is {max_pixels / 1e6:.1f} megapixels per image"
    if width * height > max_pixels:
        raise ImageReadError(f"{width}×{height} pixels ({width * height / 1e6:.1f} megapixels) is too large to "
                             f"decode safely ({limit}); downscale it or cut it into tiles")
    uh, uw = upscaled_size(height, width, min_side)
    if uh * uw > max_pixels:
        raise ImageReadError(f"{width}×{height} pixels would be {uw}×{uh} ({uw * uh / 1e6:.1f} megapixels) "
                             f"once upscaled to the {min_side}-pixel patch ({limit}); crop it to a less "
                             "extreme shape, or turn off upscale_small to skip small images")


def read_image(path: str | os.PathLike, min_side: int = 0, alpha: bool = False) -> Decoded:
    """Decode ``path`` completely (so a corrupt file fails here, not mid-training).

    Returns (3, H, W) uint8 or uint16 in display orientation and sRGB; with ``alpha``, an image that has
    transparency as (4, H, W), straight alpha last (without it: composited over black). Raises
    :class:`ImageReadError` with a short reason on any failure: not a regular file, too large
    (checked from the header, before decoding: :func:`check_size` with ``min_side``, the short
    side it will be upscaled to), unreadable, corrupt; :class:`ImageMemoryError` when the
    machine runs out of memory decoding it.
    """
    try:
        data = read_bytes(path)
    except PermissionError:
        raise ImageReadError("cannot read the file (permission denied); check its permissions") from None
    except MemoryError:
        raise ImageMemoryError("out of CPU memory reading the file") from None
    except OSError as e:
        raise ImageReadError(f"cannot read the file ({e.strerror or e})") from None
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    return decode_image(data, min_side, alpha)


def decode_image(data: bytes, min_side: int = 0, alpha: bool = False) -> Decoded:
    """Decode encoded image bytes; see :func:`read_image`."""
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        # PIL checks the header's size against its own limit before we can see it; its message names both
        raise ImageReadError(f"too large to decode safely: {_short(e).rstrip('.')}; downscale it or cut it into "
                             "tiles") from None
    except Exception as e:  # UnidentifiedImageError and friends
        raise ImageReadError(f"not a readable image ({_short(e)})") from None
    check_size(*img.size, min_side=min_side)
    try:
        img.load()  # full decode: truncated or corrupt data raises here
        # 16-bit RGB(A) PNG and TIFF: PIL would reduce them to 8 bits.
        wide = _decode_16bit(data, img, alpha)
    except Exception as e:
        if is_out_of_memory(e):
            raise ImageMemoryError(_oom_text(img)) from None
        raise ImageReadError(f"corrupt or truncated image ({_short(e)})") from None
    if isinstance(wide, Decoded):
        return wide
    try:
        out = _from_pil(img, alpha)
    except ImageReadError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise ImageMemoryError(_oom_text(img)) from None
        raise ImageReadError(f"unsupported pixel format {img.mode} ({_short(e)})") from None
    if wide:  # a 16-bit file that only PIL could read
        out.notes.append(wide)
    return out


def _oom_text(img: Image.Image) -> str:
    w, h = img.size
    return (f"out of CPU memory decoding this {w}×{h} image (about {w * h * 6 / 2**20:.0f} MiB as 16-bit RGB); "
            "close other programs, lower cache_mb, or downscale the image")


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]


def _from_pil(img: Image.Image, keep_alpha: bool = False) -> Decoded:
    notes: list[str] = []
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    icc = img.info.get("icc_profile")

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG/TIFF): keep all 16 bits.
        arr = np.array(img)
        if arr.dtype != np.uint16:
            if arr.min() < 0 or arr.max() > 65535:
                raise ImageReadError(f"{mode} pixel values outside 0..65535 are not supported")
            arr = arr.astype(np.uint16)
        if icc:
            notes.append("ICC profile of a 16-bit image not applied (pixel values used as sRGB)")
        t = torch.from_numpy(np.ascontiguousarray(arr))[None].expand(3, -1, -1).contiguous()
        return Decoded(t, 16, notes)
    if mode == "F":
        raise ImageReadError("32-bit float images are not supported; save as 8- or 16-bit")

    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
        or (mode in ("L", "RGB") and "transparency" in img.info)
    if icc:
        img, note = _to_srgb(img, icc, has_alpha)
        if note:
            notes.append(note)
    if has_alpha:
        rgba = np.array(img.convert("RGBA"))  # straight alpha (PIL un-premultiplies an associated one)
        if keep_alpha:
            rgb = rgba
            notes.append("alpha " + ALPHA_KEPT)
        else:
            rgb = _over_black(rgba[..., :3], rgba[..., 3:], 255)
            notes.append("alpha " + ALPHA_POLICY)
    else:
        rgb = np.array(img.convert("RGB"))
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    return Decoded(t, 8, notes)


def _over_black(rgb: np.ndarray, alpha: np.ndarray, maxval: int) -> np.ndarray:
    """RGB × alpha / max, rounded, in the input's integer dtype."""
    out = (rgb.astype(np.uint64) * alpha + maxval // 2) // maxval
    return out.astype(rgb.dtype)


def _unpremultiply(colour: np.ndarray, alpha: np.ndarray, maxval: int) -> np.ndarray:
    """Straight colour from premultiplied: colour × max / alpha, rounded and clipped (0 where alpha is 0)."""
    a = alpha.astype(np.uint64)
    out = (colour.astype(np.uint64) * maxval + a // 2) // np.maximum(a, 1)
    return np.where(a > 0, np.minimum(out, maxval), 0).astype(colour.dtype)


def _to_srgb(img: Image.Image, icc: bytes, has_alpha: bool) -> tuple[Image.Image, str | None]:
    """Convert an 8-bit image with an embedded profile to sRGB (profiles named sRGB are trusted as is)."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = (ImageCms.getProfileDescription(src) or "").strip()
    except Exception:
        return img, "embedded ICC profile unreadable, ignored (pixel values used as sRGB)"
    if "srgb" in desc.lower().replace(" ", ""):
        return img, None
    alpha = None
    if img.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        img = rgba.convert("RGB")
    space = src.profile.xcolor_space.strip()
    in_mode = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK", "Lab": "LAB"}.get(space)
    if in_mode is None:
        return img, f"ICC profile '{desc}' ({space}) not supported, ignored"
    if img.mode != in_mode:
        try:
            img = img.convert(in_mode)
        except Exception:
            return img, f"ICC profile '{desc}' does not match the image mode {img.mode}, ignored"
    try:
        out = ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGB",
                                        renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except Exception as e:
        return img, f"ICC profile '{desc}' could not be applied ({_short(e)}), ignored"
    if alpha is not None:
        out.putalpha(alpha)
    return out, f"ICC profile '{desc}' converted to sRGB"


def _decode_16bit(data: bytes, img: Image.Image, keep_alpha: bool = False) -> Decoded | str | None:
    """16-bit RGB(A)/gray+alpha PNG or multi-channel TIFF at full precision (alpha kept straight with
    ``keep_alpha``, else composited over black).

    None when the file is not such an image (PIL reads it exactly); a note (str) when it is
    but the 16-bit reader is missing, so PIL's 8-bit reading is used and reported.
    """
    eight_bit = "16-bit file read at 8-bit precision (install {} to keep 16 bits)"
    arr = None
    associated = False  # premultiplied alpha (TIFF's ExtraSamples = 1); PNG's is always straight
    fmt = img.format
    if fmt == "PNG" and data[:8] == _PNG_SIGNATURE and len(data) >= 26:
        depth, color_type = data[24], data[25]
        if depth != 16 or color_type == 0:  # 16-bit gray without alpha: PIL's I;16 path is exact
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import torchvision.io as tio  # optional: a faster JPEG/PNG decoder where torchvision has one
        except ImportError:
            return eight_bit.format("torchvision")
        with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            t = tio.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=tio.ImageReadMode.UNCHANGED)
        if t.dtype not in (torch.uint16, torch.int32):  # older torchvision returns int32
            return eight_bit.format("torchvision >= 0.16")
        arr = t.permute(1, 2, 0).numpy().astype(np.uint16, copy=False)
    elif fmt == "TIFF":
        bits = img.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        if max(bits) <= 8 or img.mode.startswith("I"):
            return None
        try:
            import tifffile  # optional: 16-bit TIFFs only
        except ImportError:
            return eight_bit.format("tifffile")
        try:
            arr = tifffile.imread(io.BytesIO(data), key=0)
        except Exception as e:  # e.g. a compression tifffile cannot decode without imagecodecs
            return f"16-bit TIFF read at 8-bit precision (tifffile: {_short(e)})"
        if arr.dtype != np.uint16:
            return None
        if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar TIFF
        extra = img.tag_v2.get(338, ())
        associated = 1 in (extra if isinstance(extra, tuple) else (extra,))
    else:
        return None

    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    notes: list[str] = []
    if c in (2, 4):
        colour, a = arr[..., :c - 1], arr[..., c - 1:]
        if keep_alpha:
            if associated:
                colour = _unpremultiply(colour, a, 65535)
            arr = np.concatenate([np.repeat(colour, 3, axis=-1) if c == 2 else colour, a], axis=-1)
            notes.append("alpha " + ALPHA_KEPT + (" (un-premultiplied from the file's associated alpha)"
                                                  if associated else ""))
        else:  # over black: a premultiplied colour already is
            arr = colour if associated else _over_black(colour, a, 65535)
            notes.append("alpha " + ALPHA_POLICY)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if c not in (1, 2, 3, 4):
        raise ImageReadError(f"{c}-channel 16-bit images are not supported")
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (None, 1):
        t = orient(t, orientation)
        notes.append(f"EXIF orientation {orientation} applied")
    if img.info.get("icc_profile"):
        notes.append("ICC profile of a 16-bit image not applied (pixel values used as sRGB)")
    return Decoded(t.contiguous(), 16, notes)


def orient(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a (C, H, W) tensor, as PIL's ``exif_transpose`` does."""
    if orientation == 2:
        return t.flip(2)
    if orientation == 3:
        return t.flip(1, 2)
    if orientation == 4:
        return t.flip(1)
    if orientation == 5:
        return t.transpose(1, 2)
    if orientation == 6:  # rotate 90° clockwise
        return t.transpose(1, 2).flip(2)
    if orientation == 7:
        return t.transpose(1, 2).flip(1, 2)
    if orientation == 8:  # rotate 90° counter-clockwise
        return t.transpose(1, 2).flip(1)
    return t


# ----- pixel scaling: the one place that knows 8- and 16-bit maxima and the [-1, 1] convention

PIXEL_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8/uint16 pixels (or float already in [0, 1]) -> float32 in [0, 1]."""
    maxval = PIXEL_MAX.get(pixels.dtype)
    return pixels.to(torch.float32) / maxval if maxval else pixels.to(torch.float32)


def to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8/uint16 pixels (or float in [0, 1]) -> float32 in [-1, 1], the training convention."""
    return to_unit(pixels) * 2 - 1


def signed_to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped (for pictures and metrics)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)
