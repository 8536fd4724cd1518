"""``python -m training demo --out DIR``: a self-contained starting point without your own files.

Writes a random-init VAE in the full SD layout (the shape stock loaders accept; its
reconstructions are noise until trained) and a folder of synthetic fundus-like
images (a bright textured disc with dark vessels on black, like the retinal
photographs this tool was first built for). Nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from .errors import VAEFTError
from .export import write_safetensors
from .families.ldm import diffusers_to_ldm

SD_LAYOUT = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def random_vae_state_dict(latent_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """ldm-keyed weights of a random-init kl-f8 VAE: 4 channels with quant convs (SD1/2/XL layout)
    or 16 without (SD3/Flux layout)."""
    quant = latent_channels == 4
    torch.manual_seed(seed)
    model = AutoencoderKL(latent_channels=latent_channels, use_quant_conv=quant, use_post_quant_conv=quant,
                          **SD_LAYOUT)
    return {k: v.contiguous() for k, v in diffusers_to_ldm(model.state_dict()).items()}


def fundus_like(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: an orange-red disc with a bright optic disc and dark branching vessels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    r = np.sqrt(xx ** 2 + yy ** 2)
    disc = (r < 0.45).astype(np.float32) * np.clip(1.2 - r * 1.5, 0, 1)
    ox, oy = rng.uniform(-0.2, 0.2, 2)
    optic = np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / 0.004)
    vessels = np.zeros_like(r)
    for _ in range(12):
        angle = rng.uniform(0, 2 * np.pi)
        wiggle = rng.uniform(2, 6)
        phase = rng.uniform(0, 2 * np.pi)
        # distance to a wavy ray leaving the optic disc
        px, py = xx - ox, yy - oy
        along = px * np.cos(angle) + py * np.sin(angle)
        across = -px * np.sin(angle) + py * np.cos(angle) - 0.03 * np.sin(wiggle * along * 2 * np.pi + phase)
        width = rng.uniform(0.003, 0.008)
        vessels = np.maximum(vessels, np.exp(-(across ** 2) / width ** 2) * (along > 0))
    texture = rng.normal(0, 0.03, r.shape).astype(np.float32)
    base = disc * (1 - 0.6 * vessels) + texture * disc
    rgb = np.stack([0.85 * base + 0.15 * optic, 0.35 * base + 0.55 * optic, 0.12 * base + 0.35 * optic], -1)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_demo(out: str, images: int = 6, size: int = 512, latent_channels: int = 4, seed: int = 0) -> dict:
    if latent_channels not in (4, 16):
        raise VAEFTError(f"--latent-channels must be 4 (SD1/2/XL) or 16 (SD3/Flux); got {latent_channels}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    vae_path = os.path.join(out, f"sd-vae-random-init-{latent_channels}ch.safetensors")
    if not os.path.exists(vae_path):
        write_safetensors(random_vae_state_dict(latent_channels, seed), vae_path,
                          metadata={"vaeft.note": "random init, for trying the tool"})
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(images):
        p = os.path.join(out, "images", f"fundus_{i:02d}.png")
        Image.fromarray(fundus_like(size, rng)).save(p)
        paths.append(p)
    return {"vae": vae_path, "images": os.path.join(out, "images"), "count": len(paths)}
