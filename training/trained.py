"""The result of a training session: what an export needs, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .probe import ExportProbe
from .vae import FileLayout


@dataclass(repr=False)
class Trained:
    """A fine-tuned VAE ready to export (:func:`training.export.export_vae`). The session returns it;
    in ComfyUI it travels from VAE Fine-tune to Save Fine-tuned VAE.

    model: the AutoencoderKL (fp32, CPU or the training device, eval, frozen) holding the weights to
        export: the EMA's when it was on, export_best's pick when asked for.
    layout: the base file's keys, shapes, dtypes and per-tensor hashes (the export reproduces them).
    config: the settings it was trained with.
    history: the history lines ({"step", "lr", "total", "mse", ..., "val_mse", ...}).
    base_frozen_sha256: digest of the base's untrained tensors (``vae.frozen_sha256``), re-checked at export.
    probe: patches and the base's figures for the export's half-precision check and latent scaling
        (:func:`training.probe.make_probe`); None: those checks are skipped, and the export says so.
    dataset: the training data's ``PatchDataset.summary()`` (the metadata keeps a private digest of it).
    """

    model: torch.nn.Module
    layout: FileLayout
    config: TrainConfig
    history: list[dict]
    steps_done: int
    base_frozen_sha256: str
    stopped_early: bool = False
    used_ema: bool = False
    best_step: int | None = None
    precision: str = ""
    seconds: float = 0.0
    probe: ExportProbe | None = None
    dataset: dict | None = None
    fp16_fix: dict | None = None  # what the fp16-fix settings did (LoopResult.fp16_fix); None: not used

    @property
    def weights(self) -> str:
        """Which weights the model holds: "ema" or "final", prefixed "best-" for export_best's pick."""
        return ("best-" if self.best_step is not None else "") + ("ema" if self.used_ema else "final")

    def __repr__(self) -> str:  # short: ComfyUI shows node inputs in error reports
        return (f"Trained(steps_done={self.steps_done}, base={self.layout.base_name!r}, "
                f"family={self.layout.family.name}, weights={self.weights})")
