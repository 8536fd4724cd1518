"""Every setting, declared once: :class:`DataConfig` (how patches are cut) and :class:`TrainConfig`
(how they are trained on).

The CLI flags (``python -m training fit --help``), the nodes' inputs, a run folder's config.json and
the exported file's metadata are all derived from these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import VAEFTError
from .options import option, validate

EXPORT_DTYPES = ("base", "fp16", "bf16", "fp32")
CELL = 8  # patch sides and corners are multiples of this (the VAE's downsampling factor)
TRAINABLE = ("decoder", "full")


@dataclass
class DataConfig:
    """How patches are cut from the images. Every field is a CLI flag and a node input (essential ones on
    VAE Patch Dataset, the rest on VAE Patch Options)."""

    patch_size: int = option(256, "patch side in pixels (a multiple of 8)", min=8, max=4096, essential=True)
    sampling: str = option("random", "'random' patches (image picked uniformly, then position) or a "
                                     "'grid' covering every image once per epoch", choices=("random", "grid"),
                         essential=True)
    grid_overlap: int = option(0, "overlap of neighbouring grid patches, pixels (grid sampling)", min=0)
    scale_jitter: float = option(0.0, "random scale: crop patch×s, s in [1-j, 1+j], resized to the patch "
                                      "(0 = off; random sampling only)", min=0.0, max=0.9)
    foreground_threshold: float = option(0.04, "a pixel is foreground when its luminance (0..1) is above "
                                               "this (0 = no automatic masking)", min=0.0, max=1.0,
                                         essential=True)
    min_foreground: float = option(0.5, "keep a patch only if at least this fraction is foreground",
                                   min=0.0, max=1.0)
    mask_dir: str | None = option(None, "folder of masks with the images' relative names (white = use); "
                                        "replaces the automatic foreground")
    upscale_small: bool = option(False, "upscale images smaller than the patch (else they are skipped)")
    val_fraction: float = option(0.1, "fraction of images held out for validation (at least 1 when there "
                                      "are 2 or more images; 0 = none)", min=0.0, max=0.9,
                                 essential=True)
    flip: bool = option(True, "augment: random horizontal and vertical flips")
    rotate90: bool = option(True, "augment: random 90° rotations")
    color_jitter: float = option(0.0, "augment: brightness/contrast/saturation factors in [1-c, 1+c] "
                                      "(0 = off)", min=0.0, max=0.5)
    cache_mb: int = option(4096, "keep decoded images in memory up to this many MiB; the rest are "
                                 "re-read from disk when sampled", min=0)
    num_workers: int = option(0, "data loader worker processes (0 = in the training process)", min=0, max=64)
    seed: int = option(0, "seed for the split, patch positions and augmentation", min=0, max=2**63 - 1,
                       essential=True)
    recursive: bool = option(True, "search subfolders of the data folder")
    fg_tries: int = option(16, "tries per patch to find a jittered crop with enough foreground before "
                               "falling back to an unjittered one", min=1, max=1000)

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def augments(self) -> bool:
        """Whether :func:`training.augment.augment` changes anything (else a grid patch set is fixed)."""
        return self.flip or self.rotate90 or self.color_jitter > 0


def check_config(cfg: DataConfig) -> None:
    """Raise VAEFTError for an invalid setting (bounds, patch size multiple of 8, overlap < patch)."""
    validate(cfg)
    p = cfg.patch_size
    if p % CELL:
        lo, hi = max(CELL, p // CELL * CELL), (p // CELL + 1) * CELL
        raise VAEFTError(f"patch_size must be a positive multiple of 8 (the VAE downsamples by 8); "
                         f"got {p}: use {lo} or {hi}")
    if cfg.grid_overlap >= p:
        raise VAEFTError(f"grid_overlap ({cfg.grid_overlap}) must be smaller than patch_size ({p})")


# Each recipe is a full set of defaults for the fields it names; anything passed explicitly
# (CLI flag, changed node widget) overrides it.
RECIPES: dict[str, dict] = {
    # Stability's sd-vae-ft-mse: decoder fine-tuned with MSE + 0.1·LPIPS, EMA weights released.
    "sd-vae-ft-mse": dict(mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=0.0, gan_weight=0.0,
                          trainable="decoder"),
    # Stability's sd-vae-ft-ema: the original LDM reconstruction loss, L1 + LPIPS.
    "sd-vae-ft-ema": dict(mse_weight=0.0, l1_weight=1.0, lpips_weight=1.0, kl_weight=0.0, gan_weight=0.0,
                          trainable="decoder"),
    # LDM's autoencoder loss: L1 + LPIPS + KL + PatchGAN hinge loss with the adaptive weight, the
    # discriminator switched on at disc_start (LDM trained from scratch used 50001; a fine-tune needs less).
    "ldm-gan": dict(mse_weight=0.0, l1_weight=1.0, lpips_weight=1.0, kl_weight=1e-6, gan_weight=0.5,
                    disc_start=1000, trainable="decoder"),
    # Make a VAE safe in fp16 and keep its output (issue 21; cf. madebyollin's sdxl-vae-fp16-fix): the
    # decoder learns the base VAE's own fp32 decode (any images serve), MSE + 0.1·LPIPS on it, plus a
    # penalty on activations above act_threshold, after an exact rescaling head start.
    "fp16-fix": dict(mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=0.0, gan_weight=0.0,
                     trainable="decoder", target="base", act_weight=1.0, exact_rescale=True),
    # distil (issue 30): a faster student decoder learns the teacher's decode of the teacher's latents (the target is
    # the teacher's decode, not the images); MSE + 0.1·LPIPS on it. A narrow student starts from the teacher's
    # weights, a tiny one from random: it gets a larger step.
    "distil-narrow": dict(mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=0.0, gan_weight=0.0,
                          trainable="decoder", lr=1e-4),
    "distil-tiny": dict(mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=0.0, gan_weight=0.0,
                        trainable="decoder", lr=5e-4),
}


@dataclass(frozen=True)
class MemoryPreset:
    """What a GPU memory size allows: at most ``patches_512`` 512² patches per forward pass (scaled
    by area for other patch sizes; None = the largest that fits, found by retrying smaller on
    out-of-memory), gradient checkpointing, and the latent cache's size (MiB)."""

    patches_512: int | None
    grad_checkpointing: bool
    latent_cache_mb: int
    gib: float | None = None  # the card's memory (None: auto, whatever the device has)


# Sized from bench/RESULTS.md (H100, SD kl-f8, decoder + EMA + LPIPS-VGG, bf16, fused GroupNorm, 512²):
# micro-batch 4 peaks at 12.5 GiB allocated without checkpointing and 6.3 GiB with it, about
# 2.9 / 1.35 GiB per patch over ~0.9 GiB of weights and optimizer state. Each preset leaves room for
# the CUDA context and, without Triton, PyTorch's GroupNorm (~1.3x the memory).
MEMORY_PRESETS: dict[str, MemoryPreset] = {
    "auto": MemoryPreset(None, False, 2048),
    "6GB": MemoryPreset(1, True, 256, 6),
    "8GB": MemoryPreset(2, True, 512, 8),
    "12GB": MemoryPreset(4, True, 1024, 12),
    "24GB+": MemoryPreset(4, False, 2048, 24),
}
MEMORY_FIELDS = ("micro_batch", "grad_checkpointing", "latent_cache_mb")
# Bytes per parameter a run holds before any activation: fp32 master weights, and for each trained one its
# gradient and AdamW's two moments (and the EMA copy when on); the CUDA context takes about 1 GiB besides, and
# one checkpointed patch's activations at least another.
_TRAINED_BYTES, _EMA_BYTES, _FROZEN_BYTES, _CONTEXT_GIB = 16, 4, 4, 2.0


def check_preset_holds(cfg: "TrainConfig", trained_params: int, frozen_params: int, what: str) -> None:
    """Refuse a memory preset whose card cannot even hold the run's weights and optimizer state (a family
    whose decoder is ten times kl-f8's, like Wan 2.2's), naming the preset, what it holds and the way out,
    before anything is written. The presets' micro-batches were sized on kl-f8 (bench/RESULTS.md)."""
    preset = MEMORY_PRESETS.get(cfg.memory)
    if preset is None or preset.gib is None:
        return
    held = (trained_params * (_TRAINED_BYTES + (_EMA_BYTES if cfg.ema else 0)) + frozen_params * _FROZEN_BYTES) / 2 ** 30
    if held + _CONTEXT_GIB > preset.gib:
        fits = [name for name, p in MEMORY_PRESETS.items() if p.gib is not None and held + _CONTEXT_GIB <= p.gib]
        raise VAEFTError(f"memory preset {cfg.memory} cannot train {what}: its weights, the trained tensors' "
                         f"gradients and AdamW moments{' and the EMA copy' if cfg.ema else ''} alone take "
                         f"{held:.1f} GiB, and with the CUDA context and one patch's activations (~{_CONTEXT_GIB:g} GiB) that "
                         f"is over a {preset.gib:g} GB card. "
                         + (f"Choose {' or '.join(fits)} (or auto on a larger card)" if fits else
                            "No preset fits: use auto on a card with more memory")
                         + (", or turn ema off (--no-ema; the options node's ema; saves "
                            f"{trained_params * _EMA_BYTES / 2 ** 30:.1f} GiB)" if cfg.ema else "")
                         + ".")


def memory_settings(preset: str, batch_size: int, patch_size: int) -> dict:
    """The values of MEMORY_FIELDS that ``preset`` picks for this batch and patch side (pixels).

    The micro-batch is the largest divisor of ``batch_size`` within the preset's pixel budget (at
    least 1, so a patch too large for the budget still runs one at a time); "auto" keeps 0, the
    trainer's largest-that-fits search.
    """
    if preset not in MEMORY_PRESETS:
        raise VAEFTError(f"unknown memory preset {preset!r}; choose one of {', '.join(MEMORY_PRESETS)}")
    p = MEMORY_PRESETS[preset]
    micro = 0
    if p.patches_512 is not None:
        cap = max(1, p.patches_512 * 512 * 512 // (patch_size * patch_size))
        micro = max(d for d in range(1, max(1, min(cap, batch_size)) + 1) if batch_size % d == 0)
    return {"micro_batch": micro, "grad_checkpointing": p.grad_checkpointing, "latent_cache_mb": p.latent_cache_mb}


@dataclass
class TrainConfig:
    """Defaults are Stability's sd-vae-ft-mse recipe: MSE + 0.1·LPIPS, decoder only, EMA."""

    recipe: str = option("sd-vae-ft-mse", "loss recipe; its values are the defaults of the loss weights "
                                          "('custom' = exactly the values given; 'fp16-fix' makes a VAE safe "
                                          "in fp16 and keeps its output)",
                         choices=tuple(RECIPES) + ("custom",), essential=True)
    steps: int = option(2000, "optimizer steps", min=1, max=10_000_000, essential=True)
    lr: float = option(1e-5, "peak learning rate (AdamW)", gt=0.0, max=1.0, ui_step=1e-8, essential=True)
    batch_size: int = option(4, "patches per optimizer step (the effective batch, over all GPUs)",
                             min=1, max=65536, essential=True)
    memory: str = option("auto", "GPU memory preset: sets micro_batch, grad_checkpointing and latent_cache_mb for "
                                 "a card of this size (a value given for one of those wins); 'auto' = the "
                                 "largest micro-batch that fits, no checkpointing",
                         choices=tuple(MEMORY_PRESETS), essential=True)
    micro_batch: int = option(0, "patches per forward pass; batch_size must be a multiple. 0 = auto: "
                                 "the largest that fits in GPU memory (found by retrying smaller on "
                                 "out-of-memory)", min=0, max=65536)
    mse_weight: float = option(1.0, "weight of the MSE term", min=0.0)
    l1_weight: float = option(0.0, "weight of the L1 term", min=0.0)
    lpips_weight: float = option(0.1, "weight of the LPIPS term (0 trains without it)", min=0.0)
    kl_weight: float = option(0.0, "weight of the KL term (only matters when the encoder trains)", min=0.0,
                              ui_step=1e-8)
    gan_weight: float = option(0.0, "weight of the PatchGAN hinge loss (scaled by LDM's adaptive weight; "
                                    "0 = no discriminator)", min=0.0)
    disc_start: int = option(0, "optimizer step at which the discriminator loss switches on", min=0)
    latent_weight: float = option(0.0, "full mode: weight of an MSE that keeps the encoder's latents close "
                                        "to the base encoder's", min=0.0)
    lpips_net: str = option("vgg", "LPIPS backbone", choices=("vgg", "alex"))
    lpips_backbone: str | None = option(None, "path of torchvision's ImageNet backbone weights for LPIPS "
                                              "(default: torchvision's cache)", node=False)
    trainable: str = option("decoder", "what is trained: 'decoder' (+ post_quant_conv; keeps the latent space) "
                                       "or 'full' (encoder too)", choices=TRAINABLE, essential=True)
    ema: bool = option(True, "keep an exponential moving average of the trained weights")
    ema_decay: float = option(0.999, "EMA decay per optimizer step", min=0.0, max=1.0, ui_step=1e-6)
    export_ema: bool = option(True, "export the EMA weights (when ema is on)")
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0, ui_step=1e-6)
    warmup_steps: int = option(0, "linear LR warmup steps", min=0)
    lr_schedule: str = option("constant", "LR after warmup", choices=("constant", "cosine"))
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    posterior: str = option("sample", "decode a sample of the encoder's posterior (as LDM trains) or its mode",
                            choices=("sample", "mode"))
    precision: str = option("auto", "autocast over fp32 weights. 'auto': bf16 on GPUs that run it natively "
                                    "(compute capability 8.0+), fp16 with loss scaling on older ones (GTX 10xx, "
                                    "RTX 20xx, T4, V100), fp32 on the CPU",
                            choices=("auto", "fp32", "bf16", "fp16"))
    latent_cache_mb: int = option(2048, "decoder training on a fixed patch set (grid sampling, no augmentation): "
                                        "keep each patch's encoder output, up to this many MiB on the "
                                        "training device, and skip the encoder when the patch comes round "
                                        "again (0 = off)", min=0)
    fused_norm: bool = option(True, "on CUDA with Triton: GroupNorm and the SiLU after it as one fused "
                                    "channels-last kernel, and the whole model channels-last (fastest)")
    channels_last: bool = option(False, "without fused_norm: channels-last layout on CUDA anyway (slower: "
                                        "PyTorch's GroupNorm copies channels-last tensors)")
    norm_in_bf16: bool = option(True, "without fused_norm, under bf16 autocast: run PyTorch's GroupNorm in "
                                      "bf16 (autocast keeps it in fp32, which costs casts and memory traffic)")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, "
                                             "~30% slower)")
    compile: bool = option(False, "torch.compile the model (slow first steps, faster after)")
    max_bad_steps: int = option(20, "stop after this many consecutive steps with a non-finite loss or "
                                    "gradient (each is skipped); noticed at the next log step", min=1)
    seed: int = option(0, "seed for patches, augmentation, posterior samples", min=0, max=2**63 - 1,
                       essential=True)
    log_every: int = option(10, "steps between loss log lines / history points", min=1)
    preview_every: int = option(50, "steps between preview reconstructions (0 = off)", min=0)
    val_every: int = option(200, "steps between validation scores (MSE, PSNR, LPIPS) on held-out patches, the "
                                 "base VAE's scored before the first step (0 = off; off by itself when the "
                                 "dataset has no held-out images)", min=0)
    val_patches: int = option(16, "held-out patches used for validation", min=1, max=4096)
    export_best: bool = option(False, "export the weights with the best validation LPIPS (validation MSE "
                                      "when LPIPS is off) instead of the last ones; with target 'base' (the "
                                      "fp16-fix recipe): the best val_fp16_psnr, the fp16 decode of the held-out "
                                      "patches against the base's fp32 decode")
    checkpoint_every: int = option(500, "steps between resumable checkpoints (0: by time only). Written where "
                                      "a run folder, --checkpoint or --resume says; always at the last step "
                                      "and when the run is stopped", min=0)
    checkpoint_minutes: float = option(10.0, "also checkpoint when this many minutes passed since the last "
                                             "checkpoint (0 = by steps only): a crash loses at most this much",
                                       min=0.0)
    keep_checkpoints: int = option(3, "checkpoints kept in a run folder (the oldest are removed)", min=1, max=1000)
    export_dtype: str = option("base", "dtype of the exported weights: 'base' = each tensor in the base file's "
                                       "dtype (the untrained ones stay bit-identical); fp16/bf16/fp32 cast all",
                               choices=EXPORT_DTYPES, node=False)
    # (last: a new node widget goes at the end, so saved workflows' widget values keep their places)
    wan_2d: bool = option(True, "Wan 2.1 / Qwen-Image VAEs: at one frame run each causal 3D convolution as a 2D "
                                "convolution with its last temporal tap (exact, several times faster, allows "
                                "grad_checkpointing); off: diffusers' own 3D forward")
    # the fp16-fix recipe's settings (issue 21), after wan_2d for the same reason
    target: str = option("images", "what the decoder learns to output: 'images' (the patches themselves) or "
                                   "'base' (the base VAE's own fp32 decode of the same latents: keeps its look; "
                                   "the fp16-fix recipe)", choices=("images", "base"))
    act_weight: float = option(0.0, "weight of the activation penalty: mean(relu(|a|/act_threshold - 1)^2) "
                                    "summed over the decoder's layers (0 = off; the fp16-fix recipe: 1)", min=0.0)
    act_threshold: float = option(4096.0, "activations above this are penalised (fp16's largest value is 65504; "
                                          "the margin keeps fp16 decodes safe on other images)",
                                  min=1.0, max=65504.0)
    exact_rescale: bool = option(False, "before training, scale down (by powers of two) the decoder's layers "
                                        "that feed only a normalisation, and its residual stream, to at most "
                                        "act_threshold/8: the output stays equal (checked), activations get smaller; "
                                        "where that is not exact (a stream that grows inside a segment), the "
                                        "mildest measured scale that fits fp16, within fp16_bound_db")
    stop_when_safe: bool = option(False, "stop at a validation step (or before the first step, after "
                                         "exact_rescale) where the fp16 decode of the held-out patches is finite "
                                         "and no activation exceeds act_threshold (or the threshold a measured "
                                         "rescaling chose), within fp16_bound_db of the base's decode")
    # issue 31, after the fp16-fix settings for the same reason
    latent_noise: float = option(0.0, "decode latents near the encoder's, not only its own: the decoder gets the latent "
                                      "plus Gaussian noise of this many times the patch's per-channel latent std, drawn "
                                      "per patch (a sampler's latents are slightly off the encoder's manifold; 0 = off). "
                                      "Validation then also scores decodes of noisy held-out latents (val_noisy_*)",
                                 min=0.0, max=2.0, ui_step=0.01)
    # issue 33 (CLI only: the node keeps the default, and saved workflows their widget lists)
    fp16_bound_db: float = option(30.0, "the fp16-fix recipe's bound on change: a decode whose fp16 PSNR against "
                                        "the base's fp32 decode (held-out patches) is below this many dB is never "
                                        "called fp16-safe, and a rescaling that costs more is not applied",
                                  min=0.0, max=100.0, node=False)
    # issue 30 (distil only: the fine-tune node keeps its widget list; the Distil node adds it)
    image_weight: float = option(0.0, "distil: weight of the same loss against the images themselves, beside the "
                                      "teacher's decode (0 = the student learns the teacher's decode only)",
                                 min=0.0, max=10.0, node=False, ui_step=0.01)

    def __post_init__(self) -> None:
        validate(self)
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise VAEFTError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch "
                             f"({self.micro_batch}): the effective batch is reached by accumulating micro-batches")
        if self.mse_weight == 0 and self.l1_weight == 0 and self.lpips_weight == 0:
            raise VAEFTError("mse_weight, l1_weight and lpips_weight are all 0: nothing to train on")
        if self.export_best and not self.val_every:
            raise VAEFTError("export_best needs validation: set val_every > 0")
        if self.latent_weight and self.trainable != "full":
            raise VAEFTError("latent_weight only applies when trainable = 'full' (the encoder must train)")
        if self.stop_when_safe and not self.val_every:
            raise VAEFTError("stop_when_safe needs validation (it checks the held-out patches in fp16): set "
                             "val_every > 0")
        if self.gan_weight > 0 and self.disc_start >= self.steps:
            raise VAEFTError(f"disc_start ({self.disc_start}) is not below steps ({self.steps}): the "
                             "discriminator would never switch on; lower disc_start, raise steps, or set "
                             "gan_weight to 0")

    @classmethod
    def from_recipe(cls, recipe: str = "sd-vae-ft-mse", patch_size: int | None = None,
                    **overrides) -> "TrainConfig":
        """The recipe's values for the fields it names, then the memory preset's (``overrides``'
        ``memory``, sized for ``patch_size``, default DataConfig's) for MEMORY_FIELDS, then ``overrides``."""
        if recipe != "custom" and recipe not in RECIPES:
            raise VAEFTError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)} or 'custom'")
        values = dict(RECIPES.get(recipe, {}))
        values.update(overrides)
        if patch_size is None:
            patch_size = DataConfig.patch_size
        memory = values.get("memory", cls.memory)
        batch = values.get("batch_size", cls.batch_size)
        for k, v in memory_settings(memory, batch, patch_size).items():
            values.setdefault(k, v)
        return cls(recipe=recipe, **values)

    def recipe_label(self) -> str:
        """The recipe name, or 'custom (from X: field, ...)' when fields differ from it."""
        preset = RECIPES.get(self.recipe)
        if preset is None:
            return "custom"
        changed = [k for k, v in preset.items() if getattr(self, k) != v]
        return self.recipe if not changed else f"custom (from {self.recipe}: {', '.join(changed)})"

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class DistilConfig:
    """What ``distil`` trains (issue 30): every field is a flag of ``python -m training distil`` and an input of the
    VAE Distil Decoder node; the training itself is a :class:`TrainConfig` (recipe distil-narrow / distil-tiny)."""

    student: str = option("narrow", "'narrow': the teacher's own layout with a narrower decoder (a drop-in VAE file); "
                                    "'tiny': a TAESD-layout decoder for ComfyUI's previews (models/vae_approx)",
                          choices=("narrow", "tiny"), essential=True)
    width: int = option(64, "narrow: the student decoder's base width; every level scales alike (the teacher's is 128 "
                            "for SD/SDXL/SD3/Flux.1/Flux.2 VAEs); a multiple of 32 below the teacher's",
                        min=32, max=4096, essential=True)
    with_encoder: bool = option(False, "tiny: also train the matching tiny encoder, so that Load VAE offers the pair")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def label(self) -> str:
        """'narrow-64' or 'tiny' (with '+encoder')."""
        return f"narrow-{self.width}" if self.student == "narrow" else "tiny" + ("+encoder" if self.with_encoder else "")
