"""Exports checked by loaders we did not write: diffusers' own converter, from_single_file and
from_pretrained, and ComfyUI's VAE loader (COMFYUI_PATH; a subprocess with ComfyUI's CPU mode)."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_server import COMFY_LOADER_PREAMBLE
from conftest import ROOT, SD_VAE_CONFIG, tiny_ldm_sd, train
from training.config import TrainConfig
from training.export import export_vae
from training.probe import make_probe
from training.trained import Trained
from training.families.ldm import diffusers_to_ldm
from training.vae import build_vae, frozen_sha256, load_vae

ATTN = ("q", "k", "v", "proj_out")


def _matrix_attention(sd):
    """The same weights with mid-block attention stored as (C, C) matrices, as some converters write."""
    return {k: v[:, :, 0, 0].clone() if k.split(".")[-2] in ATTN and ".attn_1." in k and v.ndim == 4 else v
            for k, v in sd.items()}


def _trained(sd, name, seed=0):
    base = build_vae(dict(sd), source=name)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0)
    return train(base, itertools.repeat(x[:2]), cfg, device="cpu", probe=make_probe(base, x))


CASES = {  # name -> (base state dict, base file name)
    "4ch-fp32": lambda: (tiny_ldm_sd(seed=11), "vae-ft-mse-840000-ema-pruned.safetensors"),
    "4ch-matrix-attention-fp16": lambda: ({k: v.half() for k, v in _matrix_attention(tiny_ldm_sd(seed=12)).items()},
                                         "sdxl_vae.safetensors"),
    "16ch-bf16": lambda: ({k: v.bfloat16() for k, v in tiny_ldm_sd(latent_channels=16, quant=False,
                                                                  seed=13).items()}, "ae.safetensors"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    sd, name = CASES[request.param]()
    result = _trained(sd, name)
    d = tmp_path_factory.mktemp(request.param)
    export_vae(result, d / "vae.safetensors")
    export_vae(result, d / "diffusers", format="diffusers")
    return result, d


def test_the_ldm_file_is_what_diffusers_own_converter_makes_of_it(exported):
    """diffusers' converter (single_file_utils.convert_ldm_vae_checkpoint), applied to our ldm file,
    gives our diffusers folder's weights tensor for tensor: the two formats hold the same model."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, d = exported
    ldm = load_file(d / "vae.safetensors")
    config = json.loads((d / "diffusers" / "config.json").read_text())
    converted = convert_ldm_vae_checkpoint(ldm, config)
    ours = load_file(d / "diffusers" / "diffusion_pytorch_model.safetensors")
    assert set(converted) == set(ours)
    for k, v in ours.items():
        assert converted[k].dtype == v.dtype and converted[k].shape == v.shape and torch.equal(converted[k], v), k


def test_from_single_file_and_from_pretrained_load_strictly_and_decode_alike(exported, caplog):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    result, d = exported
    pretrained, info = AutoencoderKL.from_pretrained(str(d / "diffusers"), local_files_only=True,
                                                     output_loading_info=True, torch_dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])
    with caplog.at_level(logging.WARNING):
        single = AutoencoderKL.from_single_file(str(d / "vae.safetensors"), config=str(d / "diffusers"),
                                                local_files_only=True, torch_dtype=torch.float32)
    assert not [r for r in caplog.records if "not used" in r.getMessage()]  # no unexpected keys
    # strict: the converted file names exactly the model's parameters (from_single_file itself only warns)
    converted = convert_ldm_vae_checkpoint(load_file(d / "vae.safetensors"), dict(pretrained.config))
    assert set(converted) == set(single.state_dict())
    a, b = pretrained.state_dict(), single.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert single.config.scaling_factor == pretrained.config.scaling_factor
    z = torch.randn(2, result.model.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = result.model.decode(z).sample
        from_file = single.eval().decode(z).sample
        from_folder = pretrained.eval().decode(z).sample
    assert torch.equal(from_file, from_folder)
    # the exported weights are the trained ones rounded to the base's dtype: as close as that dtype allows
    tol = {torch.float32: 1e-5, torch.float16: 5e-2, torch.bfloat16: 1e-1}[result.layout.dtypes["decoder.conv_in.weight"]]
    assert (from_file - ours).abs().max() < tol


# ----- ComfyUI's own loader -----

COMFY = os.environ.get("COMFYUI_PATH", "")
_no_comfy = pytest.mark.skipif(not COMFY or not os.path.isfile(os.path.join(COMFY, "main.py")),
                               reason="set COMFYUI_PATH to a ComfyUI checkout to load exports with its loader")


def needs_comfy(test):
    """A test that runs ComfyUI's own code: marked integration, skipped without a checkout."""
    return pytest.mark.integration(_no_comfy(test))

COMFY_SCRIPT = COMFY_LOADER_PREAMBLE + r'''
out = {}
for job in json.load(open(jobs_path)):
    messages.clear()
    try:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(job["file"]))
        vae.throw_exception_if_invalid()
        torch.save(vae.decode(torch.load(job["latents"])).float(), job["decoded"])
        out[job["name"]] = {"messages": list(messages), "dtype": str(vae.vae_dtype),
                            "latent_channels": vae.latent_channels}
    except Exception as e:
        out[job["name"]] = {"error": f"{type(e).__name__}: {e}"[:300], "messages": list(messages)}
print("RESULT " + json.dumps(out))
'''


def _full_size(channels, dtype, matrix, seed):
    """A Trained result in the full SD layout (ComfyUI builds only that): a random base stored in ``dtype``
    and a decoder moved away from it, as training would, without spending minutes training on a CPU."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**{**SD_VAE_CONFIG, "latent_channels": channels, "use_quant_conv": channels == 4,
                             "use_post_quant_conv": channels == 4})
    sd = {k: v.to(dtype) for k, v in diffusers_to_ldm(model.state_dict()).items()}
    if matrix:
        sd = _matrix_attention(sd)
    base = build_vae(sd, source="base.safetensors")
    trained = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.startswith("decoder."):
                p.add_(torch.randn_like(p) * 1e-3)
    result = Trained(model=trained, layout=base.layout, config=TrainConfig(steps=1), history=[], steps_done=1,
                     base_frozen_sha256=frozen_sha256(base.model, "decoder"))
    return sd, result


@needs_comfy
def test_comfyui_loads_4_and_16_channel_exports_without_missing_keys(tmp_path):
    jobs, models = [], {}
    for name, channels, dtype, matrix in (("4ch-matrix-fp16", 4, torch.float16, True),
                                          ("16ch-bf16", 16, torch.bfloat16, False)):
        base_sd, result = _full_size(channels, dtype, matrix, seed=channels)
        export_vae(result, tmp_path / f"{name}.safetensors")
        z = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(5))
        torch.save(z, tmp_path / f"{name}.latents.pt")
        models[name] = (result, z)
        jobs.append({"name": name, "file": str(tmp_path / f"{name}.safetensors"),
                     "latents": str(tmp_path / f"{name}.latents.pt"), "decoded": str(tmp_path / f"{name}.out.pt")})
        if matrix:  # the oracle can fail: the base file itself, with matrices, is refused by ComfyUI
            save_file({k: v.contiguous() for k, v in base_sd.items()}, str(tmp_path / "matrix-base.safetensors"))
            jobs.append({"name": "matrix-base", "file": str(tmp_path / "matrix-base.safetensors"),
                         "latents": str(tmp_path / f"{name}.latents.pt"), "decoded": str(tmp_path / "base.out.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = tmp_path / "load_with_comfy.py"
    script.write_text(COMFY_SCRIPT)
    p = subprocess.run([sys.executable, str(script), COMFY, str(tmp_path / "jobs.json")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert "error" in out["matrix-base"] and "size mismatch" in out["matrix-base"]["error"]
    for name, (result, z) in models.items():
        got = out[name]
        assert "error" not in got, got
        assert not [m for m in got["messages"] if "Missing VAE keys" in m or "Leftover VAE keys" in m], got
        assert got["latent_channels"] == z.shape[1]
        theirs = torch.load(tmp_path / f"{name}.out.pt")
        with torch.no_grad():  # the file's weights (the trained ones in the base's half dtype) in our hands
            ours = ((load_vae(tmp_path / f"{name}.safetensors").model.decode(z).sample + 1) / 2).clamp(0, 1)
            trained = ((result.model.decode(z).sample + 1) / 2).clamp(0, 1)
        assert theirs.shape == ours.movedim(1, -1).shape and got["dtype"] == "torch.float32"
        assert (theirs - ours.movedim(1, -1)).abs().max() < 1e-4, name
        assert (theirs - trained.movedim(1, -1)).abs().max() < 0.05, name  # and near the fp32 trained decoder


SAVE_SCRIPT = r'''
import importlib.util, itertools, json, os, sys
comfy_path, pack, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_path)
import comfy.options
comfy.options.enable_args_parsing()
import torch
import folder_paths
folder_paths.set_output_directory(out_dir)
spec = importlib.util.spec_from_file_location("vaeft_pack", os.path.join(pack, "__init__.py"),
                                              submodule_search_locations=[pack])
mod = importlib.util.module_from_spec(spec)
sys.modules["vaeft_pack"] = mod
spec.loader.exec_module(mod)
from vaeft_pack.nodes.save import SaveFineTunedVAE
from vaeft_pack.training.config import TrainConfig
from vaeft_pack.training.probe import make_probe
from vaeft_pack.training.session import trained_result
from vaeft_pack.training.trainer import fine_tune
from vaeft_pack.training.families.ldm import diffusers_to_ldm
from vaeft_pack.training.vae import build_vae
sys.path.insert(0, os.path.join(pack, "tests"))
from conftest import tiny_diffusers_vae
base = build_vae(diffusers_to_ldm(tiny_diffusers_vae(seed=14).state_dict()), source="sdxl_vae.safetensors")
x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
result = trained_result(base, fine_tune(base, itertools.repeat(x[:2]), TrainConfig(
    steps=1, batch_size=2, lpips_weight=0.0, preview_every=0), device="cpu"), probe=make_probe(base, x))
texts = {}
for fmt in ("safetensors", "diffusers"):
    res = SaveFineTunedVAE.execute(result, "oracle", "base", False, format=fmt)
    texts[fmt] = {"filename": res.result[0], "ui": res.ui.as_dict()["text"][0]}
res = SaveFineTunedVAE.execute(result, "old-workflow", "base", False)  # a workflow saved before format/family
texts["default"] = {"filename": res.result[0], "ui": res.ui.as_dict()["text"][0]}
print("RESULT " + json.dumps(texts))
'''


@needs_comfy
def test_save_node_shows_the_report(tmp_path):
    script = tmp_path / "save_node.py"
    script.write_text(SAVE_SCRIPT)
    p = subprocess.run([sys.executable, str(script), COMFY, ROOT, str(tmp_path / "output")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    st, df = out["safetensors"], out["diffusers"]
    assert st["filename"] == "vae-ft-oracle-1.safetensors"
    assert os.path.isfile(tmp_path / "output" / "vae" / st["filename"])
    assert df["filename"] == "vae-ft-oracle-1"
    assert sorted(os.listdir(tmp_path / "output" / "vae_diffusers" / "vae-ft-oracle-1")) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    for text in (st["ui"], df["ui"]):
        assert "half precision, decoding 2 training patches of 32x32 with the exported weights:" in text
        assert "  fp16: safe: 0 of 2048 pixels NaN/inf" in text and "  bf16 (base): safe" in text
        assert "untrained tensors (encoder, quant_conv): bit-identical to the base file" in text
        assert "latent scaling: scaling_factor 0.13025" in text
    assert out["default"]["filename"] == "vae-ft-old-workflow-1.safetensors"
