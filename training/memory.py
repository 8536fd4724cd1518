"""Running out of memory, named: one place turns an allocator failure (the GPU's or the CPU's) into a
VAEFTError that says what was being done and what to change.

PyTorch reports a full GPU as ``torch.OutOfMemoryError`` and a failed CPU allocation as a
``RuntimeError`` from its CPU allocator (or Python's ``MemoryError``). On Linux a large CPU
allocation often "succeeds" (the kernel overcommits) and the process is killed later while filling
it, so :func:`check_cpu_memory` refuses what cannot fit before allocating it.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import VAEFTError

_CPU_SIGNS = ("can't allocate memory", "DefaultCPUAllocator", "not enough memory")


def memory_kind(e: BaseException) -> str | None:
    """"CPU" or "GPU" when ``e`` is an allocator failure of that device, else None."""
    text = str(e)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(s in text for s in _CPU_SIGNS)):
        return "CPU"
    if isinstance(e, torch.OutOfMemoryError):
        return "GPU"
    return None


def is_out_of_memory(e: BaseException) -> bool:
    return memory_kind(e) is not None


def _detail(e: BaseException, kind: str) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    # the CPU allocator's own sentence is its last line; CUDA's first line says how much was asked for
    return (lines[-1][:200] if kind == "CPU" else lines[0][:300])


@contextlib.contextmanager
def out_of_memory_named(what: str, hint: str):
    """Within the block, an allocator failure (GPU or CPU) becomes a VAEFTError:
    ``out of <GPU|CPU> memory <what> (<the allocator's words>); <hint>``. Other errors pass unchanged."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        kind = memory_kind(e)
        if kind is None:
            raise
        raise VAEFTError(f"out of {kind} memory {what} ({_detail(e, kind)}); {hint}") from None


def available_memory() -> int | None:
    """Bytes of CPU memory the kernel can give without swapping (Linux MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_cpu_memory(nbytes: int, what: str, hint: str) -> None:
    """VAEFTError before allocating ``nbytes`` that cannot fit in the CPU memory available now."""
    if nbytes < 256 << 20:  # small: not worth reading /proc per batch
        return
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise VAEFTError(f"out of CPU memory {what}: it needs {nbytes / 2**30:.1f} GiB, "
                         f"{avail / 2**30:.1f} GiB is available; {hint}")
