"""Reconstruction losses on [-1, 1] images, and the LPIPS network they use.

The LPIPS package ships its small linear heads, but its backbone (torchvision's
VGG16 / AlexNet ImageNet weights) is normally downloaded at first use. This
package never downloads: it reads the backbone from a file the user names or from
torchvision's own cache, and otherwise stops with a message saying where to put it.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.nn.functional as F

from .alpha import has_alpha, over_black_and_white
from .errors import VAEFTError

# torchvision's file names for the ImageNet weights lpips uses (VGG16_Weights.IMAGENET1K_V1,
# AlexNet_Weights.IMAGENET1K_V1); torch.hub keeps them under <hub dir>/checkpoints/.
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
ENV_BACKBONE = "VAEFT_LPIPS_BACKBONE"


def backbone_candidates(net: str) -> list[str]:
    """Where we look for the backbone weights, in order."""
    paths = []
    if os.environ.get(ENV_BACKBONE):
        paths.append(os.environ[ENV_BACKBONE])
    paths.append(os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_FILES[net]))
    return paths


def _read_backbone(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise VAEFTError(f"cannot read LPIPS backbone file {path!r}: {e}") from e


def _load_backbone_from_disk(model: torch.nn.Module, net: str, path: str | None) -> None:
    """Fill ``model``'s backbone from ``path`` (must fit) or else from the first candidate that fits
    this network: VAEFT_LPIPS_BACKBONE may name the VGG file for training while evaluation asks for
    AlexNet, which then comes from torchvision's cache."""
    if path:
        if not os.path.isfile(path):
            raise VAEFTError(f"LPIPS backbone file {path!r} does not exist")
        _load_backbone(model.net, _read_backbone(path), path)
        return
    unfit = []
    for p in backbone_candidates(net):
        if os.path.isfile(p):
            try:
                _load_backbone(model.net, _read_backbone(p), p)
                return
            except VAEFTError as e:
                unfit.append(str(e))
    where = " or ".join(repr(p) for p in backbone_candidates(net))
    raise VAEFTError(
        f"LPIPS needs torchvision's ImageNet {net} weights ({BACKBONE_FILES[net]}), which are not on this "
        f"machine and are never downloaded here{' (' + '; '.join(unfit) + ')' if unfit else ''}. Put the file "
        f"at {where}, pass its path (--lpips-backbone, or set {ENV_BACKBONE}), "
        "or train without the perceptual term (lpips_weight = 0).")


def load_lpips(net: str = "vgg", backbone_path: str | None = None, random_backbone: bool = False
               ) -> torch.nn.Module:
    """A frozen ``lpips.LPIPS`` in eval mode; inputs are BCHW in [-1, 1].

    ``random_backbone=True`` keeps the backbone at random init (tests only: the
    distance is then not perceptual, but gradients and shapes are the real thing).
    """
    if net not in BACKBONE_FILES:
        raise VAEFTError(f"unknown LPIPS network {net!r}; use one of {sorted(BACKBONE_FILES)}")
    import lpips  # lazy: only runs that use LPIPS import it (it loads torchvision's models)

    # pnet_rand=True: build the backbone without torchvision's download; the linear
    # heads (pretrained=True) come from the lpips package itself.
    with warnings.catch_warnings():  # torchvision's deprecation notes about `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        _load_backbone_from_disk(model, net, backbone_path)
    model.eval().requires_grad_(False)
    return model


def _load_backbone(slices: torch.nn.Module, sd: dict, path: str) -> None:
    """Copy torchvision ``features.{i}.*`` weights into lpips' ``slice{s}.{i}.*`` modules."""
    target = {}
    for name in slices.state_dict():
        m = re.match(r"slice\d+\.(\d+)\.(weight|bias)$", name)
        if m:
            target[f"features.{m.group(1)}.{m.group(2)}"] = name
    own = slices.state_dict()
    missing = [k for k in target if k not in sd]
    wrong = [k for k in target if k in sd and sd[k].shape != own[target[k]].shape]
    if missing or wrong:
        raise VAEFTError(f"{path!r} is not a torchvision backbone for this LPIPS network "
                         f"({'missing ' + str(missing[:3]) if missing else 'other shapes: ' + str(wrong[:3])})")
    slices.load_state_dict({target[k]: sd[k] for k in target}, strict=True)


class ReconstructionLoss(torch.nn.Module):
    """``mse_weight·MSE + l1_weight·L1 + lpips_weight·LPIPS`` on BCHW images in [-1, 1].

    The LPIPS term is computed with gradient flowing into the reconstruction (the
    network's own weights stay frozen). Returns (total, parts) where parts holds
    detached per-term scalars for logging.

    RGBA images (C = 4, straight alpha, :mod:`training.alpha`): MSE and L1 over all four channels (alpha
    trains like a colour), LPIPS on the RGB composited over black and over white, the mean of both (the
    network takes 3 channels; an alpha error shows against at least one of the two backgrounds).
    """

    def __init__(self, mse_weight: float = 1.0, l1_weight: float = 0.0, lpips_weight: float = 0.1,
                 lpips_net: torch.nn.Module | None = None):
        super().__init__()
        if lpips_weight > 0 and lpips_net is None:
            raise VAEFTError("lpips_weight > 0 needs an LPIPS network (see training.losses.load_lpips)")
        self.mse_weight, self.l1_weight, self.lpips_weight = mse_weight, l1_weight, lpips_weight
        self.lpips = lpips_net if lpips_weight > 0 else None

    def forward(self, recon: torch.Tensor, target: torch.Tensor):
        recon32, target32 = recon.float(), target.float()
        parts = {}
        total = recon32.new_zeros(())
        if self.mse_weight:
            mse = F.mse_loss(recon32, target32)
            parts["mse"] = mse.detach()
            total = total + self.mse_weight * mse
        if self.l1_weight:
            l1 = F.l1_loss(recon32, target32)
            parts["l1"] = l1.detach()
            total = total + self.l1_weight * l1
        if self.lpips is not None:
            # LPIPS runs in the autocast dtype when one is active; its mean is taken in fp32.
            if has_alpha(recon):
                p = self.lpips(over_black_and_white(recon), over_black_and_white(target)).float().mean()
            else:
                p = self.lpips(recon, target).float().mean()
            parts["lpips"] = p.detach()
            total = total + self.lpips_weight * p
        parts["total"] = total.detach()
        return total, parts


class PatchDiscriminator(torch.nn.Module):
    """The PatchGAN discriminator of pix2pix, as LDM's autoencoders use it (3 layers, 64 base channels).

    Input BCHW in [-1, 1]; output (B, 1, H', W') logits, one per overlapping patch.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq = [torch.nn.Conv2d(in_channels, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [torch.nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    torch.nn.BatchNorm2d(channels * mult), torch.nn.LeakyReLU(0.2, True)]
        seq += [torch.nn.Conv2d(channels * mult, 1, 4, 1, 1)]
        self.main = torch.nn.Sequential(*seq)
        for m in self.modules():  # LDM's weights_init
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(m.weight, 1.0, 0.02)
                torch.nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        disc_weight: float) -> torch.Tensor:
    """LDM's balance of the adversarial term: ‖∇_last rec‖ / (‖∇_last g‖ + 1e-4), clamped to [0, 1e4],
    times ``disc_weight``. Gradients are taken w.r.t. the decoder's last layer only and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return (w.clamp(0.0, 1e4) * disc_weight).detach()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) summed over latent dims, averaged over the batch (LDM's form)."""
    logvar = logvar.clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()
