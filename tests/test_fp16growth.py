"""The fp16-fix recipe on overflow that grows inside the residual stream (issue 33): a residual branch that
adds a huge output (the mid block's), a stream that grows block by block along the up path, an attention
block's output; in kl-f8, Flux.2 and Wan 2.1 VAEs. The stream cannot be rescaled exactly there (its early,
ordinary part meets the GroupNorms' epsilon), so the measured rescaling picks the mildest scale that fits
and measures what it costs. The oracle: ComfyUI's own classes decode the rescaled file in fp16 (COMFYUI_PATH)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys

import pytest
import torch
from conftest import tiny_ldm_sd, train
from family_examples import flux2_comfyui, flux2_file, wan_file
from safetensors import safe_open

from training.config import TrainConfig
from training.export import export_vae
from training.fp16fix import FP16Fix, base_decode, rescale_for_fp16
from training.probe import FP16_MAX, make_probe, psnr
from training.vae import build_vae

COMFY = os.environ.get("COMFYUI_PATH", "")
needs_comfy = pytest.mark.skipif(not COMFY or not os.path.isfile(os.path.join(COMFY, "main.py")),
                                 reason="set COMFYUI_PATH to a ComfyUI checkout to decode with its own classes")
BOUND_DB = TrainConfig().fp16_bound_db

# file-layout layers (weight and bias) scaled, with their factors: how each case's overflow grows
LDM_BLOCKS = ["mid.block_1", "mid.block_2", "up.1.block.0", "up.1.block.1", "up.0.block.0", "up.0.block.1"]
CASES = {
    "mid": {"decoder.mid.block_1.conv2": 1e5},  # the mid block's residual branch (the case)
    "attention": {"decoder.mid.attn_1.proj_out": 4e5},  # the mid block's attention adds a huge output
    # each block's branch 8x the previous one's: the stream grows block by block, in every segment of the up path
    "growing": {f"decoder.{b}.conv2": 8.0 ** (i + 1) for i, b in enumerate(LDM_BLOCKS)},
    # Wan 2.1 (tiny: one 3D upsampler): the segment after it grows from a shortcut block (8x) to a huge branch
    "wan-growing": {"decoder.upsamples.3.residual.6": 8.0, "decoder.upsamples.4.residual.6": 1e6},
}
FILES = {"kl-f8": lambda: tiny_ldm_sd(seed=1), "flux2": lambda: flux2_file(2), "wan2.1": lambda: wan_file(3)}


def overflowing(family: str, case: str) -> dict[str, torch.Tensor]:
    sd = FILES[family]()
    for layer, factor in CASES[case].items():
        for k in (f"{layer}.weight", f"{layer}.bias"):
            sd[k] = (sd[k].float() * factor).to(sd[k].dtype)
    return sd


def latents(model, n=1, side=4, seed=0):
    c = model.decoder.conv_in.weight.shape[1]
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def file_tensors(vae, model) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the file's keys, in the file's dtypes (powers of two: exact in bf16)."""
    state = model.state_dict()
    return {fk: state[mk].reshape(vae.layout.shapes[fk]).to(vae.layout.dtypes.get(fk, torch.float32))
            for fk, mk in vae.layout.module_keys.items()}


def comfy_decode(family: str, sd: dict[str, torch.Tensor], z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's own autoencoder class of ``family`` (kl-f8 and Flux.2: AutoencoderKL; Wan 2.1: WanVAE) with
    ``sd`` (file keys), in ``dtype``: its decode of ``z`` (n, C, h, w), in fp32 (n, 3, H, W)."""
    if COMFY not in sys.path:
        sys.path.append(COMFY)  # last: its top-level nodes.py, utils/, app/ must not shadow this pack's modules
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu: ComfyUI picks its device on import)
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.wan.vae import WanVAE

    if family == "wan2.1":
        model = WanVAE(dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True],
                       dropout=0.0)
        z = z.unsqueeze(2)
    else:
        c = z.shape[1]
        model = AutoencoderKL(embed_dim=c, ddconfig=dict(double_z=True, z_channels=c, resolution=256, in_channels=3,
                                                         out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                                                         attn_resolutions=[], dropout=0.0))
        if family == "flux2":
            sd = {k: v for k, v in flux2_comfyui(sd)["comfyui"].items() if not k.startswith("bn.")}
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model = model.to(dtype).eval()
    with torch.no_grad():
        out = model.decode(z.to(dtype)).float()
    return out[:, :, 0] if out.ndim == 5 else out


@needs_comfy
@pytest.mark.parametrize("family,case", [("kl-f8", "mid"), ("kl-f8", "attention"), ("kl-f8", "growing"),
                                         ("flux2", "mid"), ("flux2", "attention"), ("flux2", "growing"),
                                         ("wan2.1", "wan-growing")])
def test_overflow_grown_inside_the_stream_is_rescaled_and_decodes_in_comfyui_fp16(family, case):
    sd = overflowing(family, case)
    vae = build_vae(sd, source=f"{family}.safetensors")
    model = vae.model
    z = latents(model)
    base32 = comfy_decode(family, sd, z, torch.float32).clamp(-1, 1)
    assert not torch.isfinite(comfy_decode(family, sd, z, torch.float16)).all()  # built to overflow fp16
    report = rescale_for_fp16(model, z, base_decode(model, z), TrainConfig.from_recipe("fp16-fix"))
    if family == "wan2.1":
        # Wan's RMS_norm divides by the L2 norm with an epsilon of 1e-12: the exact plan reaches a stream grown
        # inside its segment, and no measured plan is needed
        assert report["exact"] and report["segments"] >= 1 and "measured" not in report
        m = {"psnr_fp16": None, "threshold": 512.0, "scaled": {}}
    else:  # GroupNorm's epsilon (1e-6) beside the segment's small early part: only the measured plan reaches it
        assert not report["exact"]
        m = report["measured"]
        assert m["applied"] and m["psnr_fp16"] >= BOUND_DB and m["fp16_peak"] <= FP16_MAX / 2, m
        assert m["scaled"] and all(w == 2.0 ** round(torch.log2(torch.tensor(w)).item()) for w, _ in m["scaled"].values())
    fixed = file_tensors(vae, model)
    encoder = [k for k in sd if not k.startswith(("decoder.", "post_quant_conv.", "conv2."))]
    assert encoder and all(torch.equal(fixed[k], sd[k]) for k in encoder)  # the encoder byte for byte
    fp16 = comfy_decode(family, fixed, z, torch.float16)
    assert torch.isfinite(fp16).all()
    db = psnr(fp16.clamp(-1, 1), base32)
    assert db >= BOUND_DB and (m["psnr_fp16"] is None or db == pytest.approx(m["psnr_fp16"], abs=3.0)), (db, m)
    print(f"{family} {case}: ComfyUI fp16 {db:.1f} dB against the base's fp32 (ours {m['psnr_fp16']}), "
          f"threshold {m['threshold']:g}, {len(m['scaled'])} layers scaled")


def test_an_overflow_in_a_pinned_wan_segment_is_not_rescaled_and_said_so():
    """Wan 2.1's mid block sits before a 3D upsampler whose time_conv reads the stream in video decoding: the
    rescaling leaves that segment as it is (no candidate fits), and the report says why."""
    sd = {k: v for k, v in wan_file(3).items()}
    for k in ("decoder.middle.0.residual.6.weight", "decoder.middle.0.residual.6.bias"):
        sd[k] = (sd[k].float() * 1e5).to(sd[k].dtype)
    model = build_vae(sd, source="qwen_image_vae.safetensors").model
    z = latents(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = rescale_for_fp16(model, z, base_decode(model, z), TrainConfig.from_recipe("fp16-fix"))
    m = report["measured"]
    assert not m["applied"] and "pinned segment" in m["why"] and report["pinned"] == 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert all(not k.startswith(("decoder.conv_in.", "decoder.mid_block.")) and ".time_conv." not in k for k in changed)


def test_the_mid_block_case_trains_nothing_exports_what_was_scaled_and_a_past_bound_result_is_never_safe(tmp_path):
    """The issue's case through the recipe: the measured rescaling before the first step makes it safe
    (stop_when_safe: not trained), the export names the scaled layers and the change. Past the bound (here one
    of 99 dB) stop_when_safe does not stop, and the export says NOT fp16-safe and how far the decode moved."""
    vae = build_vae(overflowing("kl-f8", "mid"), source="bad.safetensors")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = {"device": "cpu", "val_batch": x[2:], "probe": make_probe(vae, x[2:])}
    cfg = TrainConfig.from_recipe("fp16-fix", steps=1, lr=1e-4, batch_size=2, lpips_weight=0.0, preview_every=0,
                                  val_every=1, log_every=1, ema=False, stop_when_safe=True)
    # without stop_when_safe: the penalty starts at twice the kept threshold, so the training patches' activations
    # (above the held-out ones) do not move the weights and train the kept output away
    trained = train(vae, itertools.repeat(x[:2]), cfg.replace(steps=2, val_every=2, stop_when_safe=False), **kw)
    m = trained.fp16_fix["rescale"]["measured"]
    assert m["applied"] and trained.fp16_fix["threshold"] == m["threshold"] > cfg.act_threshold
    assert trained.fp16_fix["penalty_threshold"] == min(FP16_MAX, 2 * m["threshold"])
    assert all(h["mse"] == 0.0 and h["act"] == 0.0 for h in trained.history if "mse" in h)
    result = train(vae, itertools.repeat(x[:2]), cfg, **kw)
    assert result.fp16_fix["safe_step"] == 0 and result.fp16_fix["rescale"] == trained.fp16_fix["rescale"]
    report = export_vae(result, tmp_path / "fixed.safetensors")
    assert report.fp16_safe is True and report.fp16_vs_base_db >= BOUND_DB and report.frozen_identical
    line = next(n for n in report.notes if n.startswith("fp16-fix: "))
    assert "measured rescaling" in line and "mid_block.resnets.0.conv2" in line and "conv_in" in line
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.fp16_safe"] == "true" and float(meta["vaeft.fp16_vs_base_db"]) >= BOUND_DB
    assert json.loads(meta["vaeft.fp16_fix"])["rescale"]["measured"]["scaled"]
    # a bound this decode does not meet: never stopped as safe, never exported as safe, the change stated
    scores = {"val_fp16_nonfinite": 0, "val_fp16_peak": 1.0, "val_fp16_psnr": 98.0}
    assert FP16Fix(cfg).safe(scores) and not FP16Fix(cfg.replace(fp16_bound_db=99.0)).safe(scores)
    strict = dataclasses.replace(result, fp16_fix={**result.fp16_fix, "bound_db": 99.0})
    report = export_vae(strict, tmp_path / "strict.safetensors")
    assert report.fp16_safe is False and report.fp16_within_bound is False
    assert any(w.startswith(f"NOT fp16-safe: the fp16 decode of the probe is finite but moved to "
                            f"{report.fp16_vs_base_db:.1f} dB") for w in report.warnings)
    assert "WARNING: NOT fp16-safe" in report.text()
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.fp16_safe"] == "false" and meta["vaeft.fp16_bound_db"] == "99"
    assert float(meta["vaeft.fp16_vs_base_db"]) == report.fp16_vs_base_db


def test_a_resumed_run_after_a_measured_rescaling_trains_towards_the_same_rescaled_teacher(tmp_path):
    """Stopped after 2 of 4 steps and resumed: the checkpoint's record keeps the measured rescaling (and so the
    run's thresholds), and the resumed run's teacher is rescaled as the uninterrupted run's was: the loss stays 0
    and the weights come out the same."""
    from test_fp16fix import _stopped_after

    vae = build_vae(overflowing("kl-f8", "mid"), source="bad.safetensors")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = {"device": "cpu", "val_batch": x[2:], "probe": make_probe(vae, x[2:])}
    cfg = TrainConfig.from_recipe("fp16-fix", steps=4, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0,
                                  val_every=2, log_every=1, ema=False)

    def batches(start):
        return itertools.repeat(x[:2])

    full = train(vae, batches, cfg, **kw)
    train(vae, batches, cfg, checkpoints=tmp_path / "run.ckpt", callbacks=_stopped_after(2), **kw)
    resumed = train(vae, batches, cfg, resume=tmp_path / "run.ckpt", **kw)
    assert full.fp16_fix["rescale"]["measured"]["applied"] and resumed.fp16_fix == full.fp16_fix
    assert resumed.history == full.history and all(h["mse"] == 0.0 for h in resumed.history if "mse" in h)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
