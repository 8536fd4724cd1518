"""The Wan 2.2 family through a real ComfyUI's API (COMFYUI_PATH): stock Load VAE builds its own Wan 2.2 VAE
(the released size: its Wan 2.2 branch has no other), VAE Fine-tune trains the decoder, Save Fine-tuned VAE
writes a drop-in file that Load VAE lists, and VAE Encode -> VAE Decode runs with it."""

from __future__ import annotations

import os

import pytest
import torch

from comfy_server import comfyui_path
from conftest import remove_run_folders
from test_comfyui import _example, _messages, _round_trip
from test_wan22 import released_wan22

pytestmark = pytest.mark.integration

if comfyui_path() is None:
    pytest.skip("the ComfyUI tests need a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {os.environ.get('COMFYUI_PATH', '')!r})", allow_module_level=True)


@pytest.fixture(scope="module")
def comfy(comfyui_server):
    yield comfyui_server
    remove_run_folders(comfyui_server[1])


def test_a_full_size_wan22_vae_from_load_vae_trains_saves_and_round_trips(comfy):
    """A full-size Wan 2.2 VAE (random, bf16, ComfyUI's layout) goes through VAE Fine-tune as Load VAE holds it;
    the saved file keeps every key, shape and dtype, the encoder, conv1 and the temporal resampling byte for
    byte, has a new decoder, is listed by Load VAE and round-trips VAE Encode -> VAE Decode with no missing or
    leftover keys."""
    from safetensors.torch import load_file, save_file

    server, base, _ = comfy
    sd = released_wan22()
    path = os.path.join(base, "models", "vae", "wan2.2_vae.safetensors")
    save_file(sd, path)
    try:
        prompt = _example("wan2.2_vae.safetensors", "vae_train", steps=1, batch_size=1, preview_every=0)
        next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "wan22"
        entry = server.wait(server.queue(prompt), timeout=1200)
        assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
        out_file = os.path.join(base, "output", "vae", "vae-ft-wan22-1.safetensors")
        exported = load_file(out_file)
        assert set(exported) == set(sd)
        for k in sd:
            assert exported[k].dtype == torch.bfloat16 and exported[k].shape == sd[k].shape, k
            if k.startswith(("encoder.", "conv1.")) or ".time_conv." in k:
                assert torch.equal(exported[k], sd[k]), k
        assert not torch.equal(exported["decoder.head.2.weight"], sd["decoder.head.2.weight"])
        del exported, sd
        _round_trip(server, "vae-ft-wan22-1.safetensors", "wan22-roundtrip")
        assert "Missing VAE keys" not in server.read_log() and "Leftover VAE keys" not in server.read_log()
    finally:
        # ComfyUI's caches would keep the 705 M-parameter VAE for the next tests of this server
        server.requests.post(server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
        os.unlink(path)
        out = os.path.join(base, "output", "vae", "vae-ft-wan22-1.safetensors")
        if os.path.exists(out):
            os.unlink(out)
