"""diffusers model folder export: loads offline with AutoencoderKL.from_pretrained, right latent factors."""

from __future__ import annotations

import copy
import itertools
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_ldm_sd, train
from training.config import TrainConfig
from training.errors import VAEFTError
from training.export import export_vae
from training.families.klf8 import LATENT_FAMILIES as FAMILIES, pick_latent_family as pick_family
from training.probe import make_probe
from training.families.ldm import ldm_to_diffusers
from training.vae import build_vae


def _train(sd, name, trainable="decoder", seed=0):
    base = build_vae(sd, source=name)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0, trainable=trainable)
    result = train(base, itertools.repeat(x[:2]), cfg, device="cpu", probe=make_probe(base, x, seed=cfg.seed))
    return base, result


def _from_pretrained(folder):
    from diffusers import AutoencoderKL

    model, info = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    return model.eval()


@pytest.fixture(scope="module")
def sdxl_like():
    return _train(tiny_ldm_sd(seed=7), "/models/sdxl_vae.safetensors")


def test_diffusers_folder_loads_offline_and_decodes_like_the_trained_model(tmp_path, sdxl_like):
    _, result = sdxl_like
    report = export_vae(result, tmp_path / "vae-ft-x-2", format="diffusers")
    assert report.format == "diffusers" and "(diffusers model folder)" in report.text()
    assert sorted(os.listdir(tmp_path)) == ["vae-ft-x-2"]
    assert sorted(os.listdir(tmp_path / "vae-ft-x-2")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    model = _from_pretrained(tmp_path / "vae-ft-x-2")
    config = json.loads((tmp_path / "vae-ft-x-2" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert (config["scaling_factor"], config["shift_factor"]) == (0.13025, None)  # sdxl: from the file name
    assert report.scaling["family"] == "sdxl" and "base file's name" in report.scaling["why"]
    # every weight is the trained model's (fp32 base -> fp32 folder), and it decodes the same
    ours = result.model.state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ours[k]), k
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.decode(z).sample, result.model.decode(z).sample)
    with safe_open(tmp_path / "vae-ft-x-2" / "diffusion_pytorch_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["vaeft.latent_family"] == "sdxl"
    assert meta["vaeft.scaling_factor"] == "0.13025" and "vaeft.shift_factor" not in meta
    assert meta["vaeft.fp16_safe"] == "true" and meta["vaeft.frozen_identical"] == "true"


def test_the_ldm_file_records_the_same_factors(tmp_path, sdxl_like):
    _, result = sdxl_like
    report = export_vae(result, tmp_path / "v.safetensors")
    assert report.metadata["vaeft.scaling_factor"] == "0.13025" and report.metadata["vaeft.latent_family"] == "sdxl"
    assert "latent scaling: scaling_factor 0.13025: SDXL's published factors" in report.text()


def test_folder_weights_keep_the_base_dtype_per_tensor(tmp_path):
    sd = {k: v.half() if k.startswith("encoder.") else v for k, v in tiny_ldm_sd(seed=8).items()}
    _, result = _train(sd, "vae-ft-mse-840000-ema-pruned.safetensors")
    export_vae(result, tmp_path / "d", format="diffusers")
    weights = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    expected = ldm_to_diffusers(sd)
    assert set(weights) == set(expected)
    for k, v in weights.items():
        assert v.dtype == expected[k].dtype and v.shape == expected[k].shape, k
        if k.startswith("encoder."):
            assert torch.equal(v, expected[k]), k
    assert json.loads((tmp_path / "d" / "config.json").read_text())["scaling_factor"] == 0.18215


@pytest.mark.parametrize("name,family", [("ae.safetensors", "flux"), ("sd3.5_large_vae.safetensors", "sd3")])
def test_16_channel_families_get_their_shift(tmp_path, name, family):
    _, result = _train(tiny_ldm_sd(latent_channels=16, quant=False, seed=9), name)
    export_vae(result, tmp_path / "d", format="diffusers")
    model = _from_pretrained(tmp_path / "d")
    assert model.config.scaling_factor == FAMILIES[family]["scaling_factor"]
    assert model.config.shift_factor == FAMILIES[family]["shift_factor"]
    assert not model.config.use_quant_conv and model.config.latent_channels == 16


def _latent_stats_by_hand(model, patches, seed):
    """The scale-factor recipe written out: posterior samples of the patches, 1/std (and the mean)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.cat([model.encode(c).latent_dist.sample(gen) for c in patches.split(4)])
    return 1 / z.std().item(), z.mean().item()


@pytest.mark.parametrize("channels", [4, 16])
def test_full_mode_re_estimates_the_latent_factors(tmp_path, channels):
    sd = tiny_ldm_sd(latent_channels=channels, quant=channels == 4, seed=10)
    _, result = _train(sd, "sdxl_vae.safetensors" if channels == 4 else "ae.safetensors", trainable="full")
    report = export_vae(result, tmp_path / "d", format="diffusers")
    model = _from_pretrained(tmp_path / "d")  # the exported encoder, loaded by diffusers itself
    scale, mean = _latent_stats_by_hand(model, result.probe.train_patches[:4], result.config.seed)
    assert model.config.scaling_factor == pytest.approx(scale, rel=1e-4)
    assert model.config.scaling_factor != FAMILIES[report.scaling["family"]]["scaling_factor"]
    if channels == 16:
        assert model.config.shift_factor == pytest.approx(mean, rel=1e-4, abs=1e-6)
    else:
        assert model.config.shift_factor is None
    assert report.frozen is None and "re-estimated on 4 training patches" in report.scaling["source"]
    with safe_open(tmp_path / "d" / "diffusion_pytorch_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert float(meta["vaeft.scaling_factor"]) == model.config.scaling_factor
    assert meta["vaeft.scaling_source"].startswith("re-estimated")


def test_family_choice():
    assert pick_family("/x/sdxl_vae.safetensors", 4)[0] == "sdxl"
    assert pick_family("sd_xl_base_1.0.safetensors", 4)[0] == "sdxl"
    assert pick_family("ae.safetensors", 16)[0] == "flux"
    assert pick_family("vae-ft-mse-840000-ema-pruned.safetensors", 4)[0] == "sd"
    # no hint in the name: the measured latent scale decides; a hint for the other channel count is ignored
    assert pick_family("my_vae.safetensors", 4, {"std": 1 / 0.14})[0] == "sdxl"
    assert pick_family("my_vae.safetensors", 4, {"std": 1 / 0.17})[0] == "sd"
    assert pick_family("sdxl_vae.safetensors", 16, {"std": 1 / 1.4})[0] == "sd3"
    family, why = pick_family("my_vae.safetensors", 16)
    assert family == "flux" and "pass the family" in why
    with pytest.raises(VAEFTError, match="no known latent family has 8"):
        pick_family("x", 8)


def test_an_explicit_family_must_fit_the_channels(tmp_path, sdxl_like):
    _, result = sdxl_like
    with pytest.raises(VAEFTError, match="family 'flux' has 16 latent channels, this VAE 4"):
        export_vae(result, tmp_path / "d", format="diffusers", family="flux")
    report = export_vae(result, tmp_path / "d", format="diffusers", family="sd")
    assert report.scaling == {**report.scaling, "family": "sd", "why": "as given", "scaling_factor": 0.18215}
    assert os.listdir(tmp_path) == ["d"]


def test_folder_is_not_clobbered_and_bad_formats_are_refused(tmp_path, sdxl_like):
    _, result = sdxl_like
    out = tmp_path / "d"
    export_vae(result, out, format="diffusers")
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(VAEFTError, match="already exists"):
        export_vae(result, out, format="diffusers")
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == before
    with pytest.raises(VAEFTError, match="export format must be one of safetensors, diffusers"):
        export_vae(result, tmp_path / "e", format="onnx")
    bad = copy.copy(result)
    bad.model = copy.deepcopy(result.model)
    with torch.no_grad():
        bad.model.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(VAEFTError, match=r"NaN or infinite values \(decoder\.conv_out\.bias"):
        export_vae(bad, tmp_path / "f", format="diffusers", family="sdxl")
    assert sorted(os.listdir(tmp_path)) == ["d"]
