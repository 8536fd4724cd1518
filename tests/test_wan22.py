"""The Wan 2.2 layout (training/families/wan22.py): Wan 2.2 (48 channels, 2x2 patchify) and Qwen-Image 2.1 (64
channels, RGBA, temporal kernel 1). What the family contract test (tests/test_families.py) does not already
prove: the key maps over the released sizes, each file recognised by its true name, the exact one-frame path
against diffusers' own forward, the refusals that are the layout's own, and the CLI."""

from __future__ import annotations

import json
import os
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
    ("5ch", "a Wan 2.2 VAE (48 latent channels, 16x; Wan2.2-TI2V-5B, FIBO) of 5-channel images"),
    ("no-encoder", "has no encoder"),
    ("no-time-conv", "its temporal resampling does not mirror itself (encoder levels with a time_conv: none; "
                     "decoder levels: 0, expected none)"),
    ("no-level-conv", "is not a complete Wan 2.2 VAE (48 latent channels, 16x; Wan2.2-TI2V-5B, FIBO): it lacks "
                      "encoder.downsamples.1.downsamples.0.residual.2.weight"),
    ("qwen21-no-conv", "is not a complete Qwen-Image 2.1 VAE (64 latent channels, 16x, RGBA): it lacks conv2.weight"),
    ("qwen21-mixed", "is laid out like a Qwen-Image 2.1 VAE (64 latent channels, 16x, RGBA) but holds"),
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
    elif case == "no-time-conv":  # a damaged file: the encoder's temporal downsampling gone
        sd = {k: v for k, v in sd.items() if not (k.startswith("encoder.") and ".time_conv." in k)}
    elif case == "no-level-conv":
        del sd["encoder.downsamples.1.downsamples.0.residual.2.weight"]
    elif case == "qwen21-no-conv":  # Qwen-Image 2.1 in diffusers' layout, its post_quant_conv gone
        sd = {k: v for k, v in _diffusers(qwen21_file(2)).items() if not k.startswith("post_quant_conv.")}
    elif case == "qwen21-mixed":  # and one of kl-f8's tensors inside
        sd = {**_diffusers(qwen21_file(2)), "decoder.conv_norm_out.weight": torch.ones(8)}
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


# ComfyUI's newest Wan 2.2-layout module, which builds the Qwen-Image 2.1 VAE (temporal_kernel, image_channels,
# patch_size): comfy/ldm/wan/vae2_2.py of a ComfyUI newer than 0.28.2, kept outside the repository (never
# committed) and run on top of COMFYUI_PATH's comfy package, as that ComfyUI's Load VAE does.
QWEN21_ORACLE = os.environ.get("VAEFT_COMFY_VAE2_2_NEWEST", os.path.expanduser("~/ComfyUI-newest-wan/vae2_2.py"))

COMFY_QWEN21 = r'''
import importlib.util
jobs = json.load(open(jobs_path))
spec = importlib.util.spec_from_file_location("comfy.ldm.wan.vae2_2_newest", jobs["oracle"])
newest = importlib.util.module_from_spec(spec)
newest.__package__ = "comfy.ldm.wan"
sys.modules[spec.name] = newest
spec.loader.exec_module(newest)
image = torch.load(jobs["image"])
out = {}
for name, path in jobs["files"].items():
    sd = comfy.utils.load_torch_file(path)
    head = sd["decoder.head.2.weight"]
    # comfy/sd.py's Qwen Image 2.1 branch: the Wan 2.2 layout with a 5D head of temporal size 1
    assert "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd and head.ndim == 5 and head.shape[2] == 1
    model = newest.WanVAE(dim=sd["encoder.conv1.weight"].shape[0], dec_dim=sd["decoder.head.0.gamma"].shape[0],
                          z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2, attn_scales=[],
                          temperal_downsample=[False, True, True, True], dropout=0.0, image_channels=head.shape[0],
                          patch_size=1, temporal_kernel=1)
    result = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        latent = model.encode(image)
        decoded = model.decode(latent)
    torch.save({"latent": latent, "decoded": decoded}, path + ".comfy.pt")
    out[name] = {"keys": len(sd)}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.integration
def test_comfyuis_newest_qwen_image_21_loader_reads_the_export_strictly_with_the_base_latents(tmp_path):
    """ComfyUI's newest loader code for the Qwen-Image 2.1 VAE (its vae2_2.WanVAE with temporal_kernel 1, RGBA,
    built as its comfy/sd.py does, strict load): the export of one training step on RGBA images loads with no
    missing or unexpected key; its latents of an RGBA image equal the base's bit for bit; its decode is ours."""
    import os
    import subprocess
    import sys

    from diffusers import AutoencoderKLQwenImage21

    from comfy_server import COMFY_LOADER_PREAMBLE, comfyui_path
    from conftest import train
    from training.export import export_vae

    comfy = comfyui_path()
    if comfy is None or not os.path.isfile(QWEN21_ORACLE):
        pytest.skip("needs COMFYUI_PATH and ComfyUI's newest comfy/ldm/wan/vae2_2.py at "
                    f"{QWEN21_ORACLE} (VAEFT_COMFY_VAE2_2_NEWEST): see docs/testing.md")
    torch.manual_seed(6)  # ComfyUI's fixed levels and blocks, narrow widths (its branch reads them off the file)
    model = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=12)
    sd, _ = wan22.file_layout({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    save_file(sd, str(tmp_path / "qwen_image_2.1_vae.safetensors"))
    base = build_vae(sd, source="qwen_image_2.1_vae.safetensors")
    x = _images(2, 4, size=32, seed=3)
    result = train(base, iter(lambda: x, None), TrainConfig(steps=1, lr=1e-3, batch_size=2, lpips_weight=0.0,
                                                            preview_every=0))
    report = export_vae(result, tmp_path / "vae-ft-qwen21-1.safetensors")
    assert report.frozen_identical is True
    image = _images(1, 4, size=32, seed=4)  # RGBA in [-1, 1]
    torch.save(image, tmp_path / "image.pt")
    jobs = {"image": str(tmp_path / "image.pt"), "oracle": QWEN21_ORACLE,
            "files": {"base": str(tmp_path / "qwen_image_2.1_vae.safetensors"), "tuned": report.path}}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "load.py").write_text(COMFY_LOADER_PREAMBLE + COMFY_QWEN21)
    p = subprocess.run([sys.executable, str(tmp_path / "load.py"), comfy, str(tmp_path / "jobs.json")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-3000:]
    base_out = torch.load(jobs["files"]["base"] + ".comfy.pt")
    tuned_out = torch.load(report.path + ".comfy.pt")
    assert tuned_out["latent"].shape == (1, 64, 2, 2)
    assert torch.equal(tuned_out["latent"], base_out["latent"])  # the encoder is the base's, bit for bit
    with torch.no_grad():
        ours = base.model.encode(image).latent_dist.mean
        decoded = load_vae(report.path).model.decode(tuned_out["latent"]).sample
    assert (ours - tuned_out["latent"]).abs().max() < 1e-4
    assert tuned_out["decoded"].shape == (1, 4, 32, 32) and not torch.equal(tuned_out["decoded"], base_out["decoded"])
    assert (tuned_out["decoded"].clamp(-1, 1) - decoded).abs().max() < 1e-4


def test_a_memory_preset_too_small_for_the_decoder_is_refused_naming_what_is_not():
    """Wan 2.2's decoder is 555 M parameters: its weights, gradients, AdamW moments and EMA alone are ~10.7 GiB, so
    the 6GB-12GB presets (sized on kl-f8) are refused by name with the ones not refused; Qwen-Image 2.1's (259 M)
    is not refused at 8GB (its activations at that preset's micro-batch were not measured).
    Counted on the released configurations (meta device, nothing allocated)."""
    from training.config import check_preset_holds

    def sizes(model):
        params = [(p.numel(), trained(k, "decoder", wan22.WAN22)) for k, p in model.named_parameters()]
        return sum(n for n, t in params if t), sum(n for n, t in params if not t)

    with torch.device("meta"):
        wan, qwen = sizes(AutoencoderKLWan(**WAN22_RELEASED)), sizes(AutoencoderKLQwenImage21())
    assert 535e6 < wan[0] < 550e6 and 250e6 < qwen[0] < 262e6  # decoders but their time_conv
    with pytest.raises(VAEFTError, match=r"memory preset 12GB cannot train the Wan 2\.2 VAE: .* alone take 10\.7 GiB.*"
                                         r"Choose 24GB\+.*or turn ema off"):
        check_preset_holds(TrainConfig(memory="12GB"), *wan, "the Wan 2.2 VAE")
    check_preset_holds(TrainConfig(memory="24GB+"), *wan, "the Wan 2.2 VAE")
    check_preset_holds(TrainConfig(memory="8GB"), *qwen, "the Qwen-Image 2.1 VAE")
    for ema in (True, False):  # 5.1 GiB with EMA, 4.1 without: either way over 6 GB with the context
        with pytest.raises(VAEFTError, match="memory preset 6GB cannot train .* Choose 8GB or 12GB or 24GB"):
            check_preset_holds(TrainConfig(memory="6GB", ema=ema), *qwen, "the Qwen-Image 2.1 VAE")


def test_fit_from_the_command_line_trains_a_qwen_image_21_vae_on_rgba_images(tmp_path):
    """Qwen-Image 2.1 (RGBA) through `fit` on a transparent PNG and an opaque one: a drop-in file in ComfyUI's
    layout (5D weights of temporal size 1, bf16) whose alpha output trained, the encoder byte for byte, and the
    straight-alpha convention recorded; its diffusers folder is AutoencoderKLQwenImage21 with 4D weights."""
    from PIL import Image
    from safetensors import safe_open

    from test_rgba import astronaut_rgba

    base = tmp_path / "qwen_image_2.1_vae.safetensors"
    save_file(qwen21_file(7), str(base))
    (tmp_path / "images").mkdir()
    Image.fromarray(astronaut_rgba()).save(tmp_path / "images" / "astronaut.png")
    write_images(tmp_path / "images", names=("coffee",), size=96)
    out = tmp_path / "vae-ft-qwen21-3.safetensors"
    common = ("--data", tmp_path / "images", "--steps", 3, "--patch-size", 32, "--batch-size", 2, "--lr", 1e-3,
              "--lpips-weight", 0, "--foreground-threshold", 0, "--no-progress", "--val-every", 3, "--val-patches", 2,
              "--seed", 2)
    p = cli_main("fit", "--vae", base, "--out", out, "--run-dir", tmp_path / "run", *common)
    assert json.loads(p.stdout.strip().splitlines()[-1])["final"]["val_mse"] > 0
    assert "given alpha 1.0 (opaque)" in p.stderr  # the RGB photo, told once
    src, got = load_file(base), load_file(out)
    assert set(got) == set(src) and all(got[k].shape == src[k].shape and got[k].dtype == src[k].dtype for k in src)
    assert got["decoder.head.2.weight"].shape == (4, 24, 1, 3, 3)
    assert not torch.equal(got["decoder.head.2.weight"][3], src["decoder.head.2.weight"][3])  # alpha trained
    assert not torch.equal(got["decoder.head.2.bias"][3], src["decoder.head.2.bias"][3])
    assert all(torch.equal(got[k], src[k]) for k in src if k.startswith(("encoder.", "conv1.")) or ".time_conv." in k)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.vae_family"] == "qwen-image-2.1" and meta["vaeft.image_channels"] == "4"
    assert "straight (not premultiplied) alpha" in meta["vaeft.alpha"]
    folder = tmp_path / "vae-ft-qwen21-folder"
    cli_main("fit", "--vae", base, "--out", folder, "--format", "diffusers", "--run-dir", tmp_path / "run2", *common)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLQwenImage21" and config["in_channels"] == 4
    assert config["latents_std"][0] == 3.2001  # its own published statistics, 64 of them
    theirs = AutoencoderKLQwenImage21.from_pretrained(str(folder), local_files_only=True)
    assert theirs.decoder.conv_out.weight.shape == (4, 24, 3, 3)
    assert torch.equal(theirs.decoder.conv_out.weight.float(), load_vae(out).model.decoder.conv_out.weight)


def _wan22_16x(seed: int = 0) -> dict:
    """A tiny Wan 2.2 of the released shape of levels (three downsamplers and the 2x2 patch: 16x)."""
    torch.manual_seed(seed)
    dsd = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                           patch_size=2, scale_factor_spatial=16).state_dict()
    return {wan22.to_original_key(k, 1): v.to(torch.bfloat16) for k, v in dsd.items()}


def test_patch_and_tile_sides_must_be_multiples_of_the_vaes_16_pixels_per_latent(tmp_path):
    """A 16x VAE: a 40-pixel patch (a multiple of 8, as kl-f8 needs) is refused by fit before anything is
    written, and by the evaluation and tiling, naming the sides that work; a 40-pixel image is padded to 48."""
    from training.metrics import evaluate_vaes
    from training.tiling import reconstruct_tiled

    base = tmp_path / "wan2.2_vae.safetensors"
    save_file(_wan22_16x(), str(base))
    write_images(tmp_path / "images", names=("astronaut",), size=96)
    p = cli_main("fit", "--vae", base, "--data", tmp_path / "images", "--out", tmp_path / "out.safetensors",
                 "--run-dir", tmp_path / "run", "--steps", 1, "--patch-size", 40, "--batch-size", 1, "--lpips-weight", 0,
                 "--no-progress", check=False)
    assert p.returncode != 0
    assert ("patch_size 40 is not a multiple of 16: a Wan 2.2 VAE makes one latent of 16x16 pixels; use 32 or 48"
            in p.stderr), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()
    model = load_vae(base).model
    with pytest.raises(VAEFTError, match="patch size 40 is not a multiple of 16"):
        evaluate_vaes({"base": model}, _images(2, 3, size=40))
    with pytest.raises(VAEFTError, match="tile 40 is not a multiple of 16"):
        reconstruct_tiled(model, _images(1, 3, size=64), tile=40, overlap=8)
    out = reconstruct_tiled(model, _images(1, 3, size=40), tile=64, overlap=8)  # one tile, padded to 48
    assert out.shape == (1, 3, 40, 40) and torch.isfinite(out).all()


def test_a_memory_preset_refusal_through_a_run_writes_nothing(tmp_path, monkeypatch):
    """The session refuses a preset whose card cannot hold the run (here: a CUDA context made huge, so that the
    tiny example does not fit 24 GB) before the run folder or the output exists."""
    import training.config

    monkeypatch.setattr(training.config, "_CONTEXT_GIB", 30.0)
    save_file(wan22_file(5), str(tmp_path / "wan2.2_vae.safetensors"))
    write_images(tmp_path / "images", names=("astronaut",), size=64)
    p = cli_main("fit", "--vae", tmp_path / "wan2.2_vae.safetensors", "--data", tmp_path / "images",
                 "--out", tmp_path / "out.safetensors", "--run-dir", tmp_path / "run", "--steps", 1, "--patch-size", 32,
                 "--batch-size", 1, "--lpips-weight", 0, "--no-progress", "--memory", "24GB+", check=False)
    assert p.returncode != 0 and "memory preset 24GB+ cannot train this Wan 2.2 VAE" in p.stderr, p.stderr[-2000:]
    assert "No preset fits" in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()


def test_fp16_fix_rescales_a_wan22_residual_blocks_conv1_exactly_and_leaves_the_stream():
    """The fp16-fix recipe's exact rescaling on the Wan 2.2 layout: an overflowing residual block's conv1 (before
    its norm) is scaled down by a power of two with the output kept; the residual stream, whose levels add a
    shortcut the plan does not model, is left as it is (stream False), and the encoder is untouched."""
    from training.fp16fix import exact_rescale
    from training.probe import half_precision_report

    sd = wan22_file(3)
    key = "decoder.upsamples.0.upsamples.0.residual.2.weight"
    for k in (key, key.replace("weight", "bias")):
        sd[k] = (sd[k].float() * 1e6).to(torch.bfloat16)
    model = build_vae(sd, source="wan2.2_vae.safetensors").model
    encoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    with torch.no_grad():
        z = model.encode(_images(1, 3, seed=2)).latent_dist.mean
        before = model.decode_unclamped(z)
    assert half_precision_report(model, z)["fp16"]["nonfinite_pixels"] > 0  # built to overflow
    report = exact_rescale(model, z, 65504 / 4)
    assert report["exact"] and report["conv1"] >= 1 and report["stream"] is False and report["segments"] == 0
    with torch.no_grad():
        after = model.decode_unclamped(z)
    assert torch.allclose(after, before, atol=1e-3 * max(1.0, float(before.abs().max())))
    assert half_precision_report(model, z)["fp16"]["safe"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.items())
