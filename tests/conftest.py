"""Shared fixtures: tiny random-init VAEs (nothing is downloaded) and real images from scikit-image."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (bash .ci/run: three workers) each worker computes on one thread, and so do the processes
# its tests start (the CLI, torchrun, ComfyUI), so the workers share the cores instead of fighting over them and
# a run a test continues in another process computes with the same thread count, bit for bit; alone, a test
# uses up to 2.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def tiny_diffusers_vae(latent_channels: int = 4, quant: bool = True, seed: int = 0):
    """A 2-level AutoencoderKL small enough for CPU tests (same block types as SD's)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        use_quant_conv=quant, use_post_quant_conv=quant,
    )


def tiny_ldm_sd(latent_channels: int = 4, quant: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    from training.families.ldm import diffusers_to_ldm

    return {k: v.detach().clone() for k, v in
            diffusers_to_ldm(tiny_diffusers_vae(latent_channels, quant, seed).state_dict()).items()}


SD_VAE_CONFIG = dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


@pytest.fixture
def tiny_vae_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny_vae.safetensors"
    save_file(tiny_ldm_sd(), str(path))
    return path


@pytest.fixture(scope="session")
def lpips_random():
    from training.losses import load_lpips

    torch.manual_seed(0)
    return load_lpips("vgg", random_backbone=True)


def write_images(folder, names=("astronaut", "coffee", "chelsea", "retina"), size: int = 128):
    """Real photos from scikit-image, downscaled to ``size`` on the short side, as PNGs."""
    import numpy as np
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    for name in names:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        img = Image.fromarray(arr[..., :3])
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
        img.save(os.path.join(folder, f"{name}.png"))
    return folder


def run_with_node_modules(body: str) -> None:
    """``body`` (Python source) in a fresh interpreter where ComfyUI's ``comfy_api`` is importable (the nodes import
    it) and the pack is the package ``vaeftpack`` without its nodes' ``__init__`` (which registers with ComfyUI), as
    ``importlib``, ``sys``, ``types``, ``torch`` and the pack's modules by import; it must print "OK" last. Skipped
    without a ComfyUI checkout."""
    import subprocess

    from comfy_server import comfyui_path

    comfy = comfyui_path() or os.path.expanduser("~/ComfyUI")
    if not os.path.isfile(os.path.join(comfy, "comfy_api", "latest", "__init__.py")):
        pytest.skip("needs a ComfyUI checkout (COMFYUI_PATH) for comfy_api")
    code = f"""
import importlib, sys, types, torch
sys.path[:0] = [{comfy!r}]
for name, path in (("vaeftpack", {ROOT!r}), ("vaeftpack.nodes", {os.path.join(ROOT, "nodes")!r})):
    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m  # not the nodes' __init__ (ComfyUI's)
""" + body
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stderr[-3000:]


def cli_main(*args, env=None, check=True):
    """``python -m training ARGS`` run in this process by ``training.cli.main``, as the subprocess
    would run it but without paying torch's and diffusers' import again: (exit code, stdout, stderr)
    in a ``subprocess.CompletedProcess``; AssertionError on failure when ``check``. ``env``: variables
    set (an empty value unsets) while it runs."""
    import contextlib
    import io
    import subprocess

    from training.cli import main

    argv = [str(a) for a in args]
    saved = {k: os.environ.get(k) for k in (env or {})}
    out, err = io.StringIO(), io.StringIO()
    try:
        for k, v in (env or {}).items():
            if v:
                os.environ[k] = v
            else:
                os.environ.pop(k, None)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: --help, or a bad flag
                code = e.code if isinstance(e.code, int) else 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    p = subprocess.CompletedProcess(["python", "-m", "training", *argv], code, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr[-3000:]}")
    return p


def run_cli(*args, env=None, check=True):
    """``python -m training ARGS`` in a subprocess, as a user runs it; AssertionError on failure when ``check``."""
    import subprocess

    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process computes
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr[-3000:]}")
    return p


def train(vae, batches, cfg, *, probe=None, dataset=None, **kwargs):
    """``fine_tune`` and then the :class:`training.trained.Trained` result an export takes, as the
    session makes it (``probe``: for the half-precision check; ``dataset``: a PatchDataset summary)."""
    from training.session import trained_result
    from training.trainer import fine_tune

    return trained_result(vae, fine_tune(vae, batches, cfg, **kwargs), probe=probe, dataset=dataset)


@pytest.fixture(scope="session")
def comfyui_server(tmp_path_factory):
    """One headless ComfyUI (COMFYUI_PATH) for the integration modules that need no settings of their
    own (tests/test_comfyui.py, tests/test_comfyui_runs.py): started and given its base folder once.
    Yields (server, base folder, the random base VAE's ldm state dict); a module that restarts the
    server updates this object in place."""
    from comfy_server import Server, comfyui_path, prepare_base

    base = str(tmp_path_factory.mktemp("comfy"))
    sd = prepare_base(base)
    server = Server(base, comfyui_path())
    try:
        yield server, base, sd
    finally:
        server.stop()


def remove_run_folders(base: str) -> None:
    """Every node fine-tune leaves a run folder with a full-size checkpoint (~0.8 GB): free the disk."""
    import shutil

    shutil.rmtree(os.path.join(base, "output", "vae_ft_runs"), ignore_errors=True)
