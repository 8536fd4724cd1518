"""Exponential moving average of the trained parameters, kept by parameter name."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """The EMA of ``params`` ({name: parameter}), on their device, in their dtype (fp32 masters).

    The decay warms up as in LDM's LitEma, ``min(decay, (1 + step) / (10 + step))``, so early
    averages are not dominated by the base weights. :meth:`state_dict` is keyed by parameter name."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.names = list(params)
        self.params = list(params.values())
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int, skip: torch.Tensor) -> None:
        """Average in the weights after optimizer step ``step``; ``skip`` (0-dim, 0. or 1., on the
        device) leaves the average unchanged for a skipped step without a host sync."""
        decay = min(self.decay, (1 + step) / (10 + step))
        # shadow += w * (p - shadow) with w kept on the device: _foreach_lerp_ takes only a Python
        # number as weight, and turning ``skip`` into one would wait for the GPU every step.
        w = (1.0 - decay) * (1.0 - skip)
        delta = torch._foreach_sub([p.detach() for p in self.params], self.shadow)
        torch._foreach_mul_(delta, w)
        torch._foreach_add_(self.shadow, delta)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the parameters hold the averaged weights; the live ones come back after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, e in zip(self.params, self.shadow):
            p.data, e.data = e.data, p.data

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: e.detach().cpu().clone() for k, e in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict`'s tensors by name (the caller checked names and shapes)."""
        for k, e in zip(self.names, self.shadow):
            e.copy_(tensors[k])
