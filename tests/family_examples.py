"""A small random-init VAE of every registered family, as users' files hold it: what the family contract test
(tests/test_families.py) runs on. A family added to ``training.families.FAMILIES`` is tested by that test
once it has an entry here; the contract test fails, naming the family, until it has one.

Each entry: ``file(seed)`` -> the family's file layout (the layout exports are written in, in the dtype
released files use), and ``other_layouts(file_sd)`` -> {name: the same tensors in another layout the family
reads, beyond the module's own (diffusers') layout, which the contract test derives itself}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def klf8_file(seed: int) -> dict[str, torch.Tensor]:
    """SD1.x layout (4 latent channels, quant convs), two levels of 32/64 channels, ldm keys."""
    from conftest import tiny_ldm_sd

    return tiny_ldm_sd(seed=seed)


WAN_TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])


def wan_file(seed: int = 0, channels: int = 3) -> dict[str, torch.Tensor]:
    """The original (ComfyUI) layout in bf16, as the released qwen_image_vae.safetensors holds it; ``channels``
    4: Qwen-Image-Layered's RGBA VAE (``encoder.conv1`` takes 4 channels, the decoder's head gives 4)."""
    from diffusers import AutoencoderKLQwenImage

    from training.families import wan

    torch.manual_seed(seed)
    dsd = AutoencoderKLQwenImage(**WAN_TINY, input_channels=channels).state_dict()
    per = WAN_TINY["num_res_blocks"] + 2
    return {wan.to_original_key(k, per): v.detach().to(torch.bfloat16).clone() for k, v in dsd.items()}


WAN22_TINY = dict(base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True], is_residual=True)


def wan22_file(seed: int) -> dict[str, torch.Tensor]:
    """Wan 2.2 in the original (ComfyUI) layout in bf16: 48 latent channels, RGB patchified 2x2 into 12
    channels, causal 3D convolutions (a decoder wider than the encoder, as the released 160/256)."""
    from diffusers import AutoencoderKLWan

    from training.families import wan22

    torch.manual_seed(seed)
    dsd = AutoencoderKLWan(**WAN22_TINY, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=8).state_dict()
    return {wan22.to_original_key(k, WAN22_TINY["num_res_blocks"]): v.detach().to(torch.bfloat16).clone()
            for k, v in dsd.items()}


def qwen21_file(seed: int) -> dict[str, torch.Tensor]:
    """Qwen-Image 2.1 in the original (ComfyUI) layout in bf16: 64 latent channels, RGBA, every causal
    convolution 5D with temporal size 1 (diffusers' class holds them as 4D)."""
    from diffusers import AutoencoderKLQwenImage21

    from training.families import wan22

    torch.manual_seed(seed)
    dsd = AutoencoderKLQwenImage21(**{**WAN22_TINY, "z_dim": 64}, in_channels=4, out_channels=4,
                                   scale_factor_spatial=4).state_dict()
    sd, _ = wan22.file_layout({k: v.detach().to(torch.bfloat16).clone() for k, v in dsd.items()})
    return sd


def flux2_file(seed: int) -> dict[str, torch.Tensor]:
    """Black Forest Labs' layout in bf16 (the batch counter int64), with non-trivial BatchNorm statistics."""
    from diffusers import AutoencoderKLFlux2

    from training.families import flux2

    torch.manual_seed(seed)
    m = AutoencoderKLFlux2(block_out_channels=[32, 64], layers_per_block=1, latent_channels=32,
                           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    m.bn.running_mean.normal_(0, 0.5)
    m.bn.running_var.uniform_(0.25, 2.25)
    sd, _ = flux2.file_layout({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                               for k, v in m.state_dict().items()})
    return sd


def flux2_comfyui(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """ComfyUI holds a Flux.2 VAE with the quant convolutions at the top, as kl-f8's."""
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    return {"comfyui": {next((t + k[len(b):] for b, t in moved.items() if k.startswith(b)), k): v
                        for k, v in sd.items()}}


@dataclass(frozen=True)
class Example:
    file: Callable[[int], dict[str, torch.Tensor]]
    other_layouts: Callable[[dict], dict[str, dict]] = field(default=lambda sd: {})
    image_size: int = 32  # a patch side the family's downsampling divides
    channels: int = 3  # image channels (Qwen-Image 2.1: RGBA)


EXAMPLES: dict[str, Example] = {
    "kl-f8": Example(klf8_file),
    "wan2.1": Example(wan_file),
    "flux2": Example(flux2_file, flux2_comfyui),
    "wan2.2": Example(wan22_file),
    "qwen-image-2.1": Example(qwen21_file, channels=4),
}
