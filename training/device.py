"""Where things run: this process's device (one GPU per torchrun rank) and a module's device/dtype."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import VAEFTError


@dataclass
class Distributed:
    """torchrun's view of this process; world_size 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def distributed(dist: Distributed, device: torch.device):
    """Within the block, torchrun's process group is up (NCCL on CUDA, Gloo on the CPU) when there
    are several processes; nothing happens for one."""
    if dist.world_size <= 1:
        yield
        return
    import torch.distributed  # only for a multi-process run (torchrun)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def pick_device(name: str | None = None, dist: Distributed | None = None) -> torch.device:
    """The device for ``name`` ("auto"/None: this process's GPU if there is one, else the CPU).
    A bare "cuda" means this process's GPU, so that under torchrun each rank gets its own."""
    if name and name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise VAEFTError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise VAEFTError(f"device {name!r} was asked for, but this PyTorch sees no CUDA GPU")
            if device.index is None:
                device = torch.device("cuda", dist.local_rank if dist else 0)
            if device.index >= torch.cuda.device_count():
                raise VAEFTError(f"device {str(device)!r} does not exist: this machine has "
                                 f"{torch.cuda.device_count()} CUDA GPU(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank if dist else 0)
    return torch.device("cpu")


def model_place(model: torch.nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of a module's first parameter; (None, None) for a module without any."""
    params = getattr(model, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return (p.device, p.dtype) if p is not None else (None, None)


def resolve_precision(precision: str, device: torch.device,
                      capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """The autocast dtype a run uses: ("bf16" | "fp16" | "fp32", why), for the log and the metadata.

    ``auto``: bf16 autocast where the GPU runs bf16 natively (compute capability 8.0 and newer:
    Ampere, Ada, Hopper, ...); fp16 autocast with dynamic loss scaling on the 6.x/7.x cards many
    ComfyUI users have (Pascal, Volta, Turing: GTX 10xx, RTX 20xx, T4, V100), where bf16 is
    emulated; fp32 on older GPUs and on the CPU. ``capability`` overrides the device's (tests).
    """
    device = torch.device(device)
    if precision != "auto":
        return precision, f"precision = {precision} (asked for)"
    if device.type != "cuda":
        return "fp32", f"precision auto on {device.type}: fp32"
    cc = tuple(capability or torch.cuda.get_device_capability(device))
    if cc >= (8, 0):
        return "bf16", f"precision auto: bf16 autocast (compute capability {cc[0]}.{cc[1]} runs bf16 natively)"
    if cc >= (6, 0):
        return "fp16", (f"precision auto: fp16 autocast with dynamic loss scaling (compute capability "
                        f"{cc[0]}.{cc[1]} has no native bf16)")
    return "fp32", f"precision auto: fp32 (compute capability {cc[0]}.{cc[1]} is too old for fast half precision)"
