"""TrainConfig: every training hyperparameter, declared once.

The CLI flags (``python -m training fit --help``), the fine-tune node's inputs and
the exported file's metadata are all derived from these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .options import option, validate

EXPORT_DTYPES = ("fp16", "bf16", "fp32")
TRAINABLE = ("decoder", "full")


@dataclass
class TrainConfig:
    """Defaults follow Stability's sd-vae-ft-mse recipe: MSE + 0.1·LPIPS, decoder only, EMA."""

    steps: int = option(2000, "optimizer steps", min=1, max=10_000_000)
    lr: float = option(1e-5, "peak learning rate (AdamW)", gt=0.0, max=1.0)
    batch_size: int = option(4, "patches per micro-batch", min=1, max=4096)
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch_size × grad_accum)",
                             min=1, max=4096)
    mse_weight: float = option(1.0, "weight of the MSE term", min=0.0)
    l1_weight: float = option(0.0, "weight of the L1 term", min=0.0)
    lpips_weight: float = option(0.1, "weight of the LPIPS term (0 trains without it)", min=0.0)
    lpips_net: str = option("vgg", "LPIPS backbone", choices=("vgg", "alex"))
    lpips_backbone: str | None = option(None, "path of torchvision's ImageNet backbone weights for LPIPS "
                                              "(default: torchvision's cache)", node=False)
    trainable: str = option("decoder", "what is trained: 'decoder' (+ post_quant_conv; keeps the latent space) "
                                       "or 'full' (encoder too)", choices=TRAINABLE)
    ema: bool = option(True, "keep an exponential moving average of the trained weights")
    ema_decay: float = option(0.999, "EMA decay per optimizer step", min=0.0, max=1.0)
    export_ema: bool = option(True, "export the EMA weights (when ema is on)")
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(0, "linear LR warmup steps", min=0)
    lr_schedule: str = option("constant", "LR after warmup", choices=("constant", "cosine"))
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    posterior: str = option("sample", "decode a sample of the encoder's posterior (as LDM trains) or its mode",
                            choices=("sample", "mode"))
    precision: str = option("auto", "'auto' = bf16 autocast over fp32 weights on CUDA, fp32 on CPU",
                            choices=("auto", "fp32", "bf16"))
    seed: int = option(0, "seed for patches, augmentation, posterior samples", min=0, max=2**63 - 1)
    log_every: int = option(10, "steps between loss log lines / history points", min=1)
    preview_every: int = option(50, "steps between preview reconstructions (0 = off)", min=0)
    export_dtype: str = option("fp16", "dtype of the exported weights", choices=EXPORT_DTYPES, node=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
