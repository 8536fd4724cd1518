"""The fp16-fix recipe (issue 21): the exact rescaling on its own, the teacher target and the activation
penalty in the loop, the figures during the run, and the export of a VAE built to overflow fp16."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import tiny_ldm_sd, train
from safetensors import safe_open
from test_flux2 import tiny_diffusers as tiny_flux2
from test_wan import tiny_wan_sd

from training.config import RECIPES, TrainConfig
from training.errors import VAEFTError
from training.export import export_vae
from training.families import family_of
from training.fp16plan import _stream_plan, exact_rescale
from training.probe import FP16_MAX, half_precision_report, make_probe
from training.vae import build_vae

THRESHOLD = 4096.0


def overflowing_ldm_sd(seed: int = 1) -> dict[str, torch.Tensor]:
    """A tiny kl-f8 VAE whose decoder.conv_in is scaled 1e5x (as tests/test_export_half.py builds one): its
    activations pass fp16's 65504, while fp32 holds them and the GroupNorm after undoes the scale."""
    sd = tiny_ldm_sd(seed=seed)
    for k in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        sd[k] = sd[k] * 1e5
    return sd


def images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(model, n=2, side=4, seed=0):
    c = model.decoder.conv_in.weight.shape[1]  # the latent channels (post_quant_conv keeps them)
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def raw(model, z):
    with torch.no_grad():
        return family_of(model).raw_decode(model, z).float()


def encoder_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}


# ----- the exact rescaling on its own


@pytest.mark.parametrize("family", ["kl-f8", "flux2"])
def test_exact_rescale_of_the_residual_stream_keeps_the_output_and_makes_fp16_safe(family):
    if family == "kl-f8":
        model = build_vae(overflowing_ldm_sd(), source="bad.safetensors").model
    else:
        sd = tiny_flux2(seed=2).state_dict()
        sd = {k: v * 1e5 if k.startswith("decoder.conv_in.") else v for k, v in sd.items()}
        model = build_vae(sd, source="flux2 diffusers").model
    assert family_of(model).name == family
    z = latents(model)
    assert half_precision_report(model, z)["fp16"]["nonfinite_pixels"] > 0  # built to overflow
    before, enc = raw(model, z), encoder_state(model)
    report = exact_rescale(model, z, THRESHOLD / 2)
    assert report["exact"] and report["stream"] and report["segments"] >= 1
    assert report["peak_before"] > FP16_MAX and report["peak_after"] <= THRESHOLD / 2 * 1.001
    after = raw(model, z)
    assert float((after - before).abs().max()) <= 1e-3 * max(1.0, float(before.abs().max()))
    assert report["max_change"] == pytest.approx(float((after - before).abs().max()), abs=1e-6)
    fp16 = half_precision_report(model, z)["fp16"]
    assert fp16["safe"] and fp16["nonfinite_pixels"] == 0 and max(fp16["max_activation"].values()) < THRESHOLD
    assert all(torch.equal(v, encoder_state(model)[k]) for k, v in enc.items())  # the encoder untouched


def test_exact_rescale_of_a_conv1_before_a_norm_in_the_wan_family():
    sd = tiny_wan_sd(seed=3)
    key = next(k for k in sorted(sd) if k.startswith("decoder.") and k.endswith("residual.2.weight"))
    sd[key] = sd[key] * 1e6
    sd[key.replace("weight", "bias")] = sd[key.replace("weight", "bias")] * 1e6
    model = build_vae(sd, source="qwen_image_vae.safetensors").model
    z = latents(model)
    assert half_precision_report(model, z)["fp16"]["nonfinite_pixels"] > 0
    before = raw(model, z)
    report = exact_rescale(model, z, THRESHOLD / 2)
    assert report["exact"] and report["conv1"] >= 1 and report["stream"] and report["segments"] == 0
    assert torch.allclose(raw(model, z), before, atol=1e-3 * max(1.0, float(before.abs().max())))
    assert report["peak_before"] > FP16_MAX and report["peak_after"] < THRESHOLD
    assert half_precision_report(model, z)["fp16"]["safe"]


def _wan_with(factor_on: str, factor: float = 1e6):
    """The tiny Wan VAE (one 3D upsampler) with one decoder layer's weight and bias scaled ``factor``x."""
    sd = tiny_wan_sd(seed=3)
    key = next(k for k in sorted(sd) if k.startswith("decoder.") and k.endswith(factor_on))
    for k in (key, key.replace(".weight", ".bias")):
        sd[k] = sd[k] * factor
    return build_vae(sd, source="qwen_image_vae.safetensors").model


def _video(model, seed=1):
    """diffusers' own 3D decode of 3 latent frames (5 video frames): what a video pipeline runs."""
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model._decode(z).sample


def test_exact_rescale_of_the_wan_residual_stream_keeps_video_decoding_and_the_temporal_upsampling():
    """The stream after the 3D upsampler is rescaled (its convolution overflows); the segment before it,
    which the upsampler's time_conv reads in video decoding, is pinned: time_conv stays byte-identical and
    a 3-frame video decodes as before."""
    model = _wan_with("resample.1.weight")
    z = latents(model)
    assert half_precision_report(model, z)["fp16"]["nonfinite_pixels"] > 0
    before, video, enc = raw(model, z), _video(model), encoder_state(model)
    temporal = {k: v.clone() for k, v in model.state_dict().items() if ".time_conv." in k}
    report = exact_rescale(model, z, THRESHOLD / 2)
    assert report["exact"] and report["segments"] == 1 and report["pinned"] == 1
    assert report["peak_before"] > FP16_MAX and report["peak_after"] <= THRESHOLD / 2 * 1.001
    assert torch.allclose(raw(model, z), before, atol=1e-3 * max(1.0, float(before.abs().max())))
    after_video = _video(model)
    assert after_video.shape[2] == 5 and torch.allclose(after_video, video, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in temporal.items())
    assert all(torch.equal(v, encoder_state(model)[k]) for k, v in enc.items())
    fp16 = half_precision_report(model, z)["fp16"]
    assert fp16["safe"] and fp16["max_activation"]["up_blocks.0"] <= THRESHOLD / 2 * 1.001  # the upsampler's output


def test_exact_rescale_leaves_a_pinned_wan_segment_as_it_is():
    """An overflow in the stream before the 3D upsampler (decoder.conv1 scaled) is not rescaled: nothing
    exact reaches it without changing time_conv. The segment after the upsampler is (its convolution reads
    the overflowing stream); the peak stays above fp16's limit, in the pinned segment, and the report says so."""
    model = _wan_with("decoder.conv1.weight", 1e6)
    z = latents(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before, video = raw(model, z), _video(model)
    report = exact_rescale(model, z, THRESHOLD / 2)
    assert report["exact"] and report["segments"] == 1 and report["pinned"] == 1
    assert report["peak_after"] > FP16_MAX
    assert torch.allclose(raw(model, z), before, atol=1e-3 * max(1.0, float(before.abs().max())))
    assert torch.allclose(_video(model), video, atol=1e-4)
    kept = [k for k in state if k.startswith(("decoder.conv_in.", "decoder.mid_block.", "decoder.up_blocks.0.resnets."))
            or ".time_conv." in k]
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in kept)
    assert not half_precision_report(model, z)["fp16"]["safe"]


def test_the_rescaling_is_by_powers_of_two_so_a_bf16_base_is_written_back_without_rounding(tmp_path):
    """Every rescaled tensor of the export (a bf16 base, written in its dtype) is the base's times a power of
    two, exactly: nothing is rounded, so the fixed file decodes as the base does in fp32 up to the scale."""
    import math

    from safetensors.torch import load_file, save_file

    bad = {k: v.to(torch.bfloat16) for k, v in overflowing_ldm_sd().items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    vae = build_vae(bad, source="bad.safetensors")
    x = images()
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=1, stop_when_safe=True, val_every=1), device="cpu",
                   val_batch=x[2:], probe=make_probe(vae, x[2:]))
    assert result.fp16_fix["safe_step"] == 0 and result.fp16_fix["rescale"]["segments"] >= 2
    report = export_vae(result, tmp_path / "fixed.safetensors")
    assert report.fp16_safe is True and report.stored_dtypes == {"bf16": len(bad)}
    fixed, factors = load_file(report.path), set()
    for k, v in bad.items():
        ratio = (fixed[k].float() / v.float())[v != 0]
        factor = float(ratio[0]) if ratio.numel() else 1.0
        assert torch.equal(fixed[k].float(), v.float() * factor), k
        assert math.log2(factor) == round(math.log2(factor)), (k, factor)
        factors.add(factor)
    assert len(factors) > 2  # several segments, each its own power of two
    fp16 = report.half_precision["fine_tuned"]["fp16"]
    assert fp16["psnr_vs_base"] == pytest.approx(fp16["psnr"], abs=0.5)


def test_exact_rescale_of_a_wan_decoder_in_the_released_layout():
    """Wan 2.1's own layout, narrow (dim_mult [1, 2, 4, 4]: two 3D upsamplers, then a 2D one; a shortcut block
    after the first), every decoder convolution scaled up 1-30x: the two segments before the 3D upsamplers are
    pinned, the others rescaled; the image and a 3-frame video (9 frames out) decode as before, time_conv is
    untouched."""
    sd = tiny_wan_sd(seed=4, dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True])
    g = torch.Generator().manual_seed(0)
    for k in sorted(sd):
        if k.startswith("decoder.") and ".time_conv." not in k and sd[k].ndim >= 4:
            factor = float(1 + 29 * torch.rand(1, generator=g))
            sd[k], sd[k.replace(".weight", ".bias")] = sd[k] * factor, sd[k.replace(".weight", ".bias")] * factor
    model = build_vae(sd, source="qwen_image_vae.safetensors").model
    plan = [kind for kind, _ in _stream_plan(model)]
    assert plan.count("pinned") == 2 and "shortcut" in plan and plan.count("entry") == 4  # conv_in, 3 upsamplers
    z = latents(model)
    before, video = raw(model, z), _video(model)
    temporal = {k: v.clone() for k, v in model.state_dict().items() if ".time_conv." in k}
    report = exact_rescale(model, z, 4.0)
    assert report["exact"] and report["pinned"] == 2 and report["segments"] >= 2 and report["conv1"] >= 1
    assert torch.allclose(raw(model, z), before, atol=1e-5 * max(1.0, float(before.abs().max())))
    after_video = _video(model)
    assert after_video.shape[2] == 9 and torch.allclose(after_video, video, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in temporal.items())


def test_the_penalty_counts_each_activation_once_and_not_in_the_backward_recompute():
    """A tensor several modules return (an upsampler's output is also its sequence's and its convolution's) is
    one term; gradient checkpointing's recompute in the backward pass runs the hooks again and adds none."""
    from training.fp16fix import ActivationPenalty, decoder_modules

    model = build_vae(tiny_wan_sd(seed=3), source="qwen_image_vae.safetensors").model.train()
    model.decoder.requires_grad_(True)  # as the training copy's
    model.enable_gradient_checkpointing()
    penalty = ActivationPenalty(model, threshold=1e-3)  # every activation above it: every term positive
    calls = []  # the outputs themselves (held, so that no id is reused while counting)

    def count(_m, _i, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            calls.append(out)

    handles = [m.register_forward_hook(count) for _, m in decoder_modules(model)]
    penalty.clear()
    out = model.decode(latents(model)).sample
    assert len(penalty.terms) == len({id(t) for t in calls}) < len(calls)
    act, _ = penalty.take()
    calls.clear()
    (out.square().mean() + act).backward()
    assert calls and penalty.terms == [] and penalty.peaks == []  # the recompute ran the hooks; nothing counted
    for h in handles + penalty.handles:
        h.remove()


def test_exact_rescale_leaves_a_safe_vae_as_it_is():
    model = build_vae(tiny_ldm_sd(seed=1), source="ok.safetensors").model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = exact_rescale(model, latents(model), THRESHOLD / 2)
    assert report["exact"] and (report["conv1"], report["segments"]) == (0, 0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_exact_rescale_is_undone_when_it_would_change_the_output():
    model = build_vae(overflowing_ldm_sd(), source="bad.safetensors").model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # a target so small that GroupNorm's eps (1e-6) is no longer negligible beside the variance
    report = exact_rescale(model, latents(model), 1e-6)
    assert not report["exact"] and report["max_change"] > 1e-3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ----- the recipe


def test_the_recipe_and_its_settings():
    cfg = TrainConfig.from_recipe("fp16-fix")
    assert (cfg.target, cfg.act_weight, cfg.exact_rescale, cfg.trainable) == ("base", 1.0, True, "decoder")
    assert cfg.recipe_label() == "fp16-fix" and "fp16-fix" in RECIPES
    assert TrainConfig.from_recipe("fp16-fix", act_weight=0.5).recipe_label() == "custom (from fp16-fix: act_weight)"
    with pytest.raises(VAEFTError, match="stop_when_safe needs validation"):
        TrainConfig.from_recipe("fp16-fix", stop_when_safe=True, val_every=0)
    with pytest.raises(VAEFTError, match="act_threshold must be at most 65504"):
        TrainConfig(act_threshold=70000.0)


def _cfg(**kw):
    base = {"steps": 4, "lr": 1e-4, "batch_size": 2, "lpips_weight": 0.0, "preview_every": 0, "val_every": 2,
            "log_every": 1, "ema": False}
    return TrainConfig.from_recipe("fp16-fix", **{**base, **kw})


def test_the_target_is_the_base_decode_and_the_penalty_counts_activations_above_the_threshold():
    """Without the rescaling, at step 1 the decoder is the base's: the MSE to the base's decode of the same
    (sampled) latents is 0, while the MSE to the images is not; the penalty sees the overflowing activations."""
    vae = build_vae(overflowing_ldm_sd(), source="bad.safetensors")
    x = images()
    teacher = train(vae, itertools.repeat(x[:2]), _cfg(steps=1, exact_rescale=False), device="cpu", val_batch=x[2:])
    images_target = train(vae, itertools.repeat(x[:2]), _cfg(steps=1, exact_rescale=False, target="images"),
                          device="cpu", val_batch=x[2:])
    first = teacher.history[-1]
    assert first["step"] == 1 and first["mse"] < 1e-10 and images_target.history[-1]["mse"] > 1e-3
    assert first["act_peak"] > FP16_MAX and first["act"] > 1.0
    base_line = teacher.history[0]
    assert base_line["step"] == 0 and base_line["val_fp16_peak"] == float("inf") and base_line["val_fp16_nonfinite"] > 0


def test_fp16_fix_makes_a_vae_built_to_overflow_safe_and_keeps_its_output(tmp_path):
    vae = build_vae(overflowing_ldm_sd(), source="bad.safetensors")
    x = images()
    probe = make_probe(vae, x[2:])
    assert probe.base_report["fp16"]["nonfinite_pixels"] == probe.base_report["pixels"]  # black in fp16
    trained = train(vae, itertools.repeat(x[:2]), _cfg(steps=4), device="cpu", val_batch=x[2:], probe=probe)
    base, last = trained.history[0], trained.history[-1]
    assert base["step"] == 0 and base["val_fp16_peak"] == float("inf") and base["val_fp16_psnr"] < 10
    assert last["step"] == 4 and last["val_fp16_nonfinite"] == 0 and last["val_fp16_peak"] <= THRESHOLD
    assert last["val_fp16_psnr"] >= 30 and last["mse"] == 0.0  # the rescaled decoder is the target: nothing moved
    # with stop_when_safe the run ends before the first step: the rescaling made it safe
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=4, stop_when_safe=True), device="cpu",
                   val_batch=x[2:], probe=probe)
    assert result.steps_done == 0 and result.fp16_fix["safe_step"] == 0
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in result.model.state_dict().items())
    rescale = result.fp16_fix["rescale"]
    assert rescale["exact"] and rescale["peak_before"] > FP16_MAX and rescale["peak_after"] <= THRESHOLD / 8 * 1.001
    report = export_vae(result, tmp_path / "fixed.safetensors")
    hp = report.half_precision
    assert report.fp16_safe is True and report.frozen_identical is True  # encoder byte for byte
    assert hp["base"]["fp16"]["safe"] is False and hp["fine_tuned"]["fp16"]["psnr_vs_base"] >= 30
    assert max(hp["fine_tuned"]["fp16"]["max_activation"].values()) <= THRESHOLD
    text = report.text()
    assert "fp16-fix: trained towards the base VAE's own fp32 decode" in text and "exact rescaling first" in text
    assert "fp16-safe on the held-out patches before the first step: not trained" in text
    fp16_line = next(line for line in text.splitlines() if line.strip().startswith("fp16: "))
    assert f"dB against its own fp32 decode, {hp['fine_tuned']['fp16']['psnr_vs_base']:.1f} dB against the base's" \
        in fp16_line
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.fp16_safe"] == "true" and meta["vaeft.recipe"] == "custom (from fp16-fix: lpips_weight)"
    fix = json.loads(meta["vaeft.fp16_fix"])
    assert fix["safe_step"] == 0 and fix["rescale"]["exact"] is True


def test_the_penalty_alone_brings_activations_above_the_threshold_down_and_keeps_the_output_close():
    """What the rescaling cannot fix is left to the penalty: here the rescaling is off, every decoder
    convolution is 3x its size (largest activation 48.8) and act_threshold is 16. Twenty steps at lr 1e-4 and
    act_weight 0.01 bring the largest fp16 activation of the held-out patches down while their fp16 decode
    keeps 30 dB PSNR or more against the base's fp32 decode (measured: 48.8 -> 44.4, 56.5 -> 34.8 dB)."""
    sd = {k: v * 3 if k.startswith("decoder.") and "norm" not in k else v for k, v in tiny_ldm_sd(seed=1).items()}
    vae = build_vae(sd, source="loud.safetensors")
    x = images(6)
    batches = (x[i % 2 * 2:i % 2 * 2 + 2] for i in itertools.count())
    result = train(vae, batches, _cfg(steps=20, val_every=20, log_every=5, exact_rescale=False, act_threshold=16.0,
                                      act_weight=0.01), device="cpu", val_batch=x[4:])
    first, last = result.history[0], result.history[-1]
    assert first["step"] == 0 and first["val_fp16_peak"] > 40 and first["val_fp16_psnr"] > 50
    assert last["step"] == 20 and last["val_fp16_peak"] < 0.95 * first["val_fp16_peak"]
    assert last["val_fp16_psnr"] >= 30 and last["act"] > 0 and last["mse"] > 0  # it trained, against the base


def test_fp16_fix_leaves_a_safe_vae_unchanged():
    """Already safe: nothing to rescale, the decode equals the target (gradient 0), no penalty: the
    weights come out exactly the base's."""
    vae = build_vae(tiny_ldm_sd(seed=1), source="ok.safetensors")
    x = images()
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=3), device="cpu", val_batch=x[2:])
    assert (result.fp16_fix["rescale"]["conv1"], result.fp16_fix["rescale"]["segments"]) == (0, 0)
    assert all(h.get("act", 0.0) == 0.0 for h in result.history)
    base = vae.model.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in result.model.state_dict().items())


def test_fp16_fix_on_a_wan_vae_trains_and_comes_out_safe(tmp_path):
    sd = tiny_wan_sd(seed=3)
    key = next(k for k in sorted(sd) if k.startswith("decoder.") and k.endswith("residual.2.weight"))
    sd[key], sd[key.replace("weight", "bias")] = sd[key] * 1e6, sd[key.replace("weight", "bias")] * 1e6
    vae = build_vae(sd, source="qwen_image_vae.safetensors")
    x = images(size=16)
    probe = make_probe(vae, x[2:])
    assert not probe.base_report["fp16"]["safe"]
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=2), device="cpu", val_batch=x[2:], probe=probe)
    assert result.fp16_fix["rescale"]["conv1"] >= 1
    report = export_vae(result, tmp_path / "qwen_fixed.safetensors")
    assert report.fp16_safe is True and report.frozen_identical is True
    assert report.half_precision["fine_tuned"]["fp16"]["psnr_vs_base"] >= 30


def test_the_penalty_and_its_gradient():
    """ActivationPenalty's term is mean(relu(|a|/T - 1)^2) per hooked output, with that function's gradient."""
    from training.fp16fix import _Excess

    a = (torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3).requires_grad_(True)
    t = 2.0
    ours = _Excess.apply(a, t)
    (g_ours,) = torch.autograd.grad(ours, a)
    ref = torch.relu(a.abs() / t - 1).square().mean()
    (g_ref,) = torch.autograd.grad(ref, a)
    assert float(ours.detach()) == pytest.approx(float(ref.detach())) and float(ref.detach()) > 0
    assert torch.allclose(g_ours, g_ref)
    assert float(_Excess.apply(torch.full((4,), 1.5, dtype=torch.float64), t)) == 0.0  # below T: nothing


def test_fit_recipe_fp16_fix_and_eval_half_on_the_command_line(tmp_path):
    """`fit --recipe fp16-fix` turns a file that overflows fp16 into one that does not; `eval --half` checks
    both files without training."""
    from conftest import cli_main, write_images
    from safetensors.torch import save_file

    save_file(overflowing_ldm_sd(), str(tmp_path / "bad.safetensors"))
    write_images(tmp_path / "images", names=("astronaut", "coffee", "chelsea"), size=64)
    out = tmp_path / "fixed.safetensors"
    p = cli_main("fit", "--vae", tmp_path / "bad.safetensors", "--data", tmp_path / "images", "--out", out,
                 "--recipe", "fp16-fix", "--steps", 6, "--patch-size", 32, "--batch-size", 2, "--lpips-weight", 0,
                 "--val-every", 3, "--val-fraction", 0.34, "--stop-when-safe", "--foreground-threshold", 0,
                 "--no-progress")
    assert "fp16-fix: trained towards the base VAE's own fp32 decode" in p.stdout + p.stderr
    assert "before the first step: not trained" in p.stdout + p.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["vaeft.fp16_safe"] == "true"
    p = cli_main("eval", "--vae", tmp_path / "bad.safetensors", "--vae", out, "--data", tmp_path / "images",
                 "--patch-size", 32, "--count", 2, "--foreground-threshold", 0, "--half")
    half = json.loads(p.stdout)["half_precision"]
    assert half["bad"]["fp16"]["safe"] is False and half["bad"]["fp16"]["max_activation"]["conv_in"] == "overflow"
    assert half["fixed"]["fp16"]["safe"] is True and half["fixed"]["fp16"]["psnr_vs_base"] >= 30


def test_with_the_encoder_training_the_latent_drift_is_measured_and_reported(tmp_path):
    vae = build_vae(overflowing_ldm_sd(), source="bad.safetensors")
    x = images()
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=2, lr=1e-3, trainable="full", exact_rescale=False),
                   device="cpu", val_batch=x[2:])
    drift = [h["val_latent_drift"] for h in result.history if "val_latent_drift" in h]
    assert drift[0] == 0.0 and drift[-1] > 0.0  # the penalty's gradient reaches the encoder and moves the latents
    # the export states the drift of its probe patches (here the same held-out patches), in text and metadata
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=2, lr=1e-3, trainable="full", exact_rescale=False),
                   device="cpu", val_batch=x[2:], probe=make_probe(vae, x[2:]))
    report = export_vae(result, tmp_path / "full.safetensors")
    drift = report.half_precision["latent_drift"]
    assert drift == pytest.approx(result.history[-1]["val_latent_drift"], rel=1e-3) and drift > 0
    assert f"latent drift: the trained encoder moved the latents of those patches by {drift:.3g}" in report.text()
    with safe_open(report.path, "pt") as f:
        assert float(f.metadata()["vaeft.latent_drift"]) == drift


def test_the_fp16_fix_settings_never_train_in_fp16():
    """A GPU without bf16 gets fp16 autocast by default: a VAE that overflows fp16 cannot train that way."""
    from training.fp16fix import FP16Fix

    cfg = TrainConfig.from_recipe("fp16-fix")
    assert FP16Fix.precision(cfg, "fp16", "auto: no bf16")[0] == "fp32"
    assert FP16Fix.precision(cfg, "bf16", "auto")[0] == "bf16"
    assert FP16Fix.precision(TrainConfig(), "fp16", "auto") == ("fp16", "auto")  # other recipes: as before
    with pytest.raises(VAEFTError, match="precision fp16 with the fp16-fix settings"):
        FP16Fix.precision(cfg.replace(precision="fp16"), "fp16", "asked")


def test_a_checkpoint_older_than_the_fp16_fix_settings_resumes_and_a_changed_penalty_is_refused(tmp_path):
    from training import checkpoint as C
    from training.trainer import fine_tune

    vae = build_vae(tiny_ldm_sd())
    data = [images(2, seed=i) for i in range(4)]
    plain = {"lr": 1e-3, "batch_size": 2, "lpips_weight": 0.0, "log_every": 1, "preview_every": 0, "val_every": 0}
    ckpt = tmp_path / "run.ckpt"
    fine_tune(vae, lambda start: iter(data[start:]), TrainConfig(steps=2, **plain), device="cpu", checkpoints=ckpt)
    state = C.read_checkpoint(ckpt)
    body = {k: v for k, v in state.items() if k != "digest"}
    body["config"] = {k: v for k, v in body["config"].items() if k not in ("target", "act_weight", "act_threshold",
                                                                          "exact_rescale", "stop_when_safe")}
    old = tmp_path / "older.ckpt"
    C.write_checkpoint(old, body, overwrite=False)  # as a version without the fp16-fix settings wrote it
    result = fine_tune(vae, lambda start: iter(data[start:]), TrainConfig(steps=3, **plain), device="cpu", resume=old)
    assert result.steps_done == 3
    with pytest.raises(VAEFTError, match=r"other settings \(act_weight: 0\.0 -> 1\.0\)"):
        fine_tune(vae, lambda start: iter(data[start:]), TrainConfig(steps=3, act_weight=1.0, **plain), device="cpu",
                  resume=old)


def test_fp16_fix_on_a_flux2_vae_comes_out_safe_with_its_encoder_and_statistics_untouched(tmp_path):
    sd = {k: v * 1e6 if k.startswith("decoder.conv_in.") else v for k, v in tiny_flux2(seed=2).state_dict().items()}
    vae = build_vae(sd, source="flux2 diffusers")
    x = images()
    probe = make_probe(vae, x[2:])
    assert probe.base_report["fp16"]["nonfinite_pixels"] > 0
    result = train(vae, itertools.repeat(x[:2]), _cfg(steps=2), device="cpu", val_batch=x[2:], probe=probe)
    assert result.fp16_fix["rescale"]["segments"] >= 1 and result.history[-1]["mse"] == 0.0
    report = export_vae(result, tmp_path / "flux2_fixed.safetensors")
    assert report.fp16_safe is True and report.frozen_identical is True  # encoder and bn.* byte for byte
    assert report.half_precision["fine_tuned"]["fp16"]["psnr_vs_base"] >= 30


def test_the_status_text_shows_the_fp16_figures_beside_the_base_even_read_back_from_metrics():
    """Step 0's largest fp16 activation is inf (overflowed), which metrics.jsonl stores as null: a resumed
    run's status reads it back without failing and shows the figures it has."""
    from training.runs import RunStatus

    live = RunStatus(10, history=[{"step": 0, "val_fp16_peak": float("inf"), "val_fp16_psnr": 7.0},
                                  {"step": 5, "mse": 0.0, "val_fp16_peak": 512.0, "val_fp16_psnr": 75.3}])
    assert "val_fp16_peak 512/inf" in live.text() and "val_fp16_psnr 75.3/7" in live.text()
    read_back = RunStatus(10, start_step=5, history=[{"step": 0, "val_fp16_peak": None, "val_fp16_psnr": 7.0},
                                                     {"step": 5, "mse": 0.0, "val_fp16_peak": 512.0,
                                                      "val_fp16_psnr": 75.3}])
    text = read_back.text()
    assert "val_fp16_peak 512" in text and "val_fp16_psnr 75.3/7" in text and "None" not in text
    assert read_back.fields()["val_fp16_psnr"] == "75.3 (base 7)"


# ----- resuming and export_best (issue 32, item 7)


def _fix_line(report) -> str:
    return next(line for line in report.text().splitlines() if line.startswith("note: fp16-fix: "))


def _stopped_after(n: int):
    """Callbacks that stop the run before step n + 1 (should_stop is polled before every micro-batch)."""
    from training.trainer import Callbacks

    done = []
    return Callbacks(on_step=lambda step, total, losses: done.append(step), should_stop=lambda: len(done) >= n)


def _interrupted(tmp_path, cfg, **kw):
    """The overflowing kl-f8 VAE trained with ``cfg`` uninterrupted, and stopped after 2 steps with a checkpoint:
    (vae, batches(start), the train() keywords, the uninterrupted result, the checkpoint's path)."""
    vae = build_vae(overflowing_ldm_sd(), source="bad.safetensors")
    x = images()
    kw = {"device": "cpu", "val_batch": x[2:], "probe": make_probe(vae, x[2:]), **kw}

    def batches(start):
        return itertools.repeat(x[:2])

    full = train(vae, batches, cfg, **kw)
    ckpt = tmp_path / "run.ckpt"
    stopped = train(vae, batches, cfg, checkpoints=ckpt, callbacks=_stopped_after(2), **kw)
    assert stopped.stopped_early and stopped.steps_done == 2
    return vae, batches, kw, full, ckpt


def _exported(tmp_path, name, result):
    """(the export's vaeft.fp16_fix metadata, parsed; its report's fp16-fix line)."""
    report = export_vae(result, tmp_path / f"{name}.safetensors")
    with safe_open(report.path, "pt") as f:
        return json.loads(f.metadata()["vaeft.fp16_fix"]), _fix_line(report)


def test_a_resumed_fp16_fix_run_exports_the_rescaling_record_of_the_uninterrupted_run(tmp_path):
    """Stopped after 2 of 4 steps with a checkpoint, resumed: the weights, the vaeft.fp16_fix record (the exact
    rescaling applied before the first step, which the resumed run does not redo) and the report's fp16-fix line
    are the uninterrupted run's. (The penalty moves the weights: the resumed run's teacher is the rescaled base,
    as the uninterrupted run's, or its rounding differences would move them elsewhere.)"""
    cfg = _cfg(steps=4, act_threshold=16.0, act_weight=0.01)
    vae, batches, kw, full, ckpt = _interrupted(tmp_path, cfg)
    resumed = train(vae, batches, cfg, resume=ckpt, **kw)
    assert resumed.steps_done == 4 and resumed.history == full.history
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in vae.model.state_dict().items())  # it trained
    assert full.fp16_fix["rescale"]["exact"] and full.fp16_fix["rescale"]["segments"] >= 1
    assert resumed.fp16_fix == full.fp16_fix
    (meta_full, line_full), (meta, line) = _exported(tmp_path, "full", full), _exported(tmp_path, "resumed", resumed)
    assert meta == meta_full and meta["rescale"]["exact"] is True
    assert line == line_full and "exact rescaling first" in line


def test_an_fp16_fix_checkpoint_without_the_rescaling_record_resumes_and_says_the_record_is_unknown(tmp_path):
    """A checkpoint written before checkpoints kept the rescaling's record resumes; the export says the
    rescaling is unknown (not null, as if none had happened), in the metadata and the report."""
    from training import checkpoint as C

    cfg = _cfg(steps=4, act_threshold=16.0, act_weight=0.01)
    vae, batches, kw, full, ckpt = _interrupted(tmp_path, cfg)
    body = {k: v for k, v in C.read_checkpoint(ckpt).items() if k not in ("digest", "fp16_fix")}
    old = tmp_path / "older.ckpt"
    C.write_checkpoint(old, body, overwrite=False)  # as the version before the record wrote it
    resumed = train(vae, batches, cfg, resume=old, **kw)
    assert resumed.steps_done == 4 and resumed.fp16_fix == {**full.fp16_fix, "rescale": "unknown"}
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact_rescale is on: the teacher is rescaled as before
    meta, line = _exported(tmp_path, "resumed", resumed)
    assert meta["rescale"] == "unknown"
    assert "exact rescaling: unknown (resumed from a checkpoint written before checkpoints kept its record" in line
    assert "exact rescaling first" not in line


def test_export_best_with_the_fp16_fix_recipe_picks_by_the_fp16_decode_against_the_base(tmp_path):
    """target 'base': export_best picks the step whose fp16 decode of the held-out patches is closest to the base's
    fp32 decode (val_fp16_psnr), not the one with the lowest error against the images (val_mse here: they differ
    in this run), and the export records what it picked by. A pick of an older checkpoint (made by val_mse) is
    scored again by val_fp16_psnr on resume."""
    from training import checkpoint as C

    sd = {k: v * 3 if k.startswith("decoder.") and "norm" not in k else v for k, v in tiny_ldm_sd(seed=1).items()}
    vae = build_vae(sd, source="loud.safetensors")
    x = images(6)

    def batches(start):
        return (x[i % 2 * 2:i % 2 * 2 + 2] for i in itertools.count(start))

    cfg = _cfg(steps=4, val_every=2, log_every=2, exact_rescale=False, act_threshold=16.0, act_weight=0.01,
               export_best=True)
    kw = {"device": "cpu", "val_batch": x[4:]}
    result = train(vae, batches, cfg, **kw)
    vals = [h for h in result.history if h["step"] > 0 and "val_mse" in h]
    by_psnr = max(vals, key=lambda h: h["val_fp16_psnr"])["step"]
    by_images = min(vals, key=lambda h: h["val_mse"])["step"]
    assert by_psnr != by_images  # the two criteria pick different steps here
    assert result.best_step == by_psnr and result.fp16_fix["best_by"] == "val_fp16_psnr"
    meta, line = _exported(tmp_path, "best", result)
    assert meta["best_by"] == "val_fp16_psnr" and "export_best picked by val_fp16_psnr" in line
    # a checkpoint of the version before: its pick (step 2) made by val_mse, its score that
    ckpt = tmp_path / "run.ckpt"
    train(vae, batches, cfg, checkpoints=ckpt, callbacks=_stopped_after(2), **kw)
    body = {k: v for k, v in C.read_checkpoint(ckpt).items() if k not in ("digest", "fp16_fix")}
    best = body["loop"]["best"]
    assert best["step"] == 2 and best["by"] == "val_fp16_psnr"
    del best["by"]
    best["score"] = next(h["val_mse"] for h in body["loop"]["history"] if h["step"] == 2 and "val_mse" in h)
    old = tmp_path / "older.ckpt"
    C.write_checkpoint(old, body, overwrite=False)
    assert train(vae, batches, cfg, resume=old, **kw).best_step == by_psnr
