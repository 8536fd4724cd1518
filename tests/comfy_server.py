"""A real, headless ComfyUI (COMFYUI_PATH) with this pack installed, for the integration and browser tests.

``comfyui_path()`` is None without a checkout; the test modules skip with that reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import torch

from conftest import ROOT, SD_VAE_CONFIG, write_images

PACK = "comfyui-vae-finetune"
API_EXAMPLES = os.path.join(ROOT, "examples", "api")
TEMPLATES = os.path.join(ROOT, "example_workflows")
# The SD VAE the generic templates' Load VAE names (example_workflows/build_ui_workflow.py TEMPLATE_VAES).
TEMPLATE_SD_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"


def comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH", "")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def comfyui_version(path: str | None = None) -> str:
    """The checkout's version (comfyui_version.py), e.g. "0.28.2"; "" when it does not say."""
    import re

    try:
        with open(os.path.join(path or comfyui_path() or "", "comfyui_version.py")) as f:
            found = re.search(r'__version__\s*=\s*"([^"]+)"', f.read())
    except OSError:
        return ""
    return found.group(1) if found else ""


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def flux2_unreadable(path: str | None = None) -> str | None:
    """Why this ComfyUI's Load VAE cannot read a Flux.2 VAE, or None when it can: one that reads Flux.2 takes
    ``bn.running_mean`` for its BatchNorm over the patchified latents (comfy/sd.py's kl-f8 branch, 0.28); an
    older one builds another family's 32-channel VAE from the file (tests/test_comfyui.py shows 0.3.64's)."""
    root = path or comfyui_path() or ""
    with open(os.path.join(root, "comfy", "sd.py")) as f:
        if "bn.running_mean" in f.read():
            return None
    return (f"ComfyUI {comfyui_version(root) or 'at ' + root} has no Flux.2 reader in its Load VAE (comfy/sd.py never "
            "reads bn.running_mean, the BatchNorm of Flux.2's latents): a Flux.2 fine-tune needs a newer ComfyUI "
            "(0.28.2 reads it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: str, settings: dict | None = None) -> dict[str, torch.Tensor]:
    """A ComfyUI base directory: this pack linked into custom_nodes, a random-init VAE in the full SD
    layout as models/vae/random_sd_vae.safetensors (stock Load VAE accepts only that layout) and, the same
    file, under the name the generic templates' Load VAE holds (TEMPLATE_SD_VAE), a random VGG backbone for LPIPS, real photos in input/vae_train, and the default user's settings.
    Returns the VAE's ldm state dict."""
    import torchvision
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from training.families.ldm import diffusers_to_ldm

    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base, "custom_nodes", PACK))
    torch.manual_seed(0)
    sd = diffusers_to_ldm(AutoencoderKL(**SD_VAE_CONFIG).state_dict())
    os.makedirs(os.path.join(base, "models", "vae"))
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(base, "models", "vae", "random_sd_vae.safetensors"))
    os.link(os.path.join(base, "models", "vae", "random_sd_vae.safetensors"), os.path.join(base, "models", "vae", TEMPLATE_SD_VAE))
    # LPIPS runs for real, on an explicitly random VGG backbone (no weights can be downloaded here).
    feats = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith("features.")}
    torch.save(feats, os.path.join(base, "vgg16-random.pth"))
    os.makedirs(os.path.join(base, "user"))  # where ComfyUI 0.28 keeps its database (it logs an error without it)
    write_images(os.path.join(base, "input", "vae_train"), size=96)
    write_images(os.path.join(base, "input"), names=("astronaut",), size=64)
    if settings:
        os.makedirs(os.path.join(base, "user", "default"))
        with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
            json.dump(settings, f)
    return sd


def write_qwen_image_vae(path: str) -> dict[str, torch.Tensor]:
    """A random-init, full-size Qwen-Image (Wan 2.1) VAE at ``path`` as ComfyUI's Load VAE finds the released
    one: the original layout, bf16 (~250 MB). Returns its state dict."""
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file

    from training.families import wan

    torch.manual_seed(3)
    sd = {wan.to_original_key(k): v.to(torch.bfloat16).contiguous()
          for k, v in AutoencoderKLQwenImage().state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return sd


def write_flux2_vae(path: str) -> dict[str, torch.Tensor]:
    """A random-init, full-size Flux.2 VAE at ``path`` as ComfyUI's FLUX.2 templates fetch flux2-vae.safetensors:
    Black Forest Labs' layout, bf16 (~170 MB), with non-trivial BatchNorm statistics (ComfyUI reads only the
    full-size architecture: four levels of 128-512 channels). Returns its state dict."""
    from diffusers import AutoencoderKLFlux2
    from safetensors.torch import save_file

    from training.families import flux2

    torch.manual_seed(5)
    m = AutoencoderKLFlux2()
    m.bn.running_mean.normal_(0, 0.5)
    m.bn.running_var.uniform_(0.25, 2.25)
    sd, _ = flux2.file_layout({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                               for k, v in m.state_dict().items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return sd


class Server:
    """``python main.py --cpu ...`` on a free port of 127.0.0.1, with ``base`` as its base directory;
    ``args``: more of main.py's flags (e.g. ``--front-end-root DIR``)."""

    def __init__(self, base: str, comfyui: str, args: tuple[str, ...] = ()):
        import requests

        self.requests = requests
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, f"server-{self.port}.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   VAEFT_LPIPS_BACKBONE=os.path.join(base, "vgg16-random.pth"))
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", base, "--disable-auto-launch", "--disable-api-nodes", *args],
            cwd=comfyui, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.read_log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start:\n{self.read_log()[-4000:]}")

    def read_log(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def get(self, path: str):
        r = self.requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r

    def queue(self, prompt: dict) -> str:
        r = self.requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex},
                               timeout=30)
        assert r.ok, r.text
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.requests.get(f"{self.url}/history/{prompt_id}", timeout=10).json()
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.read_log()[-4000:]}")

    def healthy(self) -> bool:
        return self.proc.poll() is None and self.requests.get(self.url + "/system_stats", timeout=5).ok

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def messages(entry: dict) -> str:
    return json.dumps(entry.get("status", {}).get("messages", []))


def encode_with_each(server: "Server", base: str, vaes: dict[str, str], prefix: str) -> tuple[dict, dict]:
    """One prompt: stock Load VAE -> VAE Encode -> Save Latent of input/astronaut.png with each of ``vaes`` ({tag:
    file in models/vae or output/vae}), and VAE Decode -> Save Image of the last latent with the last VAE (node "25").
    Asserts it succeeded; returns (its history entry, {tag: the saved latent tensor}) (``base``: the server's
    base directory)."""
    from safetensors.torch import load_file

    graph = {"0": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}}
    for i, (tag, name) in enumerate(vaes.items(), start=1):
        graph[f"{i}1"] = {"class_type": "VAELoader", "inputs": {"vae_name": name}}
        graph[f"{i}2"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["0", 0], "vae": [f"{i}1", 0]}}
        graph[f"{i}3"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{i}2", 0],
                                                                 "filename_prefix": f"latents/{prefix}-{tag}"}}
    last = len(vaes)
    graph["24"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{last}2", 0], "vae": [f"{last}1", 0]}}
    graph["25"] = {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": f"{prefix}-decoded"}}
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "success", messages(entry) + server.read_log()[-4000:]
    latents = {}
    for i, tag in enumerate(vaes, start=1):
        (saved,) = entry["outputs"][f"{i}3"]["latents"]
        latents[tag] = load_file(os.path.join(base, "output", saved["subfolder"], saved["filename"]))["latent_tensor"]
    return entry, latents


def api_example(name: str = "vae_finetune") -> dict:
    with open(os.path.join(API_EXAMPLES, f"{name}_api.json")) as f:
        return json.load(f)


# The start of a script that loads files with ComfyUI's own code in a subprocess (CPU mode, its log
# collected in ``messages``): argv[1] is the ComfyUI checkout, argv[2] the script's job file.
COMFY_LOADER_PREAMBLE = r'''
import json, logging, os, sys
comfy_path, jobs_path = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_path)
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.sd, comfy.utils
messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(f"{record.levelname}: {record.getMessage()}")
logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.DEBUG)
'''

