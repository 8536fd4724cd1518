"""What the training loop carries from step to step besides the weights and optimizers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import amp


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides the weights and optimizers. The whole
    of it goes into a checkpoint and comes back on resume: a new field is saved and restored
    without another change. Device tensors are counted on the device (no host sync per step)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    running: dict[str, torch.Tensor] = field(default_factory=dict)  # loss sums since the last log line
    counts: dict[str, int] = field(default_factory=dict)  # steps each sum ran over (GAN terms: from disc_start)
    skipped: torch.Tensor | None = None    # non-finite steps skipped so far
    bad_run: torch.Tensor | None = None    # current streak of skipped steps
    worst_run: torch.Tensor | None = None  # the longest streak since the last log line
    # export_best's pick: params by name; "by": the validation score it was picked by (see trainer._best_by)
    best: dict = field(default_factory=lambda: {"score": float("inf"), "params": None, "step": 0, "by": None})

    loss_scale: torch.Tensor | None = None   # fp16: dynamic loss scale (GradScaler's rule, on the device)
    scale_growth: torch.Tensor | None = None  # fp16: good steps since the scale last changed

    @classmethod
    def new(cls, device: torch.device, loss_scaling: bool = False) -> "LoopState":
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        out = cls(skipped=zero(), bad_run=zero(), worst_run=zero())
        if loss_scaling:
            out.loss_scale, out.scale_growth = amp.new_scale(device)
        return out

    def add(self, parts: dict[str, torch.Tensor], skip: torch.Tensor) -> None:
        """Count one finished optimizer step: its loss terms and whether it was skipped."""
        self.bad_run.mul_(skip).add_(skip)
        torch.maximum(self.worst_run, self.bad_run, out=self.worst_run)
        self.skipped.add_(skip)
        for k, v in parts.items():
            self.running[k] = self.running.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.step += 1

    def log_line(self, lr: float) -> dict:
        """Average each term over the steps it ran since the last line; append to the history."""
        line = {k: float(v) / self.counts[k] for k, v in self.running.items()}
        line.update(step=self.step, lr=lr)
        if int(self.skipped):
            line["skipped_steps"] = int(self.skipped)
        self.history.append(line)
        self.running, self.counts = {}, {}
        return line

    def consider_best(self, score: float, weights: dict[str, torch.Tensor], by: str | None = None) -> None:
        """export_best: keep a CPU copy of ``weights`` ({name: tensor}) when ``score`` (lower is better)
        is the best yet; ``by``: the validation score it is (recorded with the pick)."""
        if score < self.best["score"]:
            self.best = {"score": score, "params": {k: t.detach().cpu().clone() for k, t in weights.items()},
                         "step": self.step, "by": by}

    def state_dict(self) -> dict:
        return {f.name: to_cpu(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device, loss_scaling: bool = False) -> "LoopState":
        """The loop state of a checkpoint, on ``device``. The fp16 loss scale comes back only when this
        run scales its loss (a run continued in bf16 or fp32 starts without one; one continued in fp16
        after another precision starts from the initial scale)."""
        names = {f.name for f in dataclasses.fields(cls)} - ({"loss_scale", "scale_growth"} if not loss_scaling else set())
        out = cls.new(device, loss_scaling)
        for k, v in state.items():
            if k in names and v is not None:
                setattr(out, k, to_device(v, device))
        return out


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj
