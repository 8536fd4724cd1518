"""Reconstruction metrics for comparing VAEs on the same patches.

Every metric takes images as BCHW float tensors in [-1, 1] (the library's convention)
and returns one value per image, shape (B,) (the channel shift: (B, 3)), so callers can
report mean ± std over patches. Values outside [-1, 1] (a VAE's decoder output is
unclamped) are clipped first, as they would be when the image is saved; all metrics
except LPIPS are computed on the [0, 1] image ``(x + 1) / 2``.

RGBA images (C = 4, straight alpha: :mod:`training.alpha`) count their alpha: PSNR and SSIM are taken
over all four channels (an image whose alpha alone differs scores lower), ``alpha_psnr`` over alpha
alone; LPIPS, ΔE2000 and the channel shift, which are about colour as seen, are taken on the RGB
composited over black and over white, averaged over the two (an alpha error shows against at least one
background whatever the colour; LPIPS networks take 3 channels).

=========================  =====================================================
psnr                       dB, data range 1 (higher is better)
ssim                       Gaussian window 11, sigma 1.5, on every channel (1 = identical)
alpha_psnr                 dB, alpha alone (VAEs of RGBA images)
lpips_distance             LPIPS (AlexNet by default; lower is better)
delta_e2000                mean CIEDE2000 ΔE over pixels, CIELAB D65 (lower is better;
                           ~1 is the just-noticeable difference)
channel_shift              mean(recon − original) per R, G, B, in 0..255 units
rFID                       optional; only with Inception weights on disk
=========================  =====================================================

:func:`evaluate_vaes` runs all of them for several VAEs on one set of patches.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from .device import model_place, pick_device
from .errors import VAEFTError
from .alpha import has_alpha, over_black_and_white, pair_mean
from .imageio import signed_to_unit
from .losses import load_lpips
from .vae import check_patch_side, latent_channels, perturbed, reconstruct

PSNR_MAX_DB = 100.0  # PSNR of identical images (MSE floor 1e-10) instead of +inf
SSIM_WINDOW = 11
# File names of Inception v3 weights we accept for rFID, searched in <torch hub dir>/checkpoints/.
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "inception_v3_google-0cc3c7bd.pth")


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] not in (3, 4) or x.shape != y.shape:
        raise VAEFTError(f"metrics need two BCHW RGB (or RGBA) images of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def _seen(recon: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The colours as seen: RGB as they are; RGBA over black and over white (2B images, average the
    scores with :func:`training.alpha.pair_mean`). Returns (recon, original, whether composited)."""
    _check_pair(recon, original)
    if has_alpha(recon):
        return over_black_and_white(recon.clamp(-1, 1)), over_black_and_white(original.clamp(-1, 1)), True
    return recon, original, False


def _colour_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def psnr(recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    recon, original: (B, C, H, W) in [-1, 1], C = 3 or 4 (RGBA: alpha counts as a fourth channel).
    Returns (B,) float32: ``10·log10(1 / MSE)`` with MSE over C, H, W of the [0, 1] images (data range 1,
    so it equals the usual 8-bit PSNR up to quantisation). Identical images give :data:`PSNR_MAX_DB`.
    """
    _check_pair(recon, original)
    dt = _colour_dtype(recon)
    mse = (signed_to_unit(recon.to(dt)) - signed_to_unit(original.to(dt))).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_MAX_DB / 10)))).float()


def ssim(recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), in [-1, 1] (1 = identical).

    recon, original: (B, C, H, W) in [-1, 1] (C = 3, or 4: RGBA, alpha a channel like the others), H and W
    at least 11. Returns (B,) float32.
    Gaussian window 11×11, sigma 1.5, K1 = 0.01, K2 = 0.03 on the [0, 1] images, averaged
    over channels and the "valid" part of the SSIM map (5 px from each border are left
    out, which is what scikit-image's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)`` does), via ``kornia.metrics.ssim``.
    """
    import kornia  # lazy: kornia takes a second to import, and only some metrics use it

    _check_pair(recon, original)
    if min(recon.shape[-2:]) < SSIM_WINDOW:
        raise VAEFTError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got "
                         f"{tuple(recon.shape[-2:])}")
    dt = _colour_dtype(recon)
    m = kornia.metrics.ssim(signed_to_unit(recon.to(dt)), signed_to_unit(original.to(dt)), SSIM_WINDOW, max_val=1.0,
                            padding="valid")
    return m.flatten(1).mean(1).float()


def lpips_distance(lpips_net: torch.nn.Module, recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """LPIPS distance per image; lpips_net from :func:`training.losses.load_lpips`.

    recon, original: (B, 3, H, W) in [-1, 1] (clipped), or RGBA (B, 4, H, W): the mean of the distances
    over black and over white. Returns (B,) float32, >= 0.
    """
    with torch.no_grad():
        return lpips_per_image(lpips_net, recon.float().clamp(-1, 1), original.float().clamp(-1, 1)).float()


def lpips_per_image(lpips_net: torch.nn.Module, recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """(B,) LPIPS of BCHW images in [-1, 1] as they are (gradients and autocast as the caller has them);
    RGBA: the mean over the composites over black and over white (the networks take 3 channels)."""
    recon, original, pairs = _seen(recon, original)
    d = lpips_net(recon, original).flatten(1).mean(1)
    return pair_mean(d) if pairs else d


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] (sRGB) -> CIELAB (D65, 2°) via ``kornia.color.rgb_to_lab``.

    L in [0, 100], a and b roughly in [-128, 127]. Computed in float64 (float32 on MPS).
    """
    import kornia  # lazy: kornia takes a second to import, and only some metrics use it

    return kornia.color.rgb_to_lab(signed_to_unit(x.to(_colour_dtype(x))))


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor, kL: float = 1.0, kC: float = 1.0, kH: float = 1.0
              ) -> torch.Tensor:
    """CIEDE2000 colour difference ΔE00 between two CIELAB images, per pixel.

    lab1, lab2: (..., 3, H, W) with L, a, b on dim -3. Returns (..., H, W), >= 0.
    Follows Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula:
    implementation notes", with weights kL, kC, kH (1 for the reference conditions).
    """
    if lab1.shape != lab2.shape or lab1.shape[-3] != 3:
        raise VAEFTError(f"ciede2000 needs two Lab images of the same shape (…, 3, H, W), got "
                         f"{tuple(lab1.shape)} and {tuple(lab2.shape)}")
    L1, a1, b1 = lab1.unbind(-3)
    L2, a2, b2 = lab2.unbind(-3)
    two_pi = 2 * math.pi
    p25_7 = 25.0 ** 7

    # a' = (1 + G)·a, where G compensates the a axis near neutral colours.
    cbar = 0.5 * (torch.hypot(a1, b1) + torch.hypot(a2, b2))
    c7 = cbar.pow(7)
    g = 0.5 * (1 - torch.sqrt(c7 / (c7 + p25_7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.remainder(torch.atan2(b1, a1p), two_pi)  # hue in [0, 2π)
    h2p = torch.remainder(torch.atan2(b2, a2p), two_pi)

    dl = L2 - L1
    dc = c2p - c1p
    cc = c1p * c2p
    achromatic = cc == 0
    dh = h2p - h1p
    dh = torch.where(dh > math.pi, dh - two_pi, dh)
    dh = torch.where(dh < -math.pi, dh + two_pi, dh)
    dh = torch.where(achromatic, torch.zeros_like(dh), dh)
    dH = 2 * torch.sqrt(cc) * torch.sin(dh / 2)

    lbar = 0.5 * (L1 + L2)
    cbarp = 0.5 * (c1p + c2p)
    hsum = h1p + h2p
    far = (h1p - h2p).abs() > math.pi
    hbar = torch.where(far & (hsum < two_pi), hsum + two_pi, torch.where(far, hsum - two_pi, hsum)) * 0.5
    hbar = torch.where(achromatic, hsum, hbar)

    t = (1 - 0.17 * torch.cos(hbar - math.radians(30)) + 0.24 * torch.cos(2 * hbar)
         + 0.32 * torch.cos(3 * hbar + math.radians(6)) - 0.20 * torch.cos(4 * hbar - math.radians(63)))
    l50 = (lbar - 50).pow(2)
    sl = 1 + 0.015 * l50 / torch.sqrt(20 + l50)
    sc = 1 + 0.045 * cbarp
    sh = 1 + 0.015 * cbarp * t
    cb7 = cbarp.pow(7)
    rc = 2 * torch.sqrt(cb7 / (cb7 + p25_7))
    dtheta = math.radians(30) * torch.exp(-((torch.rad2deg(hbar) - 275) / 25).pow(2))
    rt = -torch.sin(2 * dtheta) * rc

    lt, ct, ht = dl / (kL * sl), dc / (kC * sc), dH / (kH * sh)
    return torch.sqrt((lt.pow(2) + ct.pow(2) + ht.pow(2) + rt * ct * ht).clamp_min(0))


def delta_e2000(recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 ΔE per image. (B, 3, H, W) in [-1, 1] sRGB -> (B,) float32 (RGBA: the mean over
    the composites over black and over white).

    Both images go to CIELAB (D65) with :func:`rgb_to_lab`; ΔE00 is averaged over pixels.
    """
    recon, original, pairs = _seen(recon, original)
    d = ciede2000(rgb_to_lab(recon), rgb_to_lab(original)).flatten(1).mean(1).float()
    return pair_mean(d) if pairs else d


def channel_shift(recon: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean signed colour shift per channel, recon − original, in 0..255 units.

    (B, 3, H, W) in [-1, 1] -> (B, 3) float32 (columns R, G, B). Positive = the
    reconstruction is brighter in that channel (a red cast shows as R > 0). RGBA: the mean over the
    composites over black and over white.
    """
    recon, original, pairs = _seen(recon, original)
    dt = _colour_dtype(recon)
    d = ((signed_to_unit(recon.to(dt)) - signed_to_unit(original.to(dt))).mean((2, 3)) * 255.0).float()
    return pair_mean(d) if pairs else d


def image_metrics(recon: torch.Tensor, original: torch.Tensor, lpips_net: torch.nn.Module | None = None
                  ) -> dict[str, torch.Tensor]:
    """All per-image metrics at once: {"psnr", "ssim", "delta_e2000", "shift_r", "shift_g",
    "shift_b"[, "lpips"]} -> (B,) float32 CPU tensors. Inputs (B, 3, H, W) in [-1, 1]; RGBA (B, 4, H, W)
    adds "alpha_psnr" (PSNR of the alpha channel alone)."""
    out = {
        "psnr": psnr(recon, original),
        "ssim": ssim(recon, original),
        "delta_e2000": delta_e2000(recon, original),
    }
    if has_alpha(recon):
        out["alpha_psnr"] = psnr(recon[:, 3:].expand(-1, 3, -1, -1), original[:, 3:].expand(-1, 3, -1, -1))
    shift = channel_shift(recon, original)
    for i, c in enumerate("rgb"):
        out[f"shift_{c}"] = shift[:, i]
    if lpips_net is not None:
        out["lpips"] = lpips_distance(lpips_net, recon, original)
    return {k: v.detach().cpu() for k, v in out.items()}


def summarize(values: torch.Tensor) -> dict[str, float]:
    """{"mean", "std"} of per-image values (std: sample standard deviation, 0 for one value)."""
    v = values.double().flatten()
    std = v.std(unbiased=True).item() if v.numel() > 1 else 0.0
    return {"mean": v.mean().item(), "std": std}


# ----------------------------------------------------------------------------- LPIPS availability

def try_load_lpips(net: str = "alex", backbone_path: str | None = None, random_backbone: bool = False
                   ) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """(LPIPS network or None, availability dict). Never downloads.

    The availability dict is ``{"available": True, "net": net}`` or
    ``{"available": False, "net": net, "reason": message saying where to put the weights}``.
    """
    try:
        model = load_lpips(net, backbone_path, random_backbone=random_backbone)
    except VAEFTError as e:
        return None, {"available": False, "net": net,
                      "reason": f"{e} (evaluation reports the other metrics without LPIPS)"}
    info: dict[str, Any] = {"available": True, "net": net}
    if random_backbone:
        info["note"] = "random backbone (test mode): values are not perceptual"
    return model, info


# ----------------------------------------------------------------------------- rFID (optional)

def find_inception_weights(path: str | None = None) -> str | None:
    """Path of local Inception v3 weights for rFID, or None. ``path`` (if given) must exist.

    Searched: ``path``, then <torch hub dir>/checkpoints/ for :data:`INCEPTION_FILES`.
    """
    if path:
        if not os.path.isfile(path):
            raise VAEFTError(f"Inception weights file {path!r} does not exist")
        return path
    for name in INCEPTION_FILES:
        p = os.path.join(torch.hub.get_dir(), "checkpoints", name)
        if os.path.isfile(p):
            return p
    return None


def load_inception(path: str | None = None) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """(feature extractor or None, availability dict) for rFID. Never downloads.

    The extractor is torchvision's ``inception_v3`` (fc removed: 2048-d pool features) holding
    the weights found by :func:`find_inception_weights`; it takes (B, 3, H, W) in [-1, 1] and
    resizes to 299×299 itself. With pytorch-fid's ``pt_inception`` weights the numbers are
    close to, not identical with, pytorch-fid's (its few FID-specific pooling changes are not
    reproduced); either way compare rFID only between VAEs of the same run.
    """
    try:
        found = find_inception_weights(path)
    except VAEFTError as e:
        return None, {"available": False, "reason": str(e)}
    if found is None:
        where = os.path.join(torch.hub.get_dir(), "checkpoints")
        return None, {"available": False, "reason": (
            f"rFID needs Inception v3 weights ({' or '.join(INCEPTION_FILES)}), which are not on this machine "
            f"and are never downloaded here. Put one in {where!r} or pass --inception PATH.")}
    try:
        from torchvision.models import inception_v3  # only for rFID, which runs only when its weights are here

        sd = torch.load(found, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "AuxLogits."))}
        model = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        model.fc = torch.nn.Identity()
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001 - any failure means: these are not usable weights
        return None, {"available": False, "reason": f"cannot use {found!r} as Inception v3 weights: {e}"}
    model.eval().requires_grad_(False)
    return _InceptionFeatures(model), {"available": True, "weights": os.path.basename(found)}


class _InceptionFeatures(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float().clamp(-1, 1), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).flatten(1)


def frechet_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D).

    ``|mu1 − mu2|² + tr(S1) + tr(S2) − 2·tr(sqrtm(S1·S2))`` with sample covariances, in
    float64. tr(sqrtm(S1·S2)) is the sum of the square roots of the eigenvalues of S1·S2
    (real, >= 0 for covariances), computed stably rather than with a general ``sqrtm`` of
    the non-symmetric product: when min(N1, N2) <= D (the usual case for rFID over patches,
    D = 2048) it is exactly the nuclear norm of X1·X2ᵀ / sqrt((N1−1)(N2−1)) (X: centred
    features), else via the symmetric form sqrt(S1)·S2·sqrt(S1) (scipy ``eigh``).
    Needs N >= 2 per set. With N < D the estimate is biased upward: compare only values
    computed with the same N.
    """
    import numpy as np
    from scipy import linalg  # only for rFID (scipy comes with scikit-image, not with the pack's requirements)

    f1, f2 = feats1.double().cpu().numpy(), feats2.double().cpu().numpy()
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise VAEFTError(f"Fréchet distance needs two (N>=2, D) feature sets, got {f1.shape} and {f2.shape}")
    (n1, d), n2 = f1.shape, len(f2)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    x1, x2 = f1 - mu1, f2 - mu2
    tr1, tr2 = (x1 ** 2).sum() / (n1 - 1), (x2 ** 2).sum() / (n2 - 1)
    if min(n1, n2) <= d:
        tr_covmean = linalg.svdvals(x1 @ x2.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1, s2 = x1.T @ x1 / (n1 - 1), x2.T @ x2 / (n2 - 1)
        w, v = linalg.eigh(s1)
        r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + tr1 + tr2 - 2 * tr_covmean))


# ----------------------------------------------------------------------------- several VAEs

@torch.no_grad()
def evaluate_vaes(vaes: dict[str, torch.nn.Module], patches: torch.Tensor, *,
                  lpips_net: torch.nn.Module | None = None, lpips_unavailable: str | None = None,
                  inception: torch.nn.Module | None = None, rfid_unavailable: str | None = None,
                  batch_size: int = 8, device: str | torch.device | None = None) -> dict[str, dict]:
    """Reconstruction metrics of several VAEs on the same patches.

    vaes: name -> diffusers ``AutoencoderKL`` (anything with ``.encode(x).latent_dist.mode()``
    and ``.decode(z).sample``); each encodes and decodes the patches itself (posterior mode),
    so VAEs with different latent layouts can be compared on reconstruction quality.
    patches: (N, C, P, P) in [-1, 1] (C = 3, or 4: RGBA, for VAEs of RGBA images), P a multiple of 8.
    lpips_net: from :func:`try_load_lpips`;
    when None, "lpips" is reported as ``{"available": False, "reason": lpips_unavailable}``.
    inception: from :func:`load_inception`, for rFID (else unavailable with ``rfid_unavailable``).
    device: default CUDA when available; each model is moved there and back.

    Returns {name: {"psnr": {"mean", "std"}, "ssim": ..., "delta_e2000": ..., "shift_r"/"g"/"b":
    ..., "lpips": {"mean", "std"} or availability, "rfid": {"value", "patches"} or availability,
    "patches": N, "latent_channels": c}}.
    """
    if not vaes:
        raise VAEFTError("evaluate_vaes needs at least one VAE")
    if patches.ndim != 4 or patches.shape[1] not in (3, 4) or patches.shape[0] == 0:
        raise VAEFTError(f"patches must be (N, 3, P, P) (RGBA: N, 4, P, P) with N >= 1, got {tuple(patches.shape)}")
    if patches.shape[-1] % 8 or patches.shape[-2] % 8:
        raise VAEFTError(f"patch size must be a multiple of 8, got {tuple(patches.shape[-2:])}")
    for model in vaes.values():  # a 16x family needs multiples of 16
        check_patch_side(model, int(patches.shape[-1]), "patch size")
    if batch_size < 1:
        raise VAEFTError(f"batch_size must be at least 1, got {batch_size}")
    dev = torch.device(device) if device is not None else pick_device()
    n = patches.shape[0]
    if lpips_net is not None:
        lpips_net = lpips_net.to(dev)
    ref_feats = None
    if inception is not None:
        inception = inception.to(dev)
        ref_feats = torch.cat([inception(_fid_images(patches[i:i + batch_size].to(dev))).cpu()
                               for i in range(0, n, batch_size)])

    results: dict[str, dict] = {}
    for name, model in vaes.items():
        home = model_place(model)[0]
        model.to(dev)
        try:
            per: dict[str, list[torch.Tensor]] = {}
            feats = []
            for i in range(0, n, batch_size):
                x = patches[i:i + batch_size].to(dev, torch.float32)
                recon = reconstruct(model, x).float().clamp(-1, 1)
                for k, v in image_metrics(recon, x, lpips_net).items():
                    per.setdefault(k, []).append(v)
                if inception is not None:
                    feats.append(inception(_fid_images(recon)).cpu())
        finally:
            if home is not None:
                model.to(home)
        res: dict[str, Any] = {k: summarize(torch.cat(v)) for k, v in per.items()}
        if lpips_net is None:
            res["lpips"] = {"available": False, "reason": lpips_unavailable or "no LPIPS network was given"}
        if inception is not None:
            if n < 2:
                res["rfid"] = {"available": False, "reason": "rFID needs at least 2 patches"}
            else:
                res["rfid"] = {"value": frechet_distance(ref_feats, torch.cat(feats)), "patches": n}
        else:
            res["rfid"] = {"available": False, "reason": rfid_unavailable or "no Inception weights were given"}
        res["patches"] = n
        res["latent_channels"] = latent_channels(model)
        results[name] = res
    return results


def _fid_images(x: torch.Tensor) -> torch.Tensor:
    """What Inception sees of patches: RGB as they are, RGBA over black and over white (both sets)."""
    return over_black_and_white(x.clamp(-1, 1)) if has_alpha(x) else x


@torch.no_grad()
def validation_scores(model, batch: torch.Tensor, device, autocast, lpips_net, *, latent_noise: float = 0.0,
                      seed: int = 0, teacher: torch.nn.Module | None = None) -> dict[str, float]:
    """Mean MSE / PSNR / LPIPS of the posterior-mode reconstruction of held-out patches, scored
    with the weights the model holds now (RGBA: MSE and PSNR over the four channels, LPIPS on the
    composites over black and white, as :func:`lpips_per_image`). With ``latent_noise`` > 0 also
    ``noisy_mse`` / ``noisy_psnr`` / ``noisy_lpips``: the decode of the same latents perturbed as training
    perturbs them (:func:`training.vae.perturbed`), the same draw at every validation (``seed``), against the
    patches: how the decoder does on latents near, not on, the encoder's manifold. With a ``teacher`` (distil: a
    module with the same encoder) also ``teacher_mse`` / ``teacher_psnr`` / ``teacher_lpips``: the decode against
    the teacher's fp32 decode of the same latents, what the student learns."""
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        gen = torch.Generator().manual_seed(seed) if latent_noise > 0 else None
        n = 0
        for x in batch.split(8):
            x = x.to(device).float()
            with torch.no_grad(), autocast:
                mean = model.encode(x).latent_dist.mode()
                decodes = {"": model.decode(mean).sample}
                if gen is not None:
                    shift = latent_noise * torch.randn(mean.shape, generator=gen).to(device)
                    decodes["noisy_"] = model.decode(perturbed(mean, mean, shift)).sample
            for prefix, recon in decodes.items():
                _add_scores(out, prefix, recon.float().clamp(-1, 1), x, autocast, lpips_net)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher.decode(mean.float()).sample.float().clamp(-1, 1)
                _add_scores(out, "teacher_", decodes[""].float().clamp(-1, 1), target, autocast, lpips_net)
            n += x.shape[0]
        return {k: v / n for k, v in out.items()}
    finally:
        model.train(was_training)


@torch.no_grad()
def _add_scores(out: dict, prefix: str, recon: torch.Tensor, x: torch.Tensor, autocast, lpips_net) -> None:
    """Add the batch's summed MSE / PSNR (/ LPIPS) of ``recon`` against ``x`` to ``out`` under ``prefix``."""
    for key, value in (("mse", float(torch.nn.functional.mse_loss(recon, x, reduction="sum")) / x[0].numel()),
                       ("psnr", float(psnr(recon, x).sum()))):
        out[prefix + key] = out.get(prefix + key, 0.0) + value
    if lpips_net is not None:
        with autocast:
            out[prefix + "lpips"] = out.get(prefix + "lpips", 0.0) + float(lpips_per_image(lpips_net, recon, x).float().sum())
