"""The Wan 2.2 layout (training/families/wan22.py): Wan 2.2 (48 channels, 2x2 patchify) and Qwen-Image 2.1 (64
channels, RGBA, temporal kernel 1). What the family contract test (tests/test_families.py) does not already
prove: the key maps over the released sizes, each file recognised by its true name, the exact one-frame path
against diffusers' own forward, the refusals that are the layout's own, and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKLQwenImage21, AutoencoderKLWan
from safetensors.torch import load_file, save_file

from conftest import cli_main, write_images
from family_examples import qwen21_file, wan22_file, wan_file
from training.config import TrainConfig
from training.errors import VAEFTError
from training.families import trained, wan22
from training.vae import build_vae, load_vae

WAN22_RELEASED = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_spatial=16, temperal_downsample=[False, True, True])


def _images(n, channels, size=32, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("cls,config,count", [(AutoencoderKLWan, WAN22_RELEASED, 196),
                                               (AutoencoderKLQwenImage21, {}, 238)], ids=["wan2.2", "qwen-image-2.1"])
def test_the_key_maps_cover_the_released_vaes_both_ways(cls, config, count):
    """Every tensor of the released configurations (meta device) has one original-layout name, and back;
    the decoder's resamplers sit after its num_res_blocks + 1 residual blocks, the encoder's after num_res_blocks."""
    with torch.device("meta"):
        keys = list(cls(**config).state_dict())
    assert len(keys) == count
    original = [wan22.to_original_key(k, 2) for k in keys]
    assert len(set(original)) == count and [wan22.to_diffusers_key(k) for k in original] == keys
    assert "decoder.upsamples.0.upsamples.3.resample.1.weight" in original  # ComfyUI's names (vae2_2.Up_ResidualBlock)
    assert "encoder.downsamples.0.downsamples.2.resample.1.weight" in original
    assert "decoder.upsamples.0.upsamples.0.residual.2.weight" in original  # ComfyUI's probe for the Wan 2.2 VAE
    with pytest.raises(VAEFTError, match="not part of a Wan 2.2-layout VAE"):
        wan22.to_diffusers_key("decoder.upsamples.0.residual.0.gamma")  # Wan 2.1's flat list


def _diffusers(sd: dict) -> dict:
    model, keys = wan22.build(sd)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {keys[k]: v.reshape(shapes[keys[k]]) for k, v in sd.items()}


@pytest.mark.parametrize("make,family,channels", [(wan22_file, wan22.WAN22, 3), (qwen21_file, wan22.QWEN21, 4)],
                         ids=["wan2.2", "qwen-image-2.1"])
def test_each_file_is_read_as_its_true_family_in_both_layouts(make, family, channels):
    """Qwen-Image 2.1's diffusers weights (4D convolutions) are Qwen-Image 2.1, 64 channels, RGBA: never the
    Wan 2.2 VAE; ComfyUI's layout of it keeps 5D weights of temporal size 1."""
    sd = make(0)
    for layout in (sd, _diffusers(sd)):
        vae = build_vae(dict(layout), source="x.safetensors")
        assert vae.family is family
        assert family.image_channels(vae.model) == channels
        assert family.latent_channels(vae.model) == (48 if family is wan22.WAN22 else 64)
        # the tiny examples: two downsamplers, and Wan 2.2's 2x2 patch
        assert family.downsampling(vae.model) == (8 if family is wan22.WAN22 else 4)
        assert vae.layout.shapes == {k: tuple(v.shape) for k, v in sd.items()}
    assert sd["decoder.conv1.weight"].shape[2] == (3 if family is wan22.WAN22 else 1)
    if family is wan22.QWEN21:
        assert _diffusers(sd)["decoder.conv_in.weight"].ndim == 4


@pytest.mark.parametrize("make,channels", [(wan22_file, 3), (qwen21_file, 4)], ids=["wan2.2", "qwen-image-2.1"])
def test_the_one_frame_path_is_diffusers_forward_exactly(make, channels):
    """The 2D path (default) against diffusers' own 3D forward of the same weights: the same latents and
    decode (float rounding apart); gradient checkpointing gives the same gradients."""
    vae = build_vae(make(1), source="x.safetensors").model.float()
    x = _images(2, channels)
    with torch.no_grad():
        z2 = vae.encode(x).latent_dist.mean
        d2 = vae.decode(z2).sample
        vae.image_path = "3d"
        z3 = vae.encode(x).latent_dist.mean
        d3 = vae.decode(z3).sample
    vae.image_path = "2d"
    assert z2.shape == ((2, 48, 4, 4) if channels == 3 else (2, 64, 8, 8)) and d2.shape == x.shape
    assert (z2 - z3).abs().max() < 1e-5 and (d2 - d3).abs().max() < 1e-5
    grads = []
    for ckpt in (False, True):
        vae.requires_grad_(True)
        vae.zero_grad()
        (vae.enable_gradient_checkpointing if ckpt else vae.disable_gradient_checkpointing)()
        vae.decode(z2).sample.square().mean().backward()
        grads.append(vae.decoder.conv_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_still_images_leave_the_temporal_resampling_untrained():
    sd = wan22_file(0)
    vae = build_vae(sd, source="x.safetensors")
    names = [k for k in vae.model.state_dict() if ".time_conv." in k]
    assert any(k.startswith("decoder.") for k in names) and any(k.startswith("encoder.") for k in names)
    assert not any(trained(k, "decoder", wan22.WAN22) or trained(k, "full", wan22.WAN22) for k in names)
    assert trained("decoder.up_blocks.0.upsampler.resample.1.weight", "decoder", wan22.WAN22)


@pytest.mark.parametrize("case,expected", [
    ("kernels", "mixes causal convolutions of temporal size 1"),
    ("wan21-encoder", "mixes parts of different VAEs"),
    ("pixels", "the encoder takes 12 channels but the decoder makes 8"),
    ("5ch", "a Wan 2.2-layout VAE of 5-channel images"),
    ("no-encoder", "has no encoder"),
])
def test_mixed_and_unsupported_files_are_refused_naming_the_file(case, expected, tmp_path):
    sd = wan22_file(2)
    if case == "kernels":  # Qwen-Image 2.1's encoder with Wan 2.2's decoder
        sd = {**{k: v for k, v in qwen21_file(2).items() if k.startswith(("encoder.", "conv1."))},
              **{k: v for k, v in sd.items() if not k.startswith(("encoder.", "conv1."))}}
        sd["conv1.weight"], sd["conv1.bias"] = wan22_file(2)["conv1.weight"], wan22_file(2)["conv1.bias"]
        sd["encoder.head.2.weight"] = torch.zeros(96, *sd["encoder.head.2.weight"].shape[1:], dtype=torch.bfloat16)
        sd["encoder.head.2.bias"] = torch.zeros(96, dtype=torch.bfloat16)
    elif case == "wan21-encoder":
        wan21 = wan_file(2)
        sd = {**{k: v for k, v in wan21.items() if k.startswith("encoder.")},
              **{k: v for k, v in sd.items() if not k.startswith("encoder.")}}
    elif case == "pixels":
        w = sd["decoder.head.2.weight"]
        sd["decoder.head.2.weight"], sd["decoder.head.2.bias"] = w[:8].clone(), sd["decoder.head.2.bias"][:8].clone()
    elif case == "5ch":
        for k in ("encoder.conv1.weight",):
            sd[k] = torch.zeros(sd[k].shape[0], 20, *sd[k].shape[2:], dtype=torch.bfloat16)
        sd["decoder.head.2.weight"] = torch.zeros(20, *sd["decoder.head.2.weight"].shape[1:], dtype=torch.bfloat16)
        sd["decoder.head.2.bias"] = torch.zeros(20, dtype=torch.bfloat16)
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    before = path.read_bytes()
    with pytest.raises(VAEFTError, match=re.escape(expected)) as e:
        load_vae(path)
    assert path.name in str(e.value)
    assert path.read_bytes() == before


def test_weight_decay_is_refused_for_wan22_only():
    """Wan 2.2's causal convolutions have temporal taps still images never train (decay would shrink them);
    Qwen-Image 2.1's have none."""
    with pytest.raises(VAEFTError, match="weight decay would shrink them"):
        wan22.WAN22.check_config(TrainConfig(weight_decay=0.01))
    wan22.QWEN21.check_config(TrainConfig(weight_decay=0.01))
    with pytest.raises(VAEFTError, match="needs its 2D path"):
        wan22.QWEN21.check_config(TrainConfig(grad_checkpointing=True, wan_2d=False))


def test_fit_from_the_command_line_with_a_wan22_vae_and_its_diffusers_folder(tmp_path):
    """The user's door: `fit` on a Wan 2.2 file (ComfyUI's layout, bf16) writes a drop-in file in that layout
    and, with --format diffusers, a folder AutoencoderKLWan loads holding the same decoder."""
    base = tmp_path / "wan2.2_vae.safetensors"
    save_file(wan22_file(4), str(base))
    write_images(tmp_path / "images", names=("astronaut", "coffee", "chelsea"), size=64)
    out = tmp_path / "vae-ft-wan22-2.safetensors"
    common = ("--data", tmp_path / "images", "--steps", 2, "--patch-size", 32, "--batch-size", 2, "--lpips-weight", 0,
              "--no-progress", "--val-every", 2, "--val-patches", 2, "--seed", 3)
    p = cli_main("fit", "--vae", base, "--out", out, "--run-dir", tmp_path / "run", *common)
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps"] == 2
    assert "untrained tensors (encoder, conv1 and the temporal resampling): bit-identical" in p.stderr
    src, got = load_file(base), load_file(out)
    assert set(got) == set(src) and all(got[k].shape == src[k].shape and got[k].dtype == src[k].dtype for k in src)
    assert not torch.equal(got["decoder.head.2.weight"], src["decoder.head.2.weight"])
    assert all(torch.equal(got[k], src[k]) for k in src if k.startswith(("encoder.", "conv1.")) or ".time_conv." in k)
    folder = tmp_path / "vae-ft-wan22-folder"
    cli_main("fit", "--vae", base, "--out", folder, "--format", "diffusers", "--run-dir", tmp_path / "run2", *common)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan" and config["is_residual"] and config["patch_size"] == 2
    assert len(config["latents_mean"]) == 48 and config["latents_mean"][0] == wan22.WAN22_MEAN[0]
    theirs = AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True)
    ours = load_vae(out).model  # the same seed and steps: the same decoder
    assert torch.equal(theirs.decoder.conv_out.weight.float(), ours.decoder.conv_out.weight)
