"""Facts about tensors that several parts of the tool rely on: a content digest and a finiteness check.

One digest serves every purpose (a base VAE's identity, a checkpoint's integrity, one tensor's
bytes): sha256 over each tensor's name, dtype, shape and bytes, walking nested dicts (keys in sorted
order), lists and tuples. A flat state dict hashes as ``name|dtype|shape|bytes`` per key.
"""

from __future__ import annotations

import hashlib

import torch


def sha256(obj, *, shapes: bool = True) -> str:
    """Hex sha256 of every tensor in ``obj`` (a tensor, or nested dicts / lists / tuples of them;
    other values are not part of it), in a fixed order: dict keys sorted by their text.

    ``shapes=False`` leaves shapes out, for a single tensor whose layout may legitimately differ (an
    attention weight stored as a (C, C) matrix or a (C, C, 1, 1) convolution holds the same bytes)."""
    h = hashlib.sha256()

    def walk(o, where: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update((f"{where}|{t.dtype}|{tuple(t.shape)}|" if shapes else f"{where}|{t.dtype}|").encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{where}/{k}" if where else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]")

    walk(obj, "")
    return h.hexdigest()


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold NaN or infinity, in order."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def dtype_names(tensors: dict[str, torch.Tensor], keys: list[str]) -> list[str]:
    """The sorted dtype names ("float16", ...) of ``keys`` in ``tensors``."""
    return sorted({str(tensors[k].dtype).replace("torch.", "") for k in keys})


def listing(names: list[str], shown: int = 5) -> str:
    """``a, b, c and N more`` for messages."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
