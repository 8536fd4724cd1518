"""The export's half-precision check: decode probe patches with the exported weights in fp16 and bf16."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_ldm_sd, train
from training.config import TrainConfig
from training.export import export_vae
from training.probe import half_precision_report, make_probe
from training.vae import build_vae


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _overflowing(model):
    """The same decoder with conv_in scaled 1e5×: its output passes fp16's 65504 (inf, then NaN
    after the next GroupNorm), while fp32 and bf16 hold it and the GroupNorm undoes the scale."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.decoder.conv_in.weight.mul_(1e5)
        m.decoder.conv_in.bias.mul_(1e5)
    return m


@pytest.fixture(scope="module")
def setup():
    base = build_vae(tiny_ldm_sd(seed=1), source="base.safetensors")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0)
    result = train(base, itertools.repeat(x[:2]), cfg, device="cpu")
    return base, result, x


def test_a_normal_fine_tune_is_fp16_safe(tmp_path, setup):
    base, result, x = setup
    result = copy.copy(result)
    result.probe = make_probe(base, x)
    report = export_vae(result, tmp_path / "v.safetensors")
    hp = report.half_precision
    assert report.fp16_safe is True and report.warnings == []
    assert hp["pixels"] == 2 * 32 * 32 and hp["patches"] == "2 training patches of 32x32"  # CPU: 2 patches
    for name in ("fp16", "bf16"):
        fig = hp["fine_tuned"][name]
        assert (fig["nonfinite_pixels"], fig["saturated_pixels"], fig["safe"]) == (0, 0, True)
        assert set(fig["max_activation"]) == {"post_quant_conv", "conv_in", "mid_block", "up_blocks.0",
                                              "up_blocks.1", "conv_norm_out", "conv_out"}
        assert 0 < max(fig["max_activation"].values()) < 1e3
        assert 0 < fig["max_abs_error"] < (0.01 if name == "fp16" else 0.1)
        assert hp["base"][name]["safe"]
    text = report.text()
    assert "fp16: safe: 0 of 2048 pixels NaN/inf, 0 pushed past black/white" in text
    assert "bf16 (base): safe" in text
    # an ordinary fine-tune is compared with its own fp32 decode (what fp16 costs it), not with the base's,
    # from which it differs by design; the base's figure stays in the metadata
    fp16_line = next(line for line in text.splitlines() if line.strip().startswith("fp16: "))
    assert f"PSNR {hp['fine_tuned']['fp16']['psnr']:.1f} dB against its own fp32 decode" in fp16_line
    assert "against the base's" not in text and hp["fine_tuned"]["fp16"]["psnr"] > 40
    assert hp["fine_tuned"]["fp16"]["psnr_vs_base"] < hp["fine_tuned"]["fp16"]["psnr"]
    assert "latent drift" not in text and hp["latent_drift"] == 0.0  # decoder-only: the encoder is the base's
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.fp16_safe"] == "true"
    assert _strict_json(meta["vaeft.half_precision"])["fine_tuned"]["fp16"]["safe"] is True


def test_a_decoder_that_overflows_fp16_is_reported_and_warned_about(tmp_path, setup):
    base, result, x = setup
    bad = copy.copy(result)
    bad.model = _overflowing(result.model)
    bad.probe = make_probe(base, x)  # the base decoder is fine in fp16
    report = export_vae(bad, tmp_path / "v.safetensors")
    fp16, bf16 = report.half_precision["fine_tuned"]["fp16"], report.half_precision["fine_tuned"]["bf16"]
    assert report.fp16_safe is False
    assert fp16["nonfinite_pixels"] == report.half_precision["pixels"]  # every pixel NaN: a black image
    assert fp16["max_activation"]["conv_in"] == float("inf") and fp16["limit_used"] == float("inf")
    assert bf16["safe"] and bf16["max_activation"]["conv_in"] > 65504
    assert len(report.warnings) == 1
    warning = report.warnings[0]
    assert "breaks in fp16 where the base decoder did not" in warning and "largest activation overflow in conv_in" in warning
    assert "--bf16-vae" in warning and "--no-half-vae" in warning
    assert "fp16: UNSAFE: 2048 of 2048 pixels NaN/inf" in report.text() and "WARNING: the fine-tuned" in report.text()
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.fp16_safe"] == "false"
    hp = _strict_json(meta["vaeft.half_precision"])
    assert hp["fine_tuned"]["fp16"]["max_activation"]["conv_in"] == "overflow"
    assert hp["fine_tuned"]["bf16"]["safe"] is True and hp["base"]["fp16"]["safe"] is True


def test_no_warning_when_the_base_overflows_too(tmp_path, setup):
    base, result, x = setup
    bad = copy.copy(result)
    bad.model = _overflowing(result.model)
    bad.probe = make_probe(_overflowing(base.model), x)
    assert bad.probe.base_report["fp16"]["safe"] is False
    report = export_vae(bad, tmp_path / "v.safetensors")
    assert report.fp16_safe is False and report.warnings == []
    assert any("base decoder breaks in fp16 too" in n for n in report.notes)


def test_without_a_probe_the_file_says_unchecked(tmp_path, setup):
    report = export_vae(setup[1], tmp_path / "v.safetensors")
    assert report.half_precision is None and report.fp16_safe is None
    assert any("half precision not checked" in n for n in report.notes)
    with safe_open(report.path, "pt") as f:
        assert f.metadata()["vaeft.fp16_safe"] == "unchecked"


def test_report_counts_are_per_pixel(setup):
    base, _, x = setup
    z = torch.randn(3, 4, 4, 5, generator=torch.Generator().manual_seed(2))
    rep = half_precision_report(_overflowing(base.model), z)
    assert rep["pixels"] == 3 * 8 * 10 and rep["fp16"]["nonfinite_pixels"] == rep["pixels"]
