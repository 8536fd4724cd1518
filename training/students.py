"""Students of a teacher VAE, for ``distil`` (:mod:`training.distil`): faster decoders that learn the teacher's
decode of its own latents.

- **narrow**: the teacher's own architecture and file layout with a narrower decoder (``width`` instead of the
  teacher's base width, every level scaled alike), initialised from the teacher by keeping, in each of the
  decoder's 32 GroupNorm groups, the group's first channels: every group of the student is half (or a quarter) of
  the teacher's, so its statistics start close to the teacher's. The encoder, quant convs and Flux.2's BatchNorm
  are the teacher's tensors, untouched. ComfyUI's Load VAE reads the file (``decoder_ch`` off ``decoder.conv_in``).
- **tiny**: a decoder in the layout ComfyUI's ``comfy/taesd/taesd.py`` loads (TAESD: 64-channel blocks, three
  2x upsamplings; for Flux.2 the 32-channel variant with GroupNorm, the 2x2 unpatchify in front), fed what
  ComfyUI feeds it: the diffusion model's latents, ``(held - shift) * scale``, for the latent family the teacher's
  latents belong to. Optionally the matching tiny encoder, so that Load VAE offers the pair.

Both are a :class:`~training.vae.LoadedVAE`: the session trains them as it trains a fine-tune (the teacher's
encoder frozen, ``trainable='decoder'``).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .errors import VAEFTError
from .families import Family
from .tensors import sha256
from .vae import FileLayout, LoadedVAE, build_vae, model_to_file

STUDENTS = ("tiny", "narrow")
GROUPS = 32         # the GroupNorm groups of the kl-f8 and Flux.2 decoders
TINY_WIDTH = 64     # TAESD's channels
TINY_FILES = ("decoder", "encoder")


# ----- narrow


def decoder_widths(model: nn.Module) -> list[int]:
    """The channel widths of a kl-f8 / Flux.2 module's decoder, full resolution first (diffusers' up blocks run
    from the lowest resolution)."""
    return [int(b.resnets[0].conv2.weight.shape[0]) for b in reversed(model.decoder.up_blocks)]


def check_width(teacher: LoadedVAE, width: int) -> list[int]:
    """The student's decoder widths for base ``width``, or a refusal naming the teacher's widths and what works."""
    family = teacher.family
    if not family.narrow_loaders:
        raise VAEFTError(f"a narrow student is built for kl-f8 and Flux.2 VAEs; this teacher is a {family.label}. "
                         "Use --student tiny where the family has one, or fine-tune it instead")
    widths = decoder_widths(teacher.model)
    ch = widths[0]
    if width >= ch:
        raise VAEFTError(f"width {width} is not narrower than the teacher's decoder (base width {ch}, widths "
                         f"{widths}): give a width below {ch}, a multiple of {GROUPS} (e.g. {max(GROUPS, ch // 2)})")
    if width < GROUPS or width % GROUPS or any(c * width % (ch * GROUPS) for c in widths):
        raise VAEFTError(f"width {width} does not keep the teacher's {GROUPS} GroupNorm groups whole at every level "
                         f"(teacher widths {widths}): use a multiple of {GROUPS} below {ch}, e.g. {max(GROUPS, ch // 2)}")
    return [c * width // ch for c in widths]


def group_channels(c: int, keep: int) -> torch.Tensor:
    """The channels of a ``c``-wide stream a ``keep``-wide one keeps: the first ``keep // 32`` of each of its 32
    groups (both multiples of 32)."""
    g, k = c // GROUPS, keep // GROUPS
    return (torch.arange(GROUPS)[:, None] * g + torch.arange(k)[None, :]).reshape(-1)


def narrow_decoder_state(model: nn.Module, width: int, widths: list[int]) -> dict[str, torch.Tensor]:
    """The module state dict of the narrow student: the teacher's, with every decoder tensor's axes that run over
    one of the teacher's widths cut to the student's (:func:`group_channels`); decoder.conv_in's input (the
    latents) and conv_out's output (the image) keep theirs."""
    old = decoder_widths(model)
    keep = {c: group_channels(c, n) for c, n in zip(old, widths)}
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("decoder.") and t.ndim >= 1:
            for axis in range(min(t.ndim, 2)):
                if axis == 1 and name == "decoder.conv_in.weight":
                    continue  # the latent channels
                if int(t.shape[axis]) in keep:
                    t = t.index_select(axis, keep[int(t.shape[axis])])
        out[name] = t
    return out


def narrow_student(teacher: LoadedVAE, width: int) -> LoadedVAE:
    """The teacher with a decoder of base ``width`` (see the module's docstring), as a VAE in the teacher's file
    layout and dtypes (so the untrained tensors are the teacher file's, byte for byte)."""
    widths = check_width(teacher, width)
    state = narrow_decoder_state(teacher.model, width, widths)
    layout = teacher.layout
    tensors = {}
    for fk, mk in layout.module_keys.items():
        t = state[mk]
        base = layout.shapes[fk]
        dims = list(t.shape)
        if len(base) > len(dims):  # a (C, C) matrix the file stores as a 1x1 convolution, or back
            dims += [1] * (len(base) - len(dims))
        while len(base) < len(dims) and dims[-1] == 1:
            dims.pop()
        tensors[fk] = t.reshape(dims).to(layout.dtypes.get(fk, t.dtype))
    student = build_vae(tensors, source=layout.base_name or "teacher", base_sha256=layout.base_sha256)
    student.layout.from_file = layout.from_file
    return student


# ----- tiny (TAESD's layout, as ComfyUI's comfy/taesd/taesd.py loads it)


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3  # TAESD's soft clamp of the latents to about ±3


class TinyBlock(nn.Module):
    """TAESD's residual block: three 3x3 convolutions with ReLUs, plus (``group_norm``) a 1x1 bottleneck with a
    GroupNorm of 4 groups added in front. Names as ComfyUI's: ``conv.0/2/4``, ``pool.0/1/3``."""

    def __init__(self, n: int, group_norm: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = nn.Sequential(nn.Conv2d(n, 4 * n, 1, bias=False), nn.GroupNorm(4, 4 * n), nn.ReLU(),
                                  nn.Conv2d(4 * n, n, 1, bias=False)) if group_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """(B, latent_channels, h, w) scaled latents -> (B, 3, 8h, 8w) in about [0, 1]. ``unpatchify`` (Flux.2):
    the input is (B, 128, h, w), 2x2-patchified 32-channel latents, unfolded first to (B, 32, 2h, 2w)."""

    def __init__(self, latent_channels: int, group_norm: bool = False, unpatchify: bool = False):
        n = TINY_WIDTH
        blocks = lambda gn=False: [TinyBlock(n, gn) for _ in range(3)]  # noqa: E731
        super().__init__(_Clamp(), _conv(latent_channels, n), nn.ReLU(),
                         *blocks(group_norm), nn.Upsample(scale_factor=2), _conv(n, n, bias=False),
                         *blocks(), nn.Upsample(scale_factor=2), _conv(n, n, bias=False),
                         *blocks(), nn.Upsample(scale_factor=2), _conv(n, n, bias=False),
                         TinyBlock(n), _conv(n, 3))
        self.unpatchify = unpatchify

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unpatchify:
            b, c, h, w = x.shape
            x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
        return super().forward(x)


class TinyEncoder(nn.Sequential):
    """(B, 3, H, W) images in [0, 1] -> (B, latent_channels, H/8, W/8) scaled latents (``patchify``, Flux.2:
    32 channels at H/8 folded to 128 at H/16, channel order (c, i, j) as ComfyUI's)."""

    def __init__(self, latent_channels: int, group_norm: bool = False, patchify: bool = False):
        n = TINY_WIDTH
        blocks = lambda gn=False: [TinyBlock(n, gn) for _ in range(3)]  # noqa: E731
        super().__init__(_conv(3, n), TinyBlock(n),
                         _conv(n, n, stride=2, bias=False), *blocks(),
                         _conv(n, n, stride=2, bias=False), *blocks(),
                         _conv(n, n, stride=2, bias=False), *blocks(group_norm),
                         _conv(n, latent_channels))
        self.patchify = patchify

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.patchify:
            b, c, h, w = y.shape
            y = y.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y


class _Decoded:
    """What diffusers' ``decode`` returns, as far as the library reads it (``.sample``)."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


class TinyStudent(nn.Module):
    """The teacher's encoder (frozen, under ``teacher.``) with a tiny decoder (``decoder.``; and ``tiny_encoder.``
    with ``with_encoder``), with the image interface every family's module has: ``encode(x)`` is the teacher's,
    ``decode(z)`` maps the teacher's module latents to ComfyUI's preview input ``(held - shift) * scale`` and
    decodes them to [-1, 1] (TAESD gives [0, 1]; ComfyUI's ``TAESD.decode`` maps it so)."""

    def __init__(self, teacher: nn.Module, family: Family, spec: dict, with_encoder: bool = False):
        super().__init__()
        self.teacher = teacher
        self.spec = dict(spec)
        flux2 = spec["channels"] == 128
        self.decoder = TinyDecoder(32 if flux2 else spec["channels"], group_norm=flux2, unpatchify=flux2)
        self.tiny_encoder = TinyEncoder(32 if flux2 else spec["channels"], group_norm=flux2, patchify=flux2) \
            if with_encoder else None
        self.config = teacher.config
        self.vaeft_family = family

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """The teacher's module latents -> what ComfyUI feeds the tiny decoder."""
        held = self.vaeft_family.held_latent(self.teacher, z)
        return (held - self.spec["shift"]) * self.spec["scale"]

    def encode(self, x: torch.Tensor):
        return self.teacher.encode(x)

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(self.decoder(self.scaled(z)) * 2 - 1)

    def side_loss(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
        """with_encoder: the MSE of the tiny encoder's latents of ``x`` ([-1, 1]) against the teacher's (its
        posterior mean, scaled as the decoder's input); None without a tiny encoder."""
        if self.tiny_encoder is None:
            return None
        with torch.no_grad():
            target = self.scaled(mean.float())
        return nn.functional.mse_loss(self.tiny_encoder(x * 0.5 + 0.5).float(), target)


def check_student(teacher: LoadedVAE, student: str, width: int, choice: str = "auto") -> None:
    """Refuse, before any data is read, a student this teacher cannot have: a narrow width that does not fit its
    decoder, a tiny decoder for a family without one, a latent family its latents are not."""
    if student == "narrow":
        check_width(teacher, width)
    else:
        tiny_spec(teacher, choice, None, check_only=True)
    teacher.family.check_latent_choice(teacher.model, choice)


def tiny_spec(teacher: LoadedVAE, choice: str = "auto", stats: dict | None = None, check_only: bool = False) -> dict:
    """The tiny decoder the teacher's latents get: {"name" (ComfyUI's: taesd, taesdxl, taesd3, taef1, taef2),
    "scale", "shift", "channels", "latent_family", "why"}; refused for a family without one."""
    family = teacher.family
    if family.tiny is None:
        raise VAEFTError(f"no tiny decoder layout is known for a {family.label}: ComfyUI's previews of its latents use "
                         "video decoders (taehv / lighttaew2_*), which this version does not distil. Use --student "
                         "narrow where the family has one, or fine-tune it")
    channels = family.image_channels(teacher.model)
    if channels != 3:
        raise VAEFTError(f"a tiny decoder (TAESD's layout) makes RGB images; this {family.short} VAE makes {channels}-"
                         "channel ones (RGBA): use --student narrow")
    down = family.downsampling(teacher.model)
    if down != 8:
        raise VAEFTError(f"a tiny decoder (TAESD's layout) upsamples 8x; this {family.short} VAE's decoder makes {down}x"
                         f"{down} pixels of one latent: it is not a {family.short} VAE of the published shape")
    if check_only:
        return {}
    return family.tiny(teacher.model, choice, teacher.layout.base_name, stats)


def tiny_student(teacher: LoadedVAE, spec: dict, with_encoder: bool = False, seed: int = 0) -> LoadedVAE:
    """A :class:`TinyStudent` of ``teacher`` (random init from ``seed``), as a VAE whose file keys are ComfyUI's
    names for the pair (``<name>_decoder.<key>`` / ``<name>_encoder.<key>``, what Load VAE assembles)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyStudent(teacher.model, teacher.family, spec, with_encoder)
    model.eval().requires_grad_(False)
    keys = {f"{spec['name']}_decoder.{k}": f"decoder.{k}" for k in model.decoder.state_dict()}
    if model.tiny_encoder is not None:
        keys.update({f"{spec['name']}_encoder.{k}": f"tiny_encoder.{k}" for k in model.tiny_encoder.state_dict()})
    state = model.state_dict()
    decides = {k: spec[k] for k in ("name", "scale", "shift", "channels")}  # not "why": a file renamed says another
    identity = hashlib.sha256(f"{teacher.layout.base_sha256}:tiny:{sorted(decides.items())}:{with_encoder}".encode())
    layout = FileLayout(family=teacher.family, shapes={fk: tuple(state[mk].shape) for fk, mk in keys.items()},
                        module_keys=keys, base_sha256=identity.hexdigest(), from_file=False,
                        base_name=teacher.layout.base_name, dtypes={fk: torch.float32 for fk in keys})
    layout.tensor_sha256 = {fk: sha256(state[mk], shapes=False) for fk, mk in keys.items()}
    return LoadedVAE(model, layout)


def tiny_files(student: LoadedVAE) -> dict[str, dict[str, torch.Tensor]]:
    """{"decoder": tensors, "encoder": tensors (with_encoder)} of a trained tiny student, each under the keys
    ComfyUI's ``TAESD`` loads its ``taesd_decoder`` / ``taesd_encoder`` with (fp32, contiguous, CPU)."""
    name = student.model.spec["name"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for fk, t in model_to_file(student.model, student.layout).items():
        part, key = fk[len(name) + 1:].split(".", 1)
        out.setdefault(part, {})[key] = t.detach().to("cpu", torch.float32).contiguous()
    return out
