"""The Flux.2 family: Black Forest Labs' layout and diffusers', a narrower decoder, decoder-only training
with the encoder and the BatchNorm statistics byte-identical, and two oracles: BFL's own ``AutoEncoder``
(the reference code, loaded strictly; fetched outside the repo like ComfyUI, FLUX2_PATH) and diffusers'
``AutoencoderKLFlux2.from_pretrained``."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_server import COMFY_LOADER_PREAMBLE
from conftest import cli_main, write_images
from training.errors import VAEFTError
from training.vae import build_vae, model_to_file

CH, MULT, Z = 32, [1, 2], 32
NARROW = [1, 1]  # a decoder narrower than the encoder (as FLUX.2-small-decoder is): widths 32, 32 vs 32, 64


def bfl_path() -> str | None:
    """BFL's src/flux2/autoencoder.py (never committed: extracted from github:black-forest-labs/flux2
    outside the repo, as ComfyUI is); None without it."""
    root = os.environ.get("FLUX2_PATH") or os.path.expanduser("~/flux2")
    path = os.path.join(root, "src", "flux2", "autoencoder.py")
    return path if os.path.isfile(path) else None


def bfl():
    """BFL's autoencoder module, or a skip naming what is missing."""
    path = bfl_path()
    if path is None:
        pytest.skip("set FLUX2_PATH to an extract of github:black-forest-labs/flux2 (src/flux2/autoencoder.py) "
                    "to test against BFL's reference AutoEncoder")
    spec = importlib.util.spec_from_file_location("bfl_flux2_autoencoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bfl_model(ae, decoder_mult=None, seed=0):
    """BFL's AutoEncoder (random init, non-trivial BatchNorm statistics); ``decoder_mult``: a narrower
    decoder in place of the one BFL's constructor makes (BFL's own Decoder class)."""
    torch.manual_seed(seed)
    params = ae.AutoEncoderParams(ch=CH, ch_mult=MULT, num_res_blocks=1, z_channels=Z)
    model = ae.AutoEncoder(params)
    if decoder_mult is not None:
        model.decoder = ae.Decoder(ch=CH, out_ch=3, ch_mult=decoder_mult, num_res_blocks=1, in_channels=3,
                                   resolution=256, z_channels=Z)
    g = torch.Generator().manual_seed(seed + 1)
    model.bn.running_mean.copy_(torch.randn(4 * Z, generator=g) * 0.5)
    model.bn.running_var.copy_(torch.rand(4 * Z, generator=g) * 2 + 0.25)
    model.bn.num_batches_tracked.fill_(123456)
    return model.eval()


def as_file(model, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A state dict as a released file holds it: floats in ``dtype``, the batch counter int64."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}


def tiny_diffusers(seed=0, decoder=None, latent=Z):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    m = AutoencoderKLFlux2(block_out_channels=[32, 64], decoder_block_out_channels=decoder, layers_per_block=1,
                           latent_channels=latent, down_block_types=["DownEncoderBlock2D"] * 2,
                           up_block_types=["UpDecoderBlock2D"] * 2)
    m.bn.running_mean.normal_(0, 0.5)
    m.bn.running_var.uniform_(0.25, 2.25)
    return m


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def patchify_normalise(model, z):
    """What BFL's encode does after the encoder's mean, with a diffusers model's statistics."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    return (z - model.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(model.bn.running_var.view(1, -1, 1, 1)
                                                                      + model.config.batch_norm_eps)


def unnormalise_unpatchify(model, zn):
    z = zn * torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps) \
        + model.bn.running_mean.view(1, -1, 1, 1)
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("decoder", [[64, 32]], ids=["other-widths-decoder"])  # the full one: tests/test_families.py
def test_diffusers_and_comfyui_layouts_are_read_into_bfl_layout_and_back(decoder):
    theirs = tiny_diffusers(decoder=decoder)
    loaded = build_vae(theirs.state_dict(), source="flux2 diffusers")
    layout = loaded.layout
    assert layout.family.name == "flux2" and "encoder.quant_conv.weight" in layout.shapes and "bn.running_var" in layout.shapes
    width = decoder[-1] if decoder else 64  # the decoder's mid block is as wide as its deepest level
    assert layout.shapes["decoder.mid.attn_1.q.weight"] == (width, width, 1, 1)  # attention as BFL's 1x1 convs
    assert loaded.model.config.decoder_block_out_channels == (list(decoder) if decoder else None)
    a, b = loaded.model.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k].to(b[k].dtype), b[k]) for k in b)
    assert layout.dtypes["bn.num_batches_tracked"] == torch.int64
    bfl_sd = model_to_file(loaded.model, layout)
    # ComfyUI holds (and its Save VAE writes) BFL's keys with the quant convolutions at the top
    comfy = {("quant_conv." + k[len("encoder.quant_conv."):]) if k.startswith("encoder.quant_conv.") else
             ("post_quant_conv." + k[len("decoder.post_quant_conv."):]) if k.startswith("decoder.post_quant_conv.")
             else k: v for k, v in bfl_sd.items()}
    assert "quant_conv.weight" in comfy and "encoder.quant_conv.weight" not in comfy
    again = build_vae(comfy, source="ComfyUI's copy")
    assert again.layout.family.name == "flux2" and set(again.layout.shapes) == set(layout.shapes)
    c = again.model.state_dict()
    assert all(torch.equal(c[k], a[k]) for k in a)


def test_an_fp16_export_keeps_the_latent_statistics_and_the_counter_as_the_base_stores_them(tmp_path):
    """export dtype fp16 casts the weights, never bn.* (the latent space) nor the int64 batch counter."""
    import itertools

    from conftest import train
    from training.config import TrainConfig
    from training.export import export_vae
    from training.probe import make_probe

    base = build_vae(tiny_diffusers(seed=5).state_dict(), source="flux2-vae.safetensors")
    x = images(4, 32, seed=6)
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0, val_every=0)
    result = train(base, itertools.repeat(x[:2]), cfg, device="cpu", probe=make_probe(base, x))
    report = export_vae(result, tmp_path / "vae-ft-fp16.safetensors", dtype="fp16")
    out, fp32 = load_file(report.path), model_to_file(base.model, base.layout)
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert all(out[k].dtype == torch.float32 and torch.equal(out[k], fp32[k]) for k in ("bn.running_mean", "bn.running_var"))
    assert out["decoder.conv_out.weight"].dtype == torch.float16 and out["encoder.conv_in.weight"].dtype == torch.float16
    fp16 = report.half_precision["fine_tuned"]["fp16"]
    assert fp16["safe"] and set(fp16["max_activation"]) >= {
        "post_quant_conv", "conv_in", "mid_block", "up_blocks.0", "up_blocks.1", "conv_norm_out", "conv_out"}


@pytest.mark.parametrize("decoder_mult", [None, NARROW], ids=["full", "narrow-decoder"])
def test_our_module_computes_what_bfl_autoencoder_computes(decoder_mult):
    ae = bfl()
    ref = bfl_model(ae, decoder_mult)
    ours = build_vae(as_file(ref, torch.float32), source="ae.safetensors").model
    x = images()
    with torch.no_grad():
        zn = ref.encode(x)
        mine = patchify_normalise(ours, ours.encode(x).latent_dist.mean)
        assert rel(mine, zn) < 1e-5
        assert rel(ours.decode(unnormalise_unpatchify(ours, zn)).sample, ref.decode(zn)) < 1e-5


def fit(tmp_path, base, *flags, out, check=True):
    if not (tmp_path / "images").exists():
        write_images(tmp_path / "images", names=("astronaut", "coffee", "chelsea"), size=64)
    return cli_main("fit", "--vae", base, "--data", tmp_path / "images", "--out", out, "--steps", 3,
                    "--patch-size", 32, "--batch-size", 2, "--lpips-weight", 0, "--lr", "1e-3", "--no-progress",
                    *(("--val-every", 0) if "--val-every" not in flags else ()), *flags, check=check)


@pytest.mark.parametrize("decoder_mult", [None, NARROW], ids=["full", "narrow-decoder"])
def test_a_fine_tune_loads_strictly_into_bfl_autoencoder_with_the_latent_space_unchanged(tmp_path, decoder_mult):
    """The Done-when: through the CLI to an export BFL's reference code loads strictly, encoding exactly
    as the base, decoding differently and finitely; and to a diffusers folder that decodes alike."""
    from diffusers import AutoencoderKLFlux2

    ae = bfl()
    base_model = bfl_model(ae, decoder_mult)
    base = as_file(base_model)
    save_file(base, str(tmp_path / "flux2-vae.safetensors"))
    out = tmp_path / "vae-ft-flux2-3.safetensors"
    p = fit(tmp_path, tmp_path / "flux2-vae.safetensors", "--val-every", 3, "--val-patches", 2, out=out)
    final = json.loads(p.stdout.strip().splitlines()[-1])["final"]
    assert final["val_mse"] > 0 and "fp16: safe" in p.stderr  # validation and the half-precision report ran
    assert "untrained tensors (encoder with its quant_conv, and bn.*: the latent statistics): bit-identical" in p.stderr
    tuned = load_file(out)
    assert set(tuned) == set(base) and all(tuned[k].dtype == base[k].dtype for k in base)
    with safe_open(out, "pt") as f:  # the statistics a pipeline normalises latents with: the base's
        meta = f.metadata()
    std = torch.sqrt(base["bn.running_var"].float() + 1e-4)
    assert meta["vaeft.latent_family"] == "flux2" and len(json.loads(meta["vaeft.latents_mean"])) == 4 * Z
    assert torch.allclose(torch.tensor(json.loads(meta["vaeft.latents_std"])), std, rtol=1e-5)
    untouched = [k for k in base if not k.startswith("decoder.")]
    assert all(torch.equal(tuned[k], base[k]) for k in untouched) and "bn.running_mean" in untouched
    assert not torch.equal(tuned["decoder.conv_out.weight"], base["decoder.conv_out.weight"])

    model = bfl_model(ae, decoder_mult, seed=99)  # other weights, overwritten by the strict load
    model.load_state_dict(tuned, strict=True)
    reference = bfl_model(ae, decoder_mult, seed=99)
    reference.load_state_dict(base, strict=True)
    x = images(2, 32, seed=4)
    with torch.no_grad():
        zn = model.encode(x)
        assert torch.equal(zn, reference.encode(x))  # the latent space is the base's, bit for bit
        y, y0 = model.decode(zn), reference.decode(zn)
    assert torch.isfinite(y).all() and rel(y, y0) > 1e-4

    folder = tmp_path / "vae-ft-flux2-diffusers"
    fit(tmp_path, tmp_path / "flux2-vae.safetensors", "--format", "diffusers", out=folder)
    theirs = AutoencoderKLFlux2.from_pretrained(folder).eval()
    assert torch.equal(theirs.bn.running_mean, base["bn.running_mean"].to(theirs.bn.running_mean.dtype))
    assert int(theirs.bn.num_batches_tracked) == 123456
    with torch.no_grad():
        mine = theirs.decode(unnormalise_unpatchify(theirs, zn.float())).sample
    assert rel(mine, y) < 1e-3  # the same fine-tune (same seed) read by diffusers decodes like BFL's decoder


def test_what_a_flux2_vae_cannot_be_is_refused_by_name(tmp_path):
    sd = {k: v for k, v in tiny_diffusers().state_dict().items()}
    bfl_sd = (lambda v: model_to_file(v.model, v.layout))(build_vae(sd, source="flux2"))
    no_stats = {k: v for k, v in bfl_sd.items() if not k.startswith("bn.")}
    with pytest.raises(VAEFTError, match=re.escape("x.safetensors is not a complete Flux.2 VAE: it lacks bn.running_mean, "
                                                   "bn.running_var, bn.num_batches_tracked")):
        build_vae(no_stats, source="x.safetensors")
    from diffusers import AutoencoderKL

    plain = AutoencoderKL(block_out_channels=[32, 64], latent_channels=32, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2).state_dict()
    with pytest.raises(VAEFTError, match="kl-f8 VAE with 32 latent channels.*a Flux.2 VAE .* which this file lacks"):
        build_vae(plain, source="x.safetensors")
    z16 = {k: v for k, v in tiny_diffusers(latent=16).state_dict().items()}
    with pytest.raises(VAEFTError, match="laid out like a Flux.2 VAE but has 16 latent channels"):
        build_vae(z16, source="x.safetensors")
    shallow = {k: v for k, v in bfl_sd.items() if not k.startswith("decoder.up.1.")}
    with pytest.raises(VAEFTError, match="a Flux.2 decoder with 1 levels of 2 blocks for an encoder with 2 levels"):
        build_vae(shallow, source="x.safetensors")
    wrong_bn = {**sd, "bn.running_mean": torch.zeros(64), "bn.running_var": torch.ones(64)}
    with pytest.raises(VAEFTError, match="the encoder, decoder and latent statistics do not fit together"):
        build_vae(wrong_bn, source="x.safetensors")
    no_var = {k: v for k, v in sd.items() if k != "bn.running_var"}
    with pytest.raises(VAEFTError, match=re.escape("x.safetensors is not a complete Flux.2 VAE: it lacks bn.running_var")):
        build_vae(no_var, source="x.safetensors")
    loaded = build_vae(sd, source="flux2-vae.safetensors")
    save_file(model_to_file(loaded.model, loaded.layout), str(tmp_path / "flux2-vae.safetensors"))
    p = fit(tmp_path, tmp_path / "flux2-vae.safetensors", "--trainable", "full", "--run-dir", tmp_path / "run",
            out=tmp_path / "x.safetensors", check=False)
    assert p.returncode != 0 and "trainable 'full' with a Flux.2 VAE: it trains decoder-only" in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.safetensors").exists()


NODE_READS = COMFY_LOADER_PREAMBLE + r'''
import importlib, types
import folder_paths
from safetensors.torch import load_file
root, folder = json.load(open(jobs_path))
pack = types.ModuleType("vaeftpack"); pack.__path__ = [root]; sys.modules["vaeftpack"] = pack
sub = types.ModuleType("vaeftpack.nodes"); sub.__path__ = [os.path.join(root, "nodes")]; sys.modules["vaeftpack.nodes"] = sub
common = importlib.import_module("vaeftpack.nodes.common")
folder_paths.add_model_folder_path("vae", folder)
def held_as(sd, cls=torch.nn.Identity):  # what Load VAE hands on: ComfyUI's (bf16) copy, under its names
    return types.SimpleNamespace(first_stage_model=cls(), vae_dtype=torch.bfloat16, get_sd=lambda: sd)
out = {}
flux = load_file(os.path.join(folder, "flux2-vae.safetensors"))
comfy_names = {("quant_conv." + k[19:]) if k.startswith("encoder.quant_conv.") else
               ("post_quant_conv." + k[24:]) if k.startswith("decoder.post_quant_conv.") else k:
               v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in flux.items()}
loaded = common.comfy_vae_to_training(held_as(comfy_names), ("vae", "flux2-vae.safetensors"))
w = loaded.model.state_dict()["decoder.conv_in.weight"]
out["read"] = {"family": loaded.layout.family.name, "exact": bool(torch.equal(w, flux["decoder.conv_in.weight"])),
               "keys": sorted(loaded.layout.shapes) == sorted(flux), "from_file": loaded.layout.from_file}
copy = common.comfy_vae_to_training(held_as(comfy_names))  # no file to read: ComfyUI's bf16 copy
out["copy"] = {"family": copy.layout.family.name, "from_file": copy.layout.from_file}
for case, name, held in (("other", "flux2-vae.safetensors", {"decoder.conv_in.weight": torch.zeros(8, 32, 3, 3)}),
                         ("nan", "nan-sd-vae.safetensors", load_file(os.path.join(folder, "nan-sd-vae.safetensors")))):
    try:
        common.comfy_vae_to_training(held_as(held), ("vae", name))
        out[case] = "accepted"
    except Exception as e:
        out[case] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
'''


@pytest.mark.integration
def test_the_node_reads_a_flux2_file_that_comfyui_holds_under_its_own_names(tmp_path):
    """A ComfyUI that loads Flux.2 holds the quant convolutions at the top (its layout): the Fine-tune node
    still starts from the file's exact weights. When ComfyUI made another model of a file, the node says so;
    a damaged file is named as damaged, not blamed on ComfyUI."""
    import subprocess
    import sys

    from comfy_server import comfyui_path
    from conftest import ROOT, tiny_ldm_sd

    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the node's reader")
    loaded = build_vae(tiny_diffusers().state_dict(), source="flux2")
    save_file({k: v.contiguous() for k, v in model_to_file(loaded.model, loaded.layout).items()},
              str(tmp_path / "flux2-vae.safetensors"))
    nan = tiny_ldm_sd()
    nan["decoder.conv_out.bias"] = torch.full_like(nan["decoder.conv_out.bias"], float("nan"))
    save_file({k: v.contiguous() for k, v in nan.items()}, str(tmp_path / "nan-sd-vae.safetensors"))
    (tmp_path / "job.json").write_text(json.dumps([ROOT, str(tmp_path)]))
    p = subprocess.run([sys.executable, "-c", NODE_READS, comfy, str(tmp_path / "job.json")], capture_output=True,
                       text=True, timeout=300)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(lines[0][7:])
    assert out["read"] == {"family": "flux2", "exact": True, "keys": True, "from_file": True}
    # a copy is not the file: a re-run's base check must not compare the file with the copy's digest
    assert out["copy"] == {"family": "flux2", "from_file": False}
    assert out["other"].startswith("VAEFTError: flux2-vae.safetensors is a Flux.2 VAE (FLUX.2 [dev], [klein]), but "
                                   "the Identity this ComfyUI's Load VAE built from it holds other tensors")
    assert out["nan"].startswith("VAEFTError: nan-sd-vae.safetensors holds NaN or infinite weights"), out["nan"]


def test_an_affine_batchnorm_at_the_identity_is_read_and_another_refused_by_name(tmp_path):
    """A converter that built BatchNorm2d(affine=True) saves bn.weight / bn.bias: at the identity they change
    nothing and are left out (the export is BFL's layout, which BFL's AutoEncoder loads strictly); otherwise
    the file is refused naming itself and the tensors, not as a kl-f8 key."""
    from family_examples import flux2_file

    sd = flux2_file(0)
    stats = sd["bn.running_mean"]
    identity = {**sd, "bn.weight": torch.ones_like(stats), "bn.bias": torch.zeros_like(stats)}
    for layout in (identity, {k: v for k, v in build_vae(identity, source="a").model.state_dict().items()}
                   | {"bn.weight": torch.ones_like(stats), "bn.bias": torch.zeros_like(stats)}):
        loaded = build_vae(layout, source="flux2-affine.safetensors")
        assert set(loaded.layout.shapes) == set(sd) and sorted(loaded.layout.dropped_keys) == ["bn.bias", "bn.weight"]
    moved = {**identity, "bn.bias": torch.full_like(stats, 0.5)}
    with pytest.raises(VAEFTError) as e:
        build_vae(moved, source="flux2-converted.safetensors")
    text = str(e.value)
    assert "flux2-converted.safetensors" in text and "bn.bias" in text and "bn.weight" not in text.split("(")[1]
    assert "kl-f8" not in text
