"""A diffusers VAE's blocks made fast for training, in place and undoably: GroupNorms swapped for the
fused kernels of :mod:`training.fused_norm` (the SiLU that follows folded in), resnet blocks and
upsamplers given forwards that keep tensors channels-last and in the autocast dtype. Parameters and
state-dict keys never change; the returned ``undo`` puts the original classes back.
"""

from __future__ import annotations

import functools

import torch

from .fused_norm import AutocastGroupNorm, FusedGroupNorm, FusedGroupNormSiLU, in_autocast_dtype, supported


def _resnet_forward(self, input_tensor: torch.Tensor, temb=None, *args, **kwargs) -> torch.Tensor:
    """diffusers ResnetBlock2D.forward for a VAE block (no time embedding, no resampling), with
    norm1/norm2 already carrying the SiLU. Unlike diffusers' it keeps the shortcut's input
    channels-last (diffusers calls .contiguous() on it, an NCHW copy) and skips the division
    when output_scale_factor is 1."""
    h = self.conv1(self.norm1(input_tensor))
    h = self.conv2(self.dropout(self.norm2(h)))
    x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    out = x + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


# PyTorch's CUDA nearest-upsample kernels (forward and backward, NCHW and NHWC) index with 32-bit
# ints: a tensor of INT_MAX elements or more is refused (at 1024² patches, micro-batch 8, the last
# up-block's output is 8 x 256 x 1024 x 1024 = 2^31).
_INDEX_LIMIT = 2**31 - 1


def _interpolate_nearest(x: torch.Tensor, output_size=None, limit: int = _INDEX_LIMIT) -> torch.Tensor:
    """F.interpolate(x, mode='nearest') to ``output_size`` (None: 2x), (N, C, H, W) -> (N, C, H', W'),
    run over slices of the batch small enough that each output stays under ``limit`` elements (one
    call, as before, whenever the whole output does)."""
    size = tuple(output_size) if output_size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
    per_sample = x.shape[1] * size[0] * size[1]
    step = max(1, (limit - 1) // max(1, per_sample))

    def up(t):
        if output_size is None:
            return torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")
        return torch.nn.functional.interpolate(t, size=output_size, mode="nearest")

    if step >= x.shape[0]:
        return up(x)
    return torch.cat([up(t) for t in x.split(step)])


def _upsample_forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
    """diffusers Upsample2D.forward (nearest 2x, then conv) with the interpolation in the autocast
    dtype: autocast runs upsample_nearest2d in fp32, which costs a cast each way and twice the
    memory traffic at the largest resolution."""
    hidden_states = in_autocast_dtype(hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):
        hidden_states = _interpolate_nearest(hidden_states, output_size)
    return self.conv(hidden_states)


@functools.cache
def _fast_class(cls: type, forward) -> type:
    return type(f"Fused{cls.__name__}", (cls,), {"forward": forward})


def _is_vae_resnet(m: torch.nn.Module) -> bool:
    return (all(hasattr(m, k) for k in ("norm1", "norm2", "conv1", "conv2", "dropout", "conv_shortcut",
                                        "nonlinearity", "output_scale_factor"))
            and getattr(m, "time_emb_proj", "missing") is None and getattr(m, "upsample", "missing") is None
            and getattr(m, "downsample", "missing") is None and isinstance(m.nonlinearity, torch.nn.SiLU)
            and getattr(m, "time_embedding_norm", "default") != "scale_shift")


def _is_plain_upsample(m: torch.nn.Module) -> bool:
    return (type(m).__name__ == "Upsample2D" and getattr(m, "use_conv", False) and getattr(m, "interpolate", False)
            and not getattr(m, "use_conv_transpose", True) and getattr(m, "norm", "missing") is None
            and getattr(m, "name", "") == "conv")


def _fusable(norm) -> bool:
    return type(norm) is torch.nn.GroupNorm and norm.affine and supported(norm.num_channels, norm.num_groups)


class _Swaps:
    """Attributes set in place on a model's modules (``__class__`` included), undone in reverse order."""

    def __init__(self):
        self.changes: list[tuple[torch.nn.Module, str, object]] = []

    def set(self, m: torch.nn.Module, attr: str, value) -> None:
        self.changes.append((m, attr, getattr(m, attr)))
        setattr(m, attr, value)

    def swap(self, m: torch.nn.Module, cls: type) -> None:
        self.set(m, "__class__", cls)

    def undo(self) -> None:
        for m, attr, old in reversed(self.changes):
            setattr(m, attr, old)
        self.changes.clear()


def autocast_group_norms(model: torch.nn.Module):
    """Swap, in place, every plain GroupNorm for AutocastGroupNorm. Returns (count, undo)."""
    swaps = _Swaps()
    for m in model.modules():
        if type(m) is torch.nn.GroupNorm:
            swaps.swap(m, AutocastGroupNorm)
    return len(swaps.changes), swaps.undo


def fuse_vae_blocks(model: torch.nn.Module):
    """Swap, in place, a diffusers VAE's GroupNorms for the fused kernel (with the SiLU that
    follows folded in), its resnet blocks and upsamplers for channels-last-friendly forwards.
    Parameters and state-dict keys do not change. Returns (GroupNorms fused, undo); undo() puts
    the original classes back."""
    swaps = _Swaps()
    swap = swaps.swap
    for m in list(model.modules()):
        if _is_vae_resnet(m) and _fusable(m.norm1) and _fusable(m.norm2):
            swap(m.norm1, FusedGroupNormSiLU)
            swap(m.norm2, FusedGroupNormSiLU)
            swap(m, _fast_class(type(m), _resnet_forward))
        elif _is_plain_upsample(m):
            swap(m, _fast_class(type(m), _upsample_forward))
        # Encoder/Decoder: conv_norm_out -> conv_act (SiLU) -> conv_out
        norm_out, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
        if isinstance(norm_out, torch.nn.GroupNorm) and isinstance(act, torch.nn.SiLU) and _fusable(norm_out):
            swap(norm_out, FusedGroupNormSiLU)
            swaps.set(m, "conv_act", torch.nn.Identity())
    for m in model.modules():  # the rest (attention's group_norm): no activation to fold
        if isinstance(m, torch.nn.GroupNorm) and _fusable(m):
            swap(m, FusedGroupNorm)

    return sum(isinstance(m, FusedGroupNorm) for m in model.modules()), swaps.undo
