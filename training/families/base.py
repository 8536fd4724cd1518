"""The ``Family`` type: what the rest of the library asks of a VAE, answered once per family.

The ground of :mod:`training.families`: the type and the helpers every family module shares. It imports
nothing above the ground floor (errors, tensors); the families and the registry (``training.families``) build on it.

Every family's model is a diffusers module with the same image interface: ``encode(x)`` of BCHW
images in [-1, 1] gives ``.latent_dist`` (``mean``, ``logvar``, ``mode()``, ``sample(g)``) of BCHW
latents, ``decode(z)`` gives ``.sample`` (BCHW), and its parameters are named ``encoder.*``,
``quant_conv.*``, ``decoder.*``, ``post_quant_conv.*``, so which tensors train is decided on those
names for every family. What differs is in each family's :class:`Family`: how a file is recognised and
read, how its keys map to the module's and back, what images cannot train, and how the latents are described.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import VAEFTError
from ..tensors import listing

# Module-name prefixes trained in each mode (shared by every family's module).
TRAINABLE_PREFIXES = {
    # (a distilled tiny student's own encoder, training.students, trains beside its decoder)
    "decoder": ("decoder.", "post_quant_conv.", "tiny_encoder."),
    "full": ("encoder.", "quant_conv.", "decoder.", "post_quant_conv."),
}


@dataclass(frozen=True, eq=False)  # one object per family: compared and hashed by identity
class Family:
    """One VAE family. ``name`` is recorded in checkpoints and exports; the functions take and return
    plain dicts of tensors (a file's, in its own layout) and modules."""

    name: str                 # "kl-f8", "wan2.1"
    label: str                # what it is, for messages: "kl-f8 VAE (AutoencoderKL: SD1.x/2.x/SDXL, SD3, Flux.1)"
    files: str                # the files users have for it, for messages
    short: str                # its name in running text: "kl-f8", "Wan 2.1"
    models: str               # the diffusion models that use it, for help texts: "Qwen-Image, Wan 2.1"
    diffusers_classes: str    # the diffusers classes of its exported folder: "AutoencoderKL"
    probes: tuple[str, ...]   # keys that mark a (prefix-free) state dict as this family's, in each layout it reads
    recognise: Callable[[dict], bool]                       # are these (prefix-free) tensors this family's?
    file_layout: Callable[[dict, str], tuple[dict, list[str]]]  # any layout it reads -> its file layout, dropped keys
    check: Callable[[dict, str], None]                      # refuse a damaged or mixed file, naming it
    build: Callable[[dict], tuple[torch.nn.Module, dict[str, str]]]  # file tensors -> model, file key -> module key
    # the file key of a module key, in the layout of the family's file tensors given (to name what a file lacks)
    file_key: Callable[[str, dict], str]
    decoder_block: Callable[[str], str | None]              # the decoder block of a module name (fp16 report)
    downsampling: Callable[[torch.nn.Module], int]          # pixels per latent, each side
    # how the exported latents are scaled for a diffusion model: (trained, exported model, export probe,
    # the user's latent-family choice or "auto", device, measure) -> {"family", "why", "source", ...};
    # ``measure`` is the latent-statistics function (``training.probe.latent_statistics``), handed down
    # by the caller so that no family imports from above its floor
    latents: Callable[..., dict]
    # refuse a latent-family choice ("auto" or one of latent_choices) this VAE cannot be exported with, naming
    # both: (model, choice) -> None; checked before training (--family) and again by ``latents``
    check_latent_choice: Callable[[torch.nn.Module, str], None]
    # the diffusers model (meta device) that file tensors and the latents' scaling make: the export's folder
    diffusers_model: Callable[[dict, dict, str], torch.nn.Module]
    # file keys of tensors written in another form than the base stores them (kl-f8: attention matrices
    # as the 1x1 convolutions stock loaders take), from the base's {file key: shape}
    conv_form: Callable[[dict], list[str]] = lambda shapes: []
    # module-name patterns of tensors still images cannot train (no gradient reaches them at one frame)
    image_frozen: tuple[str, ...] = field(default_factory=tuple)
    fused_norms: bool = False  # its GroupNorms can run as the fused Triton kernels (training.fused_blocks)
    # the decoder's last weight (LDM's adaptive GAN weight): diffusers' name in every family's module
    last_layer: Callable[[torch.nn.Module], torch.Tensor] = lambda model: model.decoder.conv_out.weight
    # file keys whose base tensor may differ from the module's only by trailing 1s (kl-f8: attention weights
    # stored as (C, C) matrices or (C, C, 1, 1) convolutions)
    reshapable: Callable[[str], bool] = lambda key: False
    # refuse a TrainConfig the family cannot train with, naming the setting (checked before any file is written)
    check_config: Callable[[object], None] = lambda cfg: None
    # the training copy's set-up from the (checked) TrainConfig (the Wan family: its 2D or 3D path)
    set_up: Callable[[torch.nn.Module, object], None] = lambda model, cfg: None
    # the decoder's output before anything clamps it (the export's fp16/bf16 check watches it)
    raw_decode: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lambda model, z: model.decode(z).sample
    # what the untrained tensors are, in the family's words, for mode 'decoder' / 'full' (the export report)
    frozen_what: Callable[[str], str] = lambda trainable: "encoder, quant_conv"
    extra_metadata: dict = field(default_factory=dict)  # vaeft.* facts every export of the family records
    # file-key prefixes written in the base's dtype whatever the export dtype (Flux.2's latent statistics)
    keep_dtype: tuple[str, ...] = field(default_factory=tuple)
    # the latent families a user may name for this VAE family's exports (kl-f8: sd, sdxl, sd3, flux); "auto"
    # is always accepted
    latent_choices: tuple[str, ...] = field(default_factory=tuple)
    # latent and image channels of the family's module (its config names them in the family's own words)
    latent_channels: Callable[[torch.nn.Module], int] = lambda model: int(model.config.latent_channels)
    image_channels: Callable[[torch.nn.Module], int] = lambda model: int(model.config.in_channels)
    # the LATENT users hold (ComfyUI's VAE Encode, a sampler's output, Save Latent's file: the pipeline's latents
    # before the diffusion model's own scaling) <-> the module's decode input, (model, z) -> z, both 4D: identity
    # but for Flux.2, whose held latents are 2x2-patchified and normalised by the VAE's BatchNorm
    held_latent: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lambda model, z: z   # module's -> held
    module_latent: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lambda model, z: z  # held -> module's
    # distil (training.students): which loaders besides ComfyUI's Load VAE read a narrower decoder of the family's own
    # layout ("" = no narrow student for the family: kl-f8 and Flux.2 have one), and the tiny decoder its latents get in ComfyUI: (model, latent-family choice or "auto", base file name,
    # measured latent statistics or None) -> {"name", "scale", "shift", "channels", "latent_family", "why"}; None: none
    narrow_loaders: str = ""
    tiny: Callable[..., dict] | None = None
    video: bool = False  # its held latents are 5D (B, C, T, h, w), frame 0 an image's own latent (the Wan layouts)

    # One object per family: copies of a model (deepcopy, for training) carry the same Family, so
    # identity comparisons hold and nothing is rebuilt.
    def __copy__(self) -> "Family":
        return self

    def __deepcopy__(self, memo) -> "Family":
        return self

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


def decoder_block_of(name: str, activation: str, norm_out: str) -> str | None:
    """The decoder block of a module name in the diffusers layout every family's module has:
    'post_quant_conv', 'conv_in', 'mid_block', 'up_blocks.N', ``norm_out`` (with the ``activation`` module
    that follows it) or 'conv_out'; None outside the decoder (the fp16/bf16 report's grouping)."""
    parts = name.split(".")
    if parts[0] == "post_quant_conv":
        return "post_quant_conv"
    if parts[0] != "decoder" or len(parts) < 2:
        return None
    if parts[1] == activation:  # the SiLU between the last norm and conv_out
        return norm_out
    return ".".join(parts[1:3]) if parts[1] == "up_blocks" and len(parts) > 2 else parts[1]


def trained(name: str, trainable: str, family: Family) -> bool:
    """Whether module tensor ``name`` trains in mode ``trainable`` ('decoder' or 'full')."""
    return name.startswith(TRAINABLE_PREFIXES[trainable]) and not any(re.search(p, name) for p in family.image_frozen)


def family_of(model: torch.nn.Module) -> Family:
    """The :class:`Family` a model built by ``training.vae.build_vae`` carries (``vaeft_family``). A model
    that carries none was not built by the library: refused, never guessed."""
    family = getattr(model, "vaeft_family", None)
    if not isinstance(family, Family):
        raise VAEFTError(f"internal error: this {type(model).__name__} carries no VAE family; build it with "
                         "training.vae.build_vae (or load_vae) from a VAE file's tensors")
    return family


def has_family(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries a :class:`Family` (it was built by ``training.vae.build_vae``)."""
    return isinstance(getattr(model, "vaeft_family", None), Family)


def check_keys(sd: dict, name_of: Callable[[str], str], source: str, label: str) -> None:
    """Refuse, naming the file and its tensors, the keys of ``sd`` that are not part of the family: those
    ``name_of`` (a key map of the family) raises on, or cannot parse (too few parts, a block number that is
    not one). Such a file mixes parts of different VAEs or is no VAE."""
    foreign = []
    for k in sd:
        try:
            name_of(k)
        except (VAEFTError, IndexError, ValueError):
            foreign.append(k)
    if foreign:
        raise VAEFTError(f"{source} is laid out like a {label} but holds {len(foreign)} tensor(s) that are not part "
                         f"of one ({listing(sorted(foreign), 4)}): the file mixes parts of different VAEs or is another "
                         "model; use one complete VAE file.")


def conv_io(sd: dict, name: str) -> tuple[int, int] | None:
    """(in, out) channels of convolution ``name`` in a state dict (its ``name.weight``), None if absent."""
    v = sd.get(f"{name}.weight")
    return (int(v.shape[1]), int(v.shape[0])) if isinstance(v, torch.Tensor) and v.ndim >= 2 else None
