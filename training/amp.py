"""Mixed precision without host syncs: fp16 dynamic loss scaling, and skipping a fused AdamW step on
the device.

Both use PyTorch's own primitives, the ones ``torch.amp.GradScaler`` is built on, so that a step
never waits for the GPU to say whether its gradient was finite:

- :func:`unscale_` / :func:`update_scale`: ``torch._amp_foreach_non_finite_check_and_unscale_`` and
  ``torch._amp_update_scale_`` with GradScaler's defaults (start 2**16, halve on overflow, double
  after 2000 good steps). The scale and its growth counter are device tensors kept in the loop's
  state (and so in checkpoints).
- :func:`fused_step`: the fused Adam/AdamW kernels read ``found_inf`` / ``grad_scale`` from
  attributes of the optimizer (``_step_supports_amp_scaling``); a set ``found_inf`` leaves the
  weights and moments untouched.
"""

from __future__ import annotations

import torch

INITIAL_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000


def new_scale(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scale, good steps since it last changed) for fp16 training, on ``device``."""
    return torch.full((), INITIAL_SCALE, device=device), torch.zeros((), dtype=torch.int32, device=device)


def unscale_(params, found_inf: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Divide the gradients of ``params`` by ``scale`` in place, setting ``found_inf`` (0-dim float,
    on the device) to 1 when any is inf/NaN; nothing to do without a scale (bf16/fp32)."""
    if scale is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.reciprocal())


def update_scale(scale: torch.Tensor | None, growth: torch.Tensor | None, found_inf: torch.Tensor) -> None:
    """After a step: halve ``scale`` when ``found_inf`` is set, double it after GROWTH_INTERVAL good steps."""
    if scale is not None:
        torch._amp_update_scale_(scale, growth, found_inf, 2.0, 0.5, GROWTH_INTERVAL)


def fused_step(opt: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """One step of a fused AdamW, skipped on the device when ``skip`` (0-dim, 0./1.) is set; then
    the gradients are cleared. A test checks that a set flag leaves the weights alone."""
    opt.found_inf, opt.grad_scale = skip, None
    opt.step()
    opt.zero_grad(set_to_none=True)
