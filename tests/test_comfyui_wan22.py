"""The Wan 2.2 family at its released size through a real ComfyUI's API (COMFYUI_PATH): stock Load VAE builds its
own Wan 2.2 VAE (the released size: its Wan 2.2 branch has no other), VAE Fine-tune trains the decoder, Save
Fine-tuned VAE writes a drop-in file, and ComfyUI's own VAE Encode / VAE Decode / Save Latent with it give the
base's latents bit for bit and our module's decode.

A 705 M-parameter VAE trained on a CPU: about three minutes and ~16.4 GiB in ComfyUI's process, so .ci/run runs
this file on its own (after the parallel run, on ComfyUI 0.28 or newer only); elsewhere it is skipped, saying why.
By hand: VAEFT_WAN22_ANY_COMFYUI=1 runs it on an older ComfyUI (0.3.64 loads Wan 2.2 VAEs alike)."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from comfy_server import comfyui_path, comfyui_version
from conftest import remove_run_folders
from test_comfyui import _example, _messages, assert_wan_decoder_only
from test_wan22 import WAN22_RELEASED
from training.families import wan22
from training.memory import available_memory
from training.vae import load_vae

pytestmark = pytest.mark.integration


def _version() -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", comfyui_version())[:3])


if comfyui_path() is None:
    pytest.skip("the ComfyUI tests need a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {os.environ.get('COMFYUI_PATH', '')!r})", allow_module_level=True)
_NEEDS_GIB = 18  # ComfyUI's process peaks at ~16.4 GiB (its VAE, ours, the training copy, AdamW) plus this one's


def _available_gib() -> float:
    return (available_memory() or 0) / 2 ** 30


if _version() < (0, 28, 0) and not os.environ.get("VAEFT_WAN22_ANY_COMFYUI"):
    pytest.skip(f"the full-size Wan 2.2 tests run on ComfyUI 0.28 or newer (CI time and memory); this is "
                f"{comfyui_version()} (VAEFT_WAN22_ANY_COMFYUI=1 runs them anyway)",
                allow_module_level=True)


def released_wan22() -> dict[str, torch.Tensor]:
    """A random full-size Wan 2.2 VAE (705 M parameters) in ComfyUI's layout, bf16 as the released file: drawn
    directly in bf16 (diffusers' own initialisation of this size takes minutes on a CPU)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKLWan(**WAN22_RELEASED).state_dict().items()}
    g = torch.Generator().manual_seed(5)
    sd = {}
    for k, shape in shapes.items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        sd[wan22.to_original_key(k, 2)] = (torch.ones(shape) if k.endswith("gamma") else
                                           torch.randn(shape, generator=g) / fan_in ** 0.5).to(torch.bfloat16)
    return sd


@pytest.fixture(scope="module")
def comfy(comfyui_server):
    yield comfyui_server
    remove_run_folders(comfyui_server[1])


def test_a_full_size_wan22_vae_from_load_vae_trains_saves_and_keeps_its_latents_in_comfyui(comfy):
    """Through the API, the Wan 2.2 template's graph: the saved file keeps every key, shape and dtype, the encoder, conv1 and the temporal
    resampling byte for byte, and has a new decoder; Load VAE lists it and builds it with no missing or leftover
    keys; ComfyUI's VAE Encode of an image with it gives the base's latents bit for bit (Save Latent's files), and
    its VAE Decode of them is our module's decode of the exported weights (to 8-bit PNG rounding)."""
    import numpy as np
    import requests
    from PIL import Image

    if _available_gib() < _NEEDS_GIB:
        pytest.skip(f"training a full-size Wan 2.2 VAE in ComfyUI needs ~{_NEEDS_GIB} GiB free; {_available_gib():.1f} "
                    "GiB are (.ci/run runs this file alone for that reason)")
    server, base, _ = comfy
    sd = released_wan22()
    path = os.path.join(base, "models", "vae", "wan2.2_vae.safetensors")
    out_file = os.path.join(base, "output", "vae", "vae-ft-wan22-1.safetensors")
    save_file(sd, path)
    del sd  # read back from the file below: the test process holds nothing while ComfyUI trains
    try:
        # EMA off: 2 GiB less of a ~16 GiB run on the CPU; LPIPS off: the family is what this tests
        prompt = _example("wan2.2_vae.safetensors", "vae_train", template="vae_finetune_wan22", steps=1, batch_size=1,
                          preview_every=0, ema=False, lpips_weight=0.0)  # the Wan 2.2 template's graph, a short run
        next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "wan22"
        entry = server.wait(server.queue(prompt), timeout=1200)
        assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
        server.requests.post(server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
        assert_wan_decoder_only(load_file(out_file), load_file(path))
        info = requests.get(server.url + "/object_info/VAELoader", timeout=30).json()
        assert "vae-ft-wan22-1.safetensors" in info["VAELoader"]["input"]["required"]["vae_name"][0]
        graph = {"img": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}}
        for name, file in (("base", "wan2.2_vae.safetensors"), ("tuned", "vae-ft-wan22-1.safetensors")):
            graph.update({
                f"{name}_vae": {"class_type": "VAELoader", "inputs": {"vae_name": file}},
                f"{name}_enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": [f"{name}_vae", 0]}},
                f"{name}_lat": {"class_type": "SaveLatent", "inputs": {"samples": [f"{name}_enc", 0],
                                                                       "filename_prefix": f"latents/wan22-{name}"}}})
        graph["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["tuned_enc", 0], "vae": ["tuned_vae", 0]}}
        graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "wan22-decode"}}
        entry = server.wait(server.queue(graph), timeout=900)
        assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
        log = server.read_log()
        assert "Missing VAE keys" not in log and "Leftover VAE keys" not in log
        latents = {name: load_file(glob.glob(os.path.join(base, "output", "latents", f"wan22-{name}_*.latent"))[-1])
                   ["latent_tensor"] for name in ("base", "tuned")}
        assert latents["tuned"].shape[:2] == (1, 48) and torch.equal(latents["tuned"], latents["base"])
        png = glob.glob(os.path.join(base, "output", "wan22-decode_*.png"))[-1]
        theirs = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0)
        z = latents["tuned"].float()
        z = z[:, :, 0] if z.ndim == 5 else z  # ComfyUI's Wan latents are 5D (B, C, T, H, W)
        with torch.no_grad():
            ours = load_vae(out_file).model.decode(z).sample
        ours = ((ours[0] + 1) / 2).clamp(0, 1).movedim(0, -1)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1.5 / 255
    finally:
        # ComfyUI's caches would keep the 705 M-parameter VAEs for the next tests of this server
        server.requests.post(server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
        for f in [path, out_file] + glob.glob(os.path.join(base, "output", "latents", "wan22-*")):
            if os.path.exists(f):
                os.unlink(f)
