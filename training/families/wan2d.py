"""What the Wan-layout VAE families (Wan 2.1: :mod:`.wan`; Wan 2.2 and Qwen-Image 2.1: :mod:`.wan22`) share:
their key grammar and the exact one-frame (2D) path.

Their diffusers modules (``AutoencoderKLQwenImage`` / ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage21``)
take 5D video (B, C, T, H, W). At one frame a causal 3D convolution, whose input is padded with zeros in
front in time, only ever multiplies its last temporal tap with the frame, and the temporal resampling
layers (``time_conv``) are skipped; the residual down/up blocks' shortcuts (``avg_shortcut``: averaging and
duplication over space and time) keep their one-frame meaning when called on a one-frame video. So the
2D path runs every causal convolution as a 2D convolution with that tap, exactly, at a fraction of the
cost, and supports gradient checkpointing (diffusers' 3D path caches features between calls and has
none). ``image_path = "3d"`` runs diffusers' own forward, the reference the 2D path is tested against.

A block's own forward hooks run on its output (the export's fp16/bf16 check and the fp16-fix recipe watch
the residual stream through them), as do the hooks of every layer the path computes without calling it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch.utils.checkpoint import checkpoint

from ..errors import VAEFTError
from .base import decoder_block_of


# ----- the key grammar every Wan-layout family shares: the original (ComfyUI) names <-> diffusers'

# a residual block's tensors, a head's (norm, SiLU, conv) and the quant convolutions at the top
RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
            "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
            "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
HEAD = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight", "head.2.bias": "conv_out.bias"}
TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
REV_RESIDUAL = {v: k for k, v in RESIDUAL.items()}
REV_HEAD = {v: k for k, v in HEAD.items()}


def foreign(key: str, label: str) -> VAEFTError:
    return VAEFTError(f"state dict key {key!r} is not part of a {label}")


def sub(rest: str, table: dict[str, str], key: str, label: str) -> str:
    """``table[rest]``, or the refusal naming ``key`` as no part of a ``label``."""
    if rest not in table:
        raise foreign(key, label)
    return table[rest]


def shared_to_diffusers(key: str, label: str) -> tuple[str, str, str | None]:
    """(head, rest, diffusers' name) of an original-layout key of the parts every Wan layout names alike (the
    quant convolutions, conv1, the head, the middle blocks); the name is None for a level's key, which each
    family maps itself. Refused, naming ``label``, for a key of no Wan-layout VAE."""
    head, _, rest = key.partition(".")
    if head in TOP:
        return head, rest, f"{TOP[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        raise foreign(key, label)
    if rest.startswith("conv1."):
        return head, rest, f"{head}.conv_in.{rest[6:]}"
    if rest.startswith("head."):
        return head, rest, f"{head}.{sub(rest, HEAD, key, label)}"
    m = re.fullmatch(r"middle\.([012])\.(.+)", rest)
    if m:
        if m.group(1) == "1":  # the attention: the same names under attentions.0
            return head, rest, f"{head}.mid_block.attentions.0.{m.group(2)}"
        return head, rest, f"{head}.mid_block.resnets.{int(m.group(1)) // 2}.{sub(m.group(2), RESIDUAL, key, label)}"
    return head, rest, None


def shared_to_original(key: str, label: str) -> tuple[str, str, str | None]:
    """The inverse of :func:`shared_to_diffusers`: (head, rest, original name or None for a level's key)."""
    head, _, rest = key.partition(".")
    for orig, diff in TOP.items():
        if head == diff:
            return head, rest, f"{orig}.{rest}"
    if head not in ("encoder", "decoder"):
        raise foreign(key, label)
    if rest.startswith("conv_in."):
        return head, rest, f"{head}.conv1.{rest[8:]}"
    if rest in REV_HEAD:
        return head, rest, f"{head}.{REV_HEAD[rest]}"
    m = re.fullmatch(r"mid_block\.(attentions\.0|resnets\.([01]))\.(.+)", rest)
    if m:
        if m.group(2) is None:
            return head, rest, f"{head}.middle.1.{m.group(3)}"
        return head, rest, f"{head}.middle.{2 * int(m.group(2))}.{sub(m.group(3), REV_RESIDUAL, key, label)}"
    return head, rest, None


# ----- the image interface and the one-frame path


class OneFrame:
    """Mixin for a diffusers Wan-layout autoencoder: BCHW images (one frame) in and out. ``image_path``:
    "2d" (exact at one frame, fast, gradient checkpointing available) or "3d" (diffusers' own forward).
    ``patch_size`` (the config's): pixels folded into channels before the encoder (Wan 2.2: 2)."""

    image_path = "2d"
    checkpointing = False

    def _patch(self) -> int:
        return int(getattr(self.config, "patch_size", None) or 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if self.image_path == "3d":
            h = self._encode(x[:, :, None])[:, :, 0]
        else:
            h = conv(self.quant_conv, encoder_2d(self.encoder, patchify(x, self._patch()), self.checkpointing))
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1]: the decoder's output clamped, as diffusers' and ComfyUI's decode do."""
        if self.image_path == "3d":
            out = self._decode(z[:, :, None]).sample[:, :, 0]
        else:
            out = self.decode_unclamped(z).clamp(-1.0, 1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output before the clamp (the 2D path; exact at one frame), every layer's forward
        hooks run: the export's fp16/bf16 check watches activations and pixels past white or black."""
        out = decoder_2d(self.decoder, conv(self.post_quant_conv, z), self.checkpointing)
        return unpatchify(out, self._patch())

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        """Recompute each block in the backward pass (the 2D path only: the 3D path caches features)."""
        if self.image_path != "2d":
            raise VAEFTError("gradient checkpointing of a Wan-layout VAE (Wan 2.1/2.2, Qwen-Image) needs its 2D "
                             "path (wan_2d on)")
        self.checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.checkpointing = False


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C·p·p, H/p, W/p) in the channel order of diffusers' and ComfyUI's Wan 2.2
    (channel, column offset, row offset)."""
    if p == 1:
        return x
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 1, 5, 3, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, cpp, h, w = x.shape
    c = cpp // (p * p)
    return x.view(b, c, p, p, h, w).permute(0, 1, 4, 3, 5, 2).reshape(b, c, h * p, w * p)


def hooked(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, computed from ``x`` for ``module`` without calling it, passed through the module's forward
    hooks as a call would (the export's fp16/bf16 check watches each layer's output through them)."""
    for hook in module._forward_hooks.values():
        out = hook(module, (x,), y)
        y = y if out is None else out
    return y


def conv(c, x: torch.Tensor) -> torch.Tensor:
    """A causal 3D convolution at one frame: its last temporal tap as a 2D convolution (the zero padding in
    front in time meets every other tap). Qwen-Image 2.1's diffusers convolutions are already 2D."""
    pad = c._padding  # (w, w, h, h[, 2t, 0])
    weight = c.weight[:, :, -1] if c.weight.ndim == 5 else c.weight
    return hooked(c, x, F.conv2d(x, weight, c.bias, stride=tuple(c.stride)[-2:], padding=(pad[2], pad[0])))


def rms(norm, x: torch.Tensor) -> torch.Tensor:
    half = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
    bias = norm.bias.reshape(-1, 1, 1) if isinstance(norm.bias, torch.Tensor) else norm.bias
    return hooked(norm, x, y * norm.scale * norm.gamma.reshape(-1, 1, 1) + bias)


def _residual(block, x: torch.Tensor) -> torch.Tensor:
    shortcut = block.conv_shortcut
    h = x if isinstance(shortcut, torch.nn.Identity) else conv(shortcut, x)
    x = conv(block.conv1, block.nonlinearity(rms(block.norm1, x)))
    x = conv(block.conv2, block.dropout(block.nonlinearity(rms(block.norm2, x))))
    return x + h


def _attention(block, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    qkv = block.to_qkv(rms(block.norm, x)).reshape(b, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)
    y = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1).reshape(b, c, h, w)
    return block.proj(y) + x


def _block(block, x: torch.Tensor) -> torch.Tensor:
    kind = type(block).__name__
    if kind.endswith("ResidualBlock"):
        return _residual(block, x)
    if kind.endswith("AttentionBlock"):
        return _attention(block, x)
    if kind.endswith("Resample"):  # at one frame only its 2D resampling runs (time_conv is skipped)
        return block.resample(x)
    raise VAEFTError(f"internal error: no 2D forward for {kind}")


def run(block, x: torch.Tensor, ckpt: bool) -> torch.Tensor:
    """One block at one frame, its own forward hooks run on its output (a residual block's output is the
    stream's sum, which neither of its layers' outputs shows: the fp16/bf16 check and the fp16-fix
    recipe watch it)."""
    if ckpt and torch.is_grad_enabled():
        return hooked(block, x, checkpoint(_block, block, x, use_reentrant=False))
    return hooked(block, x, _block(block, x))


def _one_frame(shortcut, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """A residual level's ``avg_shortcut`` (space-time averaging / duplication) on one frame."""
    return shortcut(x[:, :, None], **kwargs)[:, :, 0]


def _mid(mid, x: torch.Tensor, ckpt: bool) -> torch.Tensor:
    x = run(mid.resnets[0], x, ckpt)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        x = run(resnet, run(attn, x, ckpt), ckpt)
    return x


def encoder_2d(enc, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
    x = conv(enc.conv_in, x)
    for layer in enc.down_blocks:
        if hasattr(layer, "resnets"):  # a residual level (Wan 2.2, Qwen-Image 2.1): blocks, then + shortcut
            x0 = x
            for resnet in layer.resnets:
                x = run(resnet, x, ckpt)
            if layer.downsampler is not None:
                x = run(layer.downsampler, x, ckpt)
            x = hooked(layer, x0, x + _one_frame(layer.avg_shortcut, x0))
        else:
            x = run(layer, x, ckpt)
    x = _mid(enc.mid_block, x, ckpt)
    return conv(enc.conv_out, enc.nonlinearity(rms(enc.norm_out, x)))


def decoder_2d(dec, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
    x = _mid(dec.mid_block, conv(dec.conv_in, x), ckpt)
    for up in dec.up_blocks:
        x0 = x
        for resnet in up.resnets:
            x = run(resnet, x, ckpt)
        samplers = getattr(up, "upsamplers", None)  # Wan 2.1's up blocks; the residual levels have one upsampler
        sampler = samplers[0] if samplers is not None else getattr(up, "upsampler", None)
        if sampler is not None:
            x = run(sampler, x, ckpt)
        shortcut = getattr(up, "avg_shortcut", None)
        if shortcut is not None:  # the first frame of a chunk: only the last temporal copy is kept
            x = hooked(up, x0, x + _one_frame(shortcut, x0, first_chunk=True))
    return conv(dec.conv_out, dec.nonlinearity(rms(dec.norm_out, x)))


# ----- what the Wan-layout families answer alike: their latents' description, settings, set-up


def per_channel_latents(name: str, short: str, mean: list[float], std: list[float], trained, model, probe,
                        device, measure) -> dict:
    """{"family", "why", "latents_mean", "latents_std", "source"} of a Wan-layout export: the family's published
    per-channel statistics (``mean``/``std``; decoder-only keeps the base's latent space), mean 0 / std 1 for a
    channel count they do not describe, re-estimated per channel on the probe's training patches with the
    trained encoder when it was trained, with ``measure`` (``training.probe.latent_statistics``)."""
    channels = int(model.config.z_dim)
    out = {"family": name, "why": "the VAE family", "latents_mean": list(mean), "latents_std": list(std),
           "source": f"{short}'s published per-channel statistics (decoder-only: the latent space is the base's)"}
    if channels != len(mean):
        out.update(latents_mean=[0.0] * channels, latents_std=[1.0] * channels,
                   source=f"no published statistics for {channels} channels: mean 0, std 1")
    if trained.config.trainable == "full":
        if probe is None or probe.train_patches is None:
            out["source"] += "; NOT re-estimated (no training patches), though the encoder was trained"
            return out
        new = measure(model, probe.train_patches, device, seed=trained.config.seed, per_channel=True)
        out.update(latents_mean=[float(f"{v:.5g}") for v in new["channel_mean"]],
                   latents_std=[float(f"{v:.5g}") for v in new["channel_std"]],
                   source=f"re-estimated per channel on {new['patches']} training patches with the trained encoder")
    return out


def refuse_latent_choice(short: str, choice: str) -> None:
    """Only "auto": Wan-layout latents are described per channel by the family's own statistics."""
    if choice != "auto":
        raise VAEFTError(f"family {choice!r} is a latent family of kl-f8 VAEs; this is a {short} VAE, whose latents "
                         "are described per channel: leave family on auto")


def check_settings(short: str, cfg, temporal_taps: bool) -> None:
    """Settings a Wan-layout family cannot train with, refused by name before anything is written.
    ``temporal_taps``: its convolutions have temporal taps still images never train (Wan 2.1, Wan 2.2)."""
    if temporal_taps and cfg.weight_decay > 0:
        # AdamW's decay would shrink the causal convolutions' other temporal taps, which still images
        # never train (no gradient reaches them at one frame), and so change the VAE's video behaviour
        raise VAEFTError(f"weight_decay {cfg.weight_decay} with a {short} VAE: its 3D convolutions' earlier "
                         "temporal taps get no gradient from still images, and weight decay would shrink them "
                         "(harming video decoding); set weight_decay to 0")
    if cfg.grad_checkpointing and not cfg.wan_2d:
        raise VAEFTError(f"grad_checkpointing with a {short} VAE needs its 2D path (wan_2d on): diffusers' 3D "
                         "forward caches features between calls and cannot recompute them")


def set_up(model, cfg) -> None:
    """The training copy's path: 2D (exact at one frame) or diffusers' 3D forward (``wan_2d`` off)."""
    model.image_path = "2d" if cfg.wan_2d else "3d"


def decoder_block(name: str) -> str | None:
    """'post_quant_conv', 'conv_in', 'mid_block', 'up_blocks.N', 'norm_out' or 'conv_out' of a module name."""
    return decoder_block_of(name, "nonlinearity", "norm_out")
