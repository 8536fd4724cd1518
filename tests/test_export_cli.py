"""`python -m training fit` exports as users run it (in this process: `cli.main`): the report on stderr, the
files it promises."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import cli_main, tiny_ldm_sd, write_images


run = cli_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_cli")
    save_file(tiny_ldm_sd(), str(d / "base.safetensors"))
    write_images(d / "images", size=64)
    return d


def fit(d, out, *extra, check=True):
    return run("fit", "--vae", d / "base.safetensors", "--data", d / "images", "--out", out, "--steps", 2,
               "--patch-size", 32, "--batch-size", 2, "--foreground-threshold", 0, "--no-progress",
               "--lpips-weight", 0, *extra, check=check)


def test_fit_prints_the_export_report_and_records_it(setup, tmp_path):
    out = tmp_path / "vae-ft-x-2.safetensors"
    p = fit(setup, out)
    assert json.loads(p.stdout.strip().splitlines()[-1])["out"] == str(out)
    err = p.stderr
    assert f"saved {out}" in err and "dtype: base (fp32 ×" in err
    assert "untrained tensors (encoder, quant_conv): bit-identical to the base file" in err
    assert "half precision, decoding 2 held-out patches of 32x32 with the exported weights:" in err
    assert "  fp16: safe: 0 of 2048 pixels NaN/inf" in err and "  bf16 (base): safe" in err
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.fp16_safe"] == "true" and meta["vaeft.dtype"] == "base"
    assert json.loads(meta["vaeft.dataset"])["folder"] == "images"


def test_fit_says_when_a_requested_dtype_rounds_the_encoder(setup, tmp_path):
    p = fit(setup, tmp_path / "h.safetensors", "--export-dtype", "fp16")
    assert "untrained tensors (encoder, quant_conv): ROUNDED" in p.stderr
    assert "WARNING: fp16 export rounds" in p.stderr and "dtype 'base'" in p.stderr


def test_fit_writes_a_diffusers_folder(setup, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae-ft-x-2"
    p = fit(setup, out, "--format", "diffusers", "--family", "sdxl")
    assert json.loads(p.stdout.strip().splitlines()[-1])["out"] == str(out)
    assert f"saved {out} (diffusers model folder)" in p.stderr
    assert "latent scaling: scaling_factor 0.13025: SDXL's published factors" in p.stderr
    model = AutoencoderKL.from_pretrained(str(out), local_files_only=True)
    assert model.config.scaling_factor == 0.13025


def test_fit_refuses_a_mismatched_out_before_training(setup, tmp_path):
    p = fit(setup, tmp_path / "x.safetensors", "--format", "diffusers", check=False)
    assert p.returncode == 2 and "--format diffusers writes a model folder" in p.stderr
    p = fit(setup, tmp_path / "folder", check=False)
    assert p.returncode == 2 and "--out must end in .safetensors" in p.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    p = fit(setup, taken, "--format", "diffusers", check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert "fine-tune" not in p.stderr and "data:" not in p.stderr  # refused before any work
