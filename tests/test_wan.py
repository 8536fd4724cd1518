"""The Wan 2.1 family (the Qwen-Image VAE): reading both layouts, the key maps against diffusers' own
converter, the exact 2D path against diffusers' 3D forward, decoder-only training and its export, and the
families this version refuses by name."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_server import COMFY_LOADER_PREAMBLE, comfyui_path
from conftest import cli_main, tiny_ldm_sd, train, write_images
from training.config import TrainConfig
from training.errors import VAEFTError
from training.export import export_vae
from training.families import wan
from training.probe import make_probe
from training.vae import build_vae, load_vae

TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])


def tiny_wan(seed: int = 0, **overrides):
    """A small AutoencoderKLQwenImage (diffusers initialises its weights) for CPU tests."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**{**TINY, **overrides})


def tiny_wan_sd(seed: int = 0, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    """Its tensors in the original (ComfyUI) layout, as the released qwen_image_vae.safetensors has them."""
    dsd = tiny_wan(seed, **overrides).state_dict()
    per = overrides.get("num_res_blocks", TINY["num_res_blocks"]) + 2
    return {wan.to_original_key(k, per): v.detach().to(dtype).clone() for k, v in dsd.items()}


def images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_key_maps_are_exact_and_agree_with_diffusers_converter():
    """Both ways over the full-size model's 194 keys; the forward map is what diffusers' own
    convert_wan_vae_to_diffusers makes of the original layout."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        keys = list(AutoencoderKLQwenImage().state_dict())
    assert len(keys) == 194
    original = [wan.to_original_key(k) for k in keys]
    assert len(set(original)) == 194 and "decoder.middle.0.residual.0.gamma" in original
    assert [wan.to_diffusers_key(k) for k in original] == keys
    theirs = convert_wan_vae_to_diffusers({k: i for i, k in enumerate(original)})
    assert {k: original[i] for k, i in theirs.items()} == dict(zip(keys, original))
    with pytest.raises(VAEFTError, match="not part of a Wan 2.1 VAE"):
        wan.to_diffusers_key("decoder.upsamples.0.residual.9.weight")


@pytest.mark.parametrize("case,expected", [
    ("c64", "a 64-channel VAE of another layout than the Wan one (HunyuanImage 2.1's, 32x)"),
    ("svd", "a video VAE with a temporal decoder"),
    ("mixed", "the encoder and decoder do not fit together"),
    ("5ch", "a Wan 2.1 VAE of 5-channel images; this version trains Wan 2.1 VAEs of RGB images (3 channels: "
            "qwen_image_vae.safetensors, wan_2.1_vae.safetensors) and of RGBA images (4 channels: "
            "Qwen-Image-Layered's"),
    ("squeezed", "decoder.middle.1.to_qkv.weight (96, 32) (expected (96, 32, 1, 1))"),
])
def test_families_this_version_does_not_train_are_refused_by_name(case, expected):
    if case == "c64":  # kl-f8-like names, 64 latent channels: not a Wan-layout VAE
        sd = {k: v for k, v in tiny_ldm_sd().items() if not k.startswith("post_quant_conv.")}
        sd["decoder.conv_in.weight"] = torch.zeros(64, 64, 3, 3)
    elif case == "svd":
        sd = {**tiny_ldm_sd(), "decoder.mid.block_1.mix_factor": torch.zeros(1)}
    elif case == "5ch":  # RGB and RGBA (Qwen-Image-Layered's, tests/test_rgba.py) train; other counts do not
        sd = tiny_wan_sd(input_channels=5)
    elif case == "squeezed":  # only kl-f8's attention weights may be stored without their trailing 1s
        sd = tiny_wan_sd()
        sd["decoder.middle.1.to_qkv.weight"] = sd["decoder.middle.1.to_qkv.weight"][:, :, 0, 0]
    else:
        other = tiny_wan_sd(z_dim=8)
        sd = {k: (other[k] if k.startswith(("encoder.", "conv1.")) else v) for k, v in tiny_wan_sd().items()}
    with pytest.raises(VAEFTError, match=re.escape(expected)) as e:
        build_vae(sd, source="x.safetensors")
    if case not in ("mixed", "5ch", "squeezed"):
        assert "Wan 2.1 VAE (Qwen-Image, Wan 2.1)" in str(e.value) and "kl-f8" in str(e.value)


def test_the_fp16_check_watches_every_decoder_block_of_the_2d_path_and_the_unclamped_output():
    """The 2D path computes its convolutions and norms without calling those modules; their forward
    hooks still run, so the export's fp16/bf16 report sees each block's activations, and it reads the
    decoder's output before the clamp (pixels pushed past white are what it reports)."""
    from training.families import family_of
    from training.probe import half_precision_report

    vae = build_vae(tiny_wan_sd(seed=9)).model
    z = vae.encode(images(1, 32, seed=9)).latent_dist.mode()
    report = half_precision_report(vae, z)
    blocks = set(report["fp16"]["max_activation"])
    assert blocks == {"post_quant_conv", "conv_in", "mid_block", "up_blocks.0", "up_blocks.1", "norm_out", "conv_out"}
    assert all(0 < v < float("inf") for v in report["fp16"]["max_activation"].values())
    with torch.no_grad():
        vae.decoder.conv_out.bias += 5.0
        assert float(vae.decode(z).sample.max()) <= 1.0
        raw = family_of(vae).raw_decode(vae, z)
    assert float(raw.min()) > 1.0 and report["fp16"]["max_activation"]["conv_out"] < 5.0
    assert half_precision_report(vae, z)["fp16"]["max_activation"]["conv_out"] > 4.0


def test_the_2d_path_equals_diffusers_3d_forward_and_its_gradients():
    """At one frame the causal 3D convolutions only use their last temporal tap: the 2D path gives the
    same latents, reconstruction and decoder gradients as diffusers' own forward (fp32, to 1e-5)."""
    vae = build_vae(tiny_wan_sd(seed=1)).model
    x = images(2, 32, seed=3)
    results = {}
    for path in ("3d", "2d"):
        vae.image_path = path
        vae.zero_grad(set_to_none=True)
        vae.requires_grad_(True)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.mean).sample
        (y.square().mean() + post.logvar.mean()).backward()
        grads = {k: p.grad.detach().clone() for k, p in vae.named_parameters() if p.grad is not None}
        results[path] = (post.mean.detach(), post.logvar.detach(), y.detach(), grads)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-12))  # noqa: E731
    for got, want in zip(results["2d"][:3], results["3d"][:3]):
        assert got.shape == want.shape and rel(got, want) < 1e-5
    g2, g3 = results["2d"][3], results["3d"][3]
    assert set(g2) == set(g3) and len(g2) > 40
    assert not any("time_conv" in k for k in g3)  # the temporal resampling gets no gradient from one frame
    assert max(rel(g2[k], g3[k]) for k in g3 if g3[k].norm() > 0) < 1e-4
    # gradient checkpointing (2D path only) gives the same gradients
    vae.image_path = "2d"
    vae.enable_gradient_checkpointing()
    vae.zero_grad(set_to_none=True)
    post = vae.encode(x).latent_dist
    (vae.decode(post.mean).sample.square().mean() + post.logvar.mean()).backward()
    assert max(rel(p.grad, g2[k]) for k, p in vae.named_parameters() if k in g2 and g2[k].norm() > 0) < 1e-5
    vae.image_path = "3d"
    with pytest.raises(VAEFTError, match="needs its 2D path"):
        vae.enable_gradient_checkpointing()


@pytest.fixture(scope="module")
def trained_wan():
    sd = tiny_wan_sd(seed=2, dtype=torch.bfloat16)  # the released files are bf16
    base = build_vae(sd, source="qwen_image_vae.safetensors")
    x = images(4, 32)
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0)
    return sd, base, train(base, itertools.repeat(x[:2]), cfg, device="cpu", probe=make_probe(base, x))


def test_decoder_only_export_keeps_every_untrained_tensor_byte_identical(tmp_path, trained_wan):
    sd, base, result = trained_wan
    report = export_vae(result, tmp_path / "vae-ft-qwen-2.safetensors")
    out = load_file(report.path)
    assert set(out) == set(sd) and all(out[k].shape == sd[k].shape and out[k].dtype == torch.bfloat16 for k in sd)
    frozen = [k for k in sd if k.startswith(("encoder.", "conv1.")) or ".time_conv." in k]
    assert any(".time_conv." in k and k.startswith("decoder.") for k in frozen)
    for k in frozen:
        assert torch.equal(out[k].view(torch.int16), sd[k].view(torch.int16)), k
    assert not torch.equal(out["decoder.head.2.weight"], sd["decoder.head.2.weight"])
    assert report.frozen_identical is True
    text = report.text()
    assert "untrained tensors (encoder, conv1 and the temporal resampling): bit-identical to the base file" in text
    assert "latent statistics: per-channel mean and std of 16 channels: Wan 2.1's published" in text
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.vae_family"] == "wan2.1" and meta["vaeft.latent_family"] == "wan2.1"
    assert json.loads(meta["vaeft.latents_mean"])[:2] == [-0.7571, -0.7089]
    assert "one frame" in meta["vaeft.trained_on"]
    assert meta["vaeft.fp16_safe"] in ("true", "false")
    # the export loads back as the same family, and its encoder gives the base's latents exactly
    again = load_vae(report.path)
    x = images(1, 32, seed=9)
    assert torch.equal(again.model.encode(x).latent_dist.mean, base.model.encode(x).latent_dist.mean)


def test_diffusers_folder_loads_with_its_own_class_and_decodes_like_ours(tmp_path, trained_wan):
    from diffusers import AutoencoderKLQwenImage

    _, _, result = trained_wan
    report = export_vae(result, tmp_path / "vae-ft-qwen-2", format="diffusers", dtype="fp32")
    assert report.format == "diffusers" and "latent statistics" in report.text()
    model, info = AutoencoderKLQwenImage.from_pretrained(str(tmp_path / "vae-ft-qwen-2"), local_files_only=True,
                                                         output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.latents_mean[0] == -0.7571 and model.config.base_dim == 16
    z = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs = model.decode(z).sample[:, :, 0]
    ours = result.model.decode(z[:, :, 0]).sample
    assert (theirs - ours).abs().max() < 1e-5
    with pytest.raises(VAEFTError, match="latent family of kl-f8 VAEs"):
        export_vae(result, tmp_path / "x.safetensors", family="sdxl")


def test_training_with_the_2d_and_the_3d_path_agrees():
    base = build_vae(tiny_wan_sd(seed=4))
    x = images(2, 32, seed=5)
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0, log_every=1,
                      posterior="mode", ema=False)
    fast = train(base, itertools.repeat(x), cfg, device="cpu")
    slow = train(base, itertools.repeat(x), cfg.replace(wan_2d=False), device="cpu")
    assert fast.history[0]["mse"] == pytest.approx(slow.history[0]["mse"], rel=1e-5)
    assert fast.history[1]["mse"] == pytest.approx(slow.history[1]["mse"], rel=1e-3)
    checkpointed = train(base, itertools.repeat(x), cfg.replace(grad_checkpointing=True), device="cpu")
    assert checkpointed.history[1]["mse"] == pytest.approx(fast.history[1]["mse"], rel=1e-5)


def test_full_mode_and_the_gan_recipe_train_a_wan_vae(tmp_path, lpips_random):
    """The encoder trains too (its temporal resampling still cannot: untouched), the latent statistics are
    re-estimated per channel; LDM's GAN recipe finds the decoder's last layer for its adaptive weight."""
    base = build_vae(tiny_wan_sd(seed=7))
    x = images(8, 32, seed=8)
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0, trainable="full")
    full = train(base, itertools.repeat(x[:2]), cfg, device="cpu", probe=make_probe(base, x))
    report = export_vae(full, tmp_path / "full.safetensors")
    out, sd = load_file(report.path), tiny_wan_sd(seed=7)
    assert not torch.equal(out["encoder.conv1.weight"], sd["encoder.conv1.weight"])
    assert all(torch.equal(out[k], sd[k]) for k in sd if ".time_conv." in k)
    assert report.scaling["source"].startswith("re-estimated per channel on")
    assert len(report.scaling["latents_std"]) == 16 and report.scaling["latents_std"] != wan.LATENTS_STD
    gan = TrainConfig.from_recipe("ldm-gan", steps=2, disc_start=1, lr=1e-3, batch_size=2, preview_every=0,
                                  log_every=1)
    result = train(base, itertools.repeat(x[:2]), gan, device="cpu", lpips_net=lpips_random)
    assert "g_loss" in result.history[-1] and "d_loss" in result.history[-1]


def test_eval_compares_a_base_and_a_tuned_qwen_image_vae(tmp_path, trained_wan):
    sd, _, result = trained_wan
    save_file(sd, str(tmp_path / "qwen_image_vae.safetensors"))
    tuned = export_vae(result, tmp_path / "vae-ft-qwen-2.safetensors").path
    write_images(tmp_path / "images", names=("astronaut", "coffee"), size=64)
    p = cli_main("eval", "--vae", tmp_path / "qwen_image_vae.safetensors", "--vae", tuned, "--data",
                 tmp_path / "images", "--patch-size", 32, "--count", 2, "--foreground-threshold", 0)
    out = json.loads(p.stdout)
    assert set(out["data"]) == {"qwen_image_vae", "vae-ft-qwen-2"}
    assert all(out["data"][n]["psnr"]["mean"] > 0 and out["data"][n]["latent_channels"] == 16 for n in out["data"])


def test_fit_from_the_command_line_with_a_qwen_image_vae(tmp_path):
    save_file(tiny_wan_sd(seed=6, dtype=torch.bfloat16), str(tmp_path / "qwen_image_vae.safetensors"))
    write_images(tmp_path / "images", names=("astronaut", "coffee", "chelsea"), size=64)
    out = tmp_path / "vae-ft-qwen-3.safetensors"
    p = cli_main("fit", "--vae", tmp_path / "qwen_image_vae.safetensors", "--data", tmp_path / "images", "--out", out,
                 "--steps", 3, "--patch-size", 32, "--batch-size", 2, "--lpips-weight", 0, "--no-progress",
                 "--run-dir", tmp_path / "run", "--val-every", 3, "--val-patches", 2)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["final"]["val_mse"] > 0
    assert "untrained tensors (encoder, conv1 and the temporal resampling): bit-identical" in p.stderr
    assert set(load_file(out)) == set(load_file(tmp_path / "qwen_image_vae.safetensors"))
    # settings this family cannot train with are refused by name before anything is written
    for flags, why in ((("--weight-decay", 0.01), "weight decay would shrink them"),
                       (("--no-wan-2d", "--grad-checkpointing"), "needs its 2D path (wan_2d on)")):
        p = cli_main("fit", "--vae", tmp_path / "qwen_image_vae.safetensors", "--data", tmp_path / "images",
                     "--out", tmp_path / "refused.safetensors", "--steps", 3, "--patch-size", 32, "--batch-size", 2,
                     "--lpips-weight", 0, "--no-progress", "--run-dir", tmp_path / "refused", *flags, check=False)
        assert p.returncode != 0 and why in p.stderr
        assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.safetensors").exists()


# ----- oracles: ComfyUI's own loader and diffusers' single-file loader on a full-size export

COMFY_WAN = COMFY_LOADER_PREAMBLE + r'''
out = {}
jobs = json.load(open(jobs_path))
image = torch.load(jobs["image"])
for name, path in jobs["files"].items():
    messages.clear()
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    vae.throw_exception_if_invalid()
    latent = vae.encode(image)
    decoded = vae.decode(latent)
    torch.save({"latent": latent.float(), "decoded": decoded.float()}, path + ".comfy.pt")
    out[name] = {"messages": list(messages), "model": type(vae.first_stage_model).__name__,
                 "latent_channels": vae.latent_channels}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.integration
def test_comfyui_and_diffusers_load_a_full_size_export_as_the_wan_vae(tmp_path):
    """The released layout, full size, bf16: ComfyUI's Load VAE code builds WanVAE from the export with no
    missing or leftover keys; its latents of an image equal those of the base (the latent space kept) and
    its decode is finite; diffusers' AutoencoderKLWan.from_single_file (a local config) decodes like it."""
    import copy
    import os
    import subprocess
    import sys

    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    from training.trained import Trained
    from training.vae import frozen_sha256

    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to load exports with its loader")
    torch.manual_seed(0)
    sd = {wan.to_original_key(k): v.to(torch.bfloat16) for k, v in AutoencoderKLQwenImage().state_dict().items()}
    save_file(sd, str(tmp_path / "qwen_image_vae.safetensors"))
    base = build_vae(sd, source="qwen_image_vae.safetensors")
    tuned = copy.deepcopy(base.model)
    with torch.no_grad():  # a decoder moved away from the base, as training would (minutes on a CPU otherwise)
        for name, p in tuned.named_parameters():
            if name.startswith("decoder.") and ".time_conv." not in name:
                p.add_(torch.randn_like(p) * 1e-3)
    result = Trained(model=tuned, layout=base.layout, config=TrainConfig(steps=1), history=[], steps_done=1,
                     base_frozen_sha256=frozen_sha256(base.model, "decoder"))
    report = export_vae(result, tmp_path / "vae-ft-qwen-1.safetensors")
    assert report.frozen_identical is True
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    torch.save(image, tmp_path / "image.pt")
    jobs = {"image": str(tmp_path / "image.pt"),
            "files": {"base": str(tmp_path / "qwen_image_vae.safetensors"), "tuned": report.path}}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "load.py").write_text(COMFY_WAN)
    p = subprocess.run([sys.executable, str(tmp_path / "load.py"), comfy, str(tmp_path / "jobs.json")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    for name in ("base", "tuned"):
        assert out[name]["model"] == "WanVAE" and out[name]["latent_channels"] == 16, out[name]
        assert not [m for m in out[name]["messages"] if "Missing VAE keys" in m or "Leftover VAE keys" in m], out
    base_out = torch.load(jobs["files"]["base"] + ".comfy.pt")
    tuned_out = torch.load(report.path + ".comfy.pt")
    assert torch.equal(tuned_out["latent"], base_out["latent"])  # the encoder is the base's, bit for bit
    assert torch.isfinite(tuned_out["decoded"]).all() and not torch.equal(tuned_out["decoded"], base_out["decoded"])
    # diffusers' own single-file loader, its config given locally (no hub here), decodes the same latents alike
    AutoencoderKLWan().save_config(tmp_path / "wan_config")
    theirs = AutoencoderKLWan.from_single_file(report.path, config=str(tmp_path / "wan_config"),
                                               torch_dtype=torch.float32).eval()
    with torch.no_grad():
        decoded = theirs.decode(tuned_out["latent"]).sample  # (1, 3, 1, 64, 64) in [-1, 1]
    comfy_image = tuned_out["decoded"].reshape(1, 64, 64, 3)  # ComfyUI: [0, 1], channels last
    assert (((decoded[:, :, 0] + 1) / 2).clamp(0, 1).movedim(1, -1) - comfy_image).abs().max() < 1e-3
