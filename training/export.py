"""Write a fine-tuned VAE: a safetensors file in its family's file layout that stock loaders accept (kl-f8:
ldm keys; Wan 2.1: the original layout ComfyUI reads), or a diffusers folder.

The file has the base file's key set and shapes (ComfyUI's Load VAE and Automatic1111's
strict ``load_state_dict`` rely on them; kl-f8 attention stored as matrices is written in the 1x1-conv
form they accept), each tensor by default in the base file's dtype, so the untrained ones are
byte-identical to the base (checked against its bytes). Every export decodes probe patches in
fp16 and bf16 and records the latent factors (:mod:`training.probe`), writes private metadata
(:mod:`training.metadata`), and returns an :class:`ExportReport`. Writes are atomic
(:mod:`training.files`): a crash, a full disk or a racing writer never leaves a half-written model,
and an existing one is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors.torch import save

from .alpha import STRAIGHT
from .config import EXPORT_DTYPES
from .errors import VAEFTError
from .files import atomic_write, atomic_write_dir
from .fp16fix import fp16_fix_note
from .metadata import export_metadata
from .probe import HALF, check_half_precision, figures_line, latent_scaling
from .tensors import dtype_names, listing, nonfinite, sha256
from .trained import Trained
from .families import trained as is_trained
from .vae import FileLayout, frozen_sha256, model_to_file

FORMATS = ("safetensors", "diffusers")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def safe_name(name: str) -> str:
    """A file-name stem that cannot leave its folder: only letters, digits, '-', '_', '.'.

    Rejects (rather than silently rewrites) names that try to climb out of the folder.
    """
    raw = name.strip()
    if not raw:
        raise VAEFTError("the save name is empty; give a name such as 'fundus'")
    if "/" in raw or "\\" in raw or raw.startswith(".") or ".." in raw or os.path.isabs(raw):
        raise VAEFTError(f"save name {name!r} must be a plain file name without folders, '..' or a leading '.'")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    stem = re.sub(r"\.safetensors$", "", stem)
    if not stem.strip("._-"):
        raise VAEFTError(f"save name {name!r} has no usable characters")
    return stem[:120]


def export_filename(name: str, steps: int) -> str:
    """``vae-ft-<name>-<steps>.safetensors``."""
    stem = safe_name(name)
    if stem.startswith("vae-ft-"):
        stem = stem[len("vae-ft-"):].strip("._-")
    return f"vae-ft-{stem}-{steps}.safetensors" if stem else f"vae-ft-{steps}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(
        dtype, str(dtype).replace("torch.", ""))


def export_dtypes(layout: FileLayout, dtype: str = "base") -> dict[str, torch.dtype]:
    """File key -> the dtype it is written in: the base file's own per tensor ('base'), or one for all."""
    if dtype not in EXPORT_DTYPES:
        raise VAEFTError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype!r}")
    # a layout without recorded dtypes (built by hand) has fp32 weights: build_vae upcasts to fp32
    base = {k: layout.dtypes.get(k, torch.float32) for k in layout.shapes}
    if dtype == "base":
        return base
    keep = layout.family.keep_dtype
    # counters stay integers; the family's statistics stay as the base stores them
    return {k: DTYPES[dtype] if d.is_floating_point and not k.startswith(keep) else d
            for k, d in base.items()}


def frozen_keys(trained: Trained) -> list[str]:
    """File keys the run did not train: the encoder and quant conv in decoder mode, and what still
    images cannot train (the Wan family's temporal resampling) in either mode."""
    family = trained.layout.family
    return [fk for fk, mk in trained.layout.module_keys.items()
            if not is_trained(mk, trained.config.trainable, family)]


def check_frozen(trained: Trained) -> None:
    """Raise if the part of the model that was not trained differs from the base (fp32 against the
    fp32 copy training started from)."""
    if frozen_sha256(trained.model, trained.config.trainable) != trained.base_frozen_sha256:
        raise VAEFTError("internal check failed: frozen weights changed during training; refusing to export")


def check_frozen_against_base(trained: Trained, fp32: dict[str, torch.Tensor]) -> None:
    """Raise unless every untrained tensor, stored in the base file's dtype, has the base file's
    exact bytes (compared with the per-tensor hashes taken when the base was loaded)."""
    check_frozen(trained)
    layout = trained.layout
    changed = []
    for k in frozen_keys(trained):
        want, dtype = layout.tensor_sha256.get(k), layout.dtypes.get(k)
        if want is None or dtype is None or dtype == torch.float64:
            continue  # nothing recorded, or a float64 base the fp32 model cannot hold exactly
        if sha256(fp32[k].to(dtype), shapes=False) != want:
            changed.append(k)
    if changed:
        raise VAEFTError(f"internal check failed: untrained tensors differ from the base file "
                         f"({', '.join(changed[:5])}); refusing to export")


def file_state_dict(trained: Trained, dtype: str = "base") -> dict[str, torch.Tensor]:
    """Trained weights under the base file's exact keys and shapes, each tensor in the base file's
    dtype (``dtype='base'``) or cast to ``dtype`` ('fp16', 'bf16', 'fp32'), contiguous on the CPU."""
    return _export_tensors(trained, dtype)[0]


def conv_form_keys(layout: FileLayout) -> list[str]:
    """File keys the base stores in another form than stock loaders take (kl-f8: attention q/k/v/proj_out
    as (C, C) matrices, which some converters write and Automatic1111 and ComfyUI reject)."""
    return layout.family.conv_form(layout.shapes)


def _export_tensors(trained: Trained, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(exported tensors, the same in fp32) after checking the untrained ones against the base.
    Attention weights are always written as 1x1 convolutions, the form every stock loader takes."""
    dtypes = export_dtypes(trained.layout, dtype)
    fp32 = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in model_to_file(trained.model, trained.layout).items()}
    check_frozen_against_base(trained, fp32)  # the hashes ignore shape: a matrix and its 1x1 conv hash alike
    for k in conv_form_keys(trained.layout):
        fp32[k] = fp32[k][:, :, None, None]
    return {k: v.to(dtypes[k]).contiguous() for k, v in fp32.items()}, fp32


def frozen_rounding(trained: Trained, tensors: dict[str, torch.Tensor],
                    fp32: dict[str, torch.Tensor]) -> str | None:
    """A warning when the export changes untrained tensors' values (a narrower dtype than the base's),
    else None. The encoder then no longer gives the base's latents exactly."""
    rounded, worst = [], 0.0
    for k in frozen_keys(trained):
        diff = (tensors[k].float() - fp32[k]).abs().max().item() if fp32[k].numel() else 0.0
        if diff > 0:
            rounded.append(k)
            worst = max(worst, diff)
    if not rounded:
        return None
    stored = sorted({_dtype_name(tensors[k].dtype) for k in rounded})
    return (f"{'/'.join(stored)} export rounds {len(rounded)} of {len(frozen_keys(trained))} untrained tensors "
            f"(the base file stores them in another dtype; largest change {worst:.2g}): the encoder is no longer "
            "bit-identical to the base, so latents move slightly. Export with dtype 'base' to keep it exact.")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None, overwrite: bool = False) -> str:
    """Atomically write ``tensors`` to ``path`` (see :func:`training.files.atomic_write`); never
    clobbers unless ``overwrite``. Refuses tensors holding NaN or infinity, naming them."""
    check_finite(tensors)
    return atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)), overwrite=overwrite,
                        what="VAE file")


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise VAEFTError naming the floating-point tensors that hold NaN or infinity.

    Such a file decodes to black or NaN images in every loader; a cast can cause it too (fp32
    values beyond fp16's ±65504 become infinite in an fp16 export)."""
    bad = nonfinite(tensors)
    if bad:
        raise VAEFTError(
            f"refusing to write: {len(bad)} tensor(s) hold NaN or infinite values ({listing(bad)}; stored as "
            f"{', '.join(dtype_names(tensors, bad))}). If training diverged, lower lr or raise grad_clip and train "
            "again; if only this dtype overflows, export as bf16 or fp32.")


def exported_model(trained: Trained, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The family's module (fp32, CPU) holding exactly the exported weights (``tensors``, file keys)."""
    model = copy.deepcopy(trained.model).cpu()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({mk: tensors[fk].float().reshape(shapes[mk]) for fk, mk in trained.layout.module_keys.items()},
                          strict=True)
    return model.eval()


@dataclass
class ExportReport:
    """What an export wrote and what the user should know about it (the CLI prints :meth:`text`,
    the Save node shows it)."""

    path: str
    format: str                     # 'safetensors' (one file, the base's layout) or 'diffusers' (a model folder)
    dtype: str                      # as requested: 'base', 'fp16', 'bf16' or 'fp32'
    stored_dtypes: dict[str, int]   # dtype name -> number of tensors written in it
    frozen: str | None              # untrained tensors vs the base file: 'identical' (byte for byte),
                                    # 'widened' (values exact, wider dtype), 'rounded'; None in full mode
    metadata: dict[str, str]
    scaling: dict = field(default_factory=dict)  # see latent_scaling
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    half_precision: dict | None = None  # see check_half_precision; None: not checked (no probe)
    converted_attention: int = 0        # attention weights the base stores as matrices, written as 1x1 convs
    frozen_what: str = "encoder, quant_conv"  # what the untrained tensors are, in the family's words
    against_base: bool = False          # a fp16-fix setting was on (the run logged val_fp16_psnr against the base):
                                        # the half-precision figures are also compared with the base's decode
    encoder_trained: bool = False       # trainable 'full': the report says how far the latents moved
    fp16_bound_db: float | None = None  # the fp16-fix run's bound on change (fp16 PSNR against the base, dB)

    @property
    def fp16_vs_base_db(self) -> float | None:
        """The fp16 decode of the probe against the base's fp32 decode (dB), when a fp16-fix setting was on."""
        if self.half_precision is None or not self.against_base:
            return None
        return self.half_precision["fine_tuned"]["fp16"].get("psnr_vs_base")

    @property
    def fp16_within_bound(self) -> bool | None:
        """Whether that PSNR is at least the bound (None: no bound or no check)."""
        db = self.fp16_vs_base_db
        return None if db is None or self.fp16_bound_db is None else db >= self.fp16_bound_db

    @property
    def fp16_safe(self) -> bool | None:
        """fp16 decodes the probe without NaN/inf or blown-out pixels, and (fp16-fix) within the bound of
        change: a decode made finite by losing the output is not called safe."""
        if self.half_precision is None:
            return None
        return bool(self.half_precision["fine_tuned"]["fp16"]["safe"] and self.fp16_within_bound is not False)

    @property
    def frozen_identical(self) -> bool | None:
        return None if self.frozen is None else self.frozen == "identical"

    def text(self) -> str:
        lines = [f"saved {self.path}" + (" (diffusers model folder)" if self.format == "diffusers" else ""),
                 "dtype: " + (f"base ({_counts(self.stored_dtypes)})" if self.dtype == "base" else self.dtype)]
        if self.frozen is not None:
            lines.append(f"untrained tensors ({self.frozen_what}): " + {
                "identical": "bit-identical to the base file", "widened": "values exact, stored wider",
                "rounded": "ROUNDED (see the warning)"}[self.frozen])
        sc = self.scaling
        if sc and "scaling_factor" in sc:
            shift = f", shift_factor {sc['shift_factor']}" if sc["shift_factor"] is not None else ""
            lines.append(f"latent scaling: scaling_factor {sc['scaling_factor']}{shift}: {sc['source']}; "
                         f"family {sc['family']} ({sc['why']})")
        elif sc:
            lines.append(f"latent statistics: per-channel mean and std of {len(sc['latents_mean'])} channels: "
                         f"{sc['source']}")
        hp = self.half_precision
        if hp is not None:
            lines.append(f"half precision, decoding {hp['patches']} with the exported weights:")
            for name in HALF:
                lines.append("  " + figures_line(name, hp["fine_tuned"][name], hp["pixels"], self.against_base))
                if name in hp["base"]:
                    lines.append("  " + figures_line(f"{name} (base)", hp["base"][name], hp["pixels"]))
            if self.encoder_trained and "latent_drift" in hp:
                lines.append(f"latent drift: the trained encoder moved the latents of those patches by "
                             f"{hp['latent_drift']:.3g} of their standard deviation (RMS); diffusion models trained "
                             "on the base's latents see that change")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _past_bound(report: ExportReport) -> list[str]:
    """The warning for a fp16 decode that is finite but moved past the fp16-fix bound (none otherwise)."""
    if report.fp16_within_bound is not False or not report.half_precision["fine_tuned"]["fp16"]["safe"]:
        return []
    return [f"NOT fp16-safe: the fp16 decode of the probe is finite but moved to {report.fp16_vs_base_db:.1f} dB "
            f"against the base's fp32 decode, past the bound of {report.fp16_bound_db:g} dB (fp16_bound_db): the "
            "output is not the base's. Run this VAE in bf16 or fp32, or train again (lower act_weight, more "
            "steps with target 'base', or a lower fp16_bound_db if that change is acceptable)"]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def export_vae(trained: Trained, path: str | os.PathLike, dtype: str | None = None, overwrite: bool = False,
               device: torch.device | str = "cpu", format: str = "safetensors", family: str = "auto",
               metadata: dict[str, str] | None = None, extra_notes: list[str] | None = None) -> ExportReport:
    """Write ``trained`` and return what was written.

    format 'safetensors': one file at ``path`` with the base's keys (loads in ComfyUI's Load VAE, diffusers'
    from_single_file, and for kl-f8 Automatic1111). 'diffusers': a model folder at ``path`` with
    config.json and diffusion_pytorch_model.safetensors (``AutoencoderKL`` / ``AutoencoderKLQwenImage`` /
    ``AutoencoderKLWan.from_pretrained(path)``).
    dtype: default the config's ``export_dtype``; 'base' = the base file's dtype per tensor.
    The half-precision check decodes ``trained.probe``'s patches with the exported weights in fp16
    and bf16 on ``device``, and the latent scaling uses its training patches; without a probe the
    check is skipped, and said so.
    family: the latent family whose scaling_factor/shift_factor go in the metadata and config.json
    ('auto': see pick_family); with trainable = 'full' they are re-estimated instead.
    metadata / extra_notes: more ``vaeft.*`` metadata and report notes (distil's: what the student was distilled from)."""
    if format not in FORMATS:
        raise VAEFTError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    dtype = dtype or trained.config.export_dtype
    tensors, fp32 = _export_tensors(trained, dtype)
    check_finite(tensors)  # before the checks below spend time on a model that cannot be written
    report = ExportReport(path=os.fspath(path), format=format, dtype=dtype, metadata={},
                          stored_dtypes=dict(Counter(_dtype_name(v.dtype) for v in tensors.values())),
                          frozen=None, converted_attention=len(conv_form_keys(trained.layout)),
                          frozen_what=trained.layout.family.frozen_what(trained.config.trainable),
                          against_base=trained.fp16_fix is not None,
                          encoder_trained=trained.config.trainable == "full")
    frozen = frozen_keys(trained)
    if frozen:
        rounding = frozen_rounding(trained, tensors, fp32)
        base = export_dtypes(trained.layout, "base")
        widened = sorted({_dtype_name(base[k]) for k in frozen if tensors[k].dtype != base[k]})
        report.frozen = "rounded" if rounding else "widened" if widened else "identical"
        if rounding:
            report.warnings.append(rounding)
        elif widened:
            report.notes.append(f"untrained tensors are stored as {dtype} where the base file has "
                                f"{'/'.join(widened)}: values exact, bytes not (dtype 'base' keeps them identical)")
    if report.converted_attention:
        report.notes.append(f"the base stores {report.converted_attention} attention weights as matrices; they are "
                            "written as 1x1 convolutions (same values), the form Automatic1111 and ComfyUI load")
    model = exported_model(trained, tensors)
    if trained.layout.family.image_channels(model) == 4:
        report.notes.append(f"a VAE of RGBA images: {STRAIGHT}, in [-1, 1] like the colours (recorded as vaeft.alpha)")
    if trained.fp16_fix is not None:
        report.notes.append(fp16_fix_note(trained.fp16_fix))
        report.fp16_bound_db = trained.fp16_fix.get("bound_db", trained.config.fp16_bound_db)
    if trained.probe is not None:
        report.half_precision, warnings, notes = check_half_precision(model, trained.probe, device)
        report.warnings += warnings + _past_bound(report)
        report.notes += notes
    else:
        report.notes.append("half precision not checked: no probe patches (make_probe after training)")
    report.scaling = latent_scaling(trained, model, trained.probe, family, device)
    report.notes += extra_notes or []
    report.metadata = export_metadata(trained, report, metadata)
    if format == "diffusers":
        write_diffusers(tensors, path, report.metadata, report.scaling, trained.layout, overwrite=overwrite)
    else:
        write_safetensors(tensors, path, report.metadata, overwrite=overwrite)
    return report


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_diffusers(tensors: dict[str, torch.Tensor], folder: str | os.PathLike, metadata: dict[str, str],
                    scaling: dict, layout: FileLayout, overwrite: bool = False) -> str:
    """Atomically write a diffusers model folder: config.json (written by diffusers' own
    ``save_config``, with the latents' scaling) and diffusion_pytorch_model.safetensors (diffusers keys
    and shapes, each tensor in the dtype it has in ``tensors``). Refuses NaN/inf tensors like
    write_safetensors."""
    check_finite(tensors)
    model = layout.family.diffusers_model(tensors, scaling, layout.base_name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = {mk: tensors[fk].reshape(shapes[mk]).contiguous() for fk, mk in layout.module_keys.items() if mk in shapes}
    if set(weights) != set(shapes) or len(weights) != len(tensors):  # never write a folder that fails to load
        raise VAEFTError(f"internal check failed: diffusers keys do not match (missing {sorted(set(shapes) - set(weights))[:3]})")
    meta = {"format": "pt", **metadata}  # 'format' is what diffusers/transformers' own writer puts there

    def write(tmp):
        model.save_config(tmp)
        with open(os.path.join(tmp, DIFFUSERS_WEIGHTS), "wb") as f:
            f.write(save(weights, metadata=meta))

    return atomic_write_dir(folder, write, overwrite=overwrite, what="diffusers model folder")

