"""Metrics against independent implementations (scikit-image, numpy, scipy) on real photos,
and tiled reconstruction / seam measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.ndimage import gaussian_filter
from skimage import color, data
from skimage import metrics as skm

from training import metrics as M
from training import tiling as T
from training.errors import VAEFTError

from conftest import tiny_diffusers_vae

SIZE = 96


def _photo(name: str) -> np.ndarray:
    """(SIZE, SIZE, 3) float64 in [0, 1], a crop of a real photo."""
    arr = getattr(data, name)()[..., :3]
    h, w = arr.shape[:2]
    step = max(1, min(h, w) // (2 * SIZE))  # downsample big images (retina) by striding
    arr = arr[::step, ::step]
    h, w = arr.shape[:2]
    y, x = (h - SIZE) // 2, (w - SIZE) // 2
    return arr[y:y + SIZE, x:x + SIZE].astype(np.float64) / 255.0


def _degrade(img: np.ndarray, seed: int) -> np.ndarray:
    """A plausible 'reconstruction': blur + noise + colour cast, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    out = gaussian_filter(img, (1.0, 1.0, 0)) + rng.normal(0, 0.02, img.shape) + np.array([0.03, -0.015, 0.01])
    return np.clip(out, 0, 1)


def _t(a: np.ndarray) -> torch.Tensor:
    """HWC [0, 1] numpy -> (1, 3, H, W) [-1, 1] float64."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None] * 2 - 1


@pytest.fixture(scope="module")
def pairs():
    names = ("retina", "astronaut", "coffee", "chelsea")
    originals = [_photo(n) for n in names]
    recons = [_degrade(o, i) for i, o in enumerate(originals)]
    return originals, recons


def test_psnr_matches_skimage(pairs):
    originals, recons = pairs
    got = M.psnr(torch.cat([_t(r) for r in recons]).float(), torch.cat([_t(o) for o in originals]).float())
    assert got.shape == (4,) and got.dtype == torch.float32
    for i, (o, r) in enumerate(zip(originals, recons)):
        ref = skm.peak_signal_noise_ratio(o, r, data_range=1.0)
        assert abs(got[i].item() - ref) < 0.01, (i, got[i].item(), ref)
    same = M.psnr(_t(originals[0]), _t(originals[0]))
    assert same.item() == pytest.approx(M.PSNR_MAX_DB)


def test_ssim_matches_skimage(pairs):
    # kornia's "valid" SSIM map is exactly the region skimage averages (it drops
    # (win-1)/2 = 5 px at each border), so no border-padding tolerance is needed:
    # the only differences are float64 rounding.
    originals, recons = pairs
    got = M.ssim(torch.cat([_t(r) for r in recons]), torch.cat([_t(o) for o in originals]))
    for i, (o, r) in enumerate(zip(originals, recons)):
        ref = skm.structural_similarity(o, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1.0, channel_axis=2)
        assert abs(got[i].item() - ref) < 1e-5, (i, got[i].item(), ref)
    # float32 input: still well inside 1e-3
    ref0 = skm.structural_similarity(originals[0], recons[0], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0, channel_axis=2)
    assert abs(M.ssim(_t(recons[0]).float(), _t(originals[0]).float()).item() - ref0) < 1e-4


def test_ciede2000_formula_matches_skimage():
    # Same Lab values into both implementations: tests the formula alone, including
    # hue wrap-around at 0/360 degrees and achromatic (a = b = 0) pixels.
    rng = np.random.default_rng(1)
    n = 4000
    lab1 = np.stack([rng.uniform(0, 100, n), rng.uniform(-100, 100, n), rng.uniform(-100, 100, n)], -1)
    lab2 = lab1 + rng.normal(0, 8, lab1.shape)
    lab1[:50, 1:] = 0                                      # achromatic
    lab2[50:100, 1:] = 0
    lab1[100:150, 2], lab2[100:150, 2] = 1e-3, -1e-3       # hues straddling 0
    lab1[100:150, 1], lab2[100:150, 1] = 20, 25
    ref = color.deltaE_ciede2000(lab1, lab2)
    to_t = lambda a: torch.from_numpy(a.T.copy()).reshape(3, 1, n)  # noqa: E731
    got = M.ciede2000(to_t(lab1), to_t(lab2)).reshape(n).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-9, rtol=0)
    # Sharma et al. (2005) test pair 1: ΔE00 = 2.0425
    pair = M.ciede2000(torch.tensor([50.0, 2.6772, -79.7751]).double().reshape(3, 1, 1),
                       torch.tensor([50.0, 0.0, -82.7485]).double().reshape(3, 1, 1))
    assert pair.item() == pytest.approx(2.0425, abs=1e-4)


def test_delta_e2000_on_photos_matches_skimage(pairs):
    originals, recons = pairs
    got = M.delta_e2000(torch.cat([_t(r) for r in recons]), torch.cat([_t(o) for o in originals]))
    for i, (o, r) in enumerate(zip(originals, recons)):
        ref = color.deltaE_ciede2000(color.rgb2lab(r), color.rgb2lab(o)).mean()
        assert abs(got[i].item() - ref) < 1e-3, (i, got[i].item(), ref)
        assert ref > 1  # the degradation is visible, so this is a real comparison


def test_channel_shift_matches_numpy(pairs):
    originals, recons = pairs
    got = M.channel_shift(torch.cat([_t(r) for r in recons]).float(), torch.cat([_t(o) for o in originals]).float())
    assert got.shape == (4, 3)
    for i, (o, r) in enumerate(zip(originals, recons)):
        ref = (r - o).mean((0, 1)) * 255
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-3)
    assert got[:, 0].min() > 0 and got[:, 1].max() < 0  # the red cast / green loss we added


def test_metrics_clip_out_of_range_and_reject_bad_shapes():
    x = torch.zeros(1, 3, 16, 16)
    assert M.psnr(x + 5, torch.ones_like(x)).item() == pytest.approx(M.PSNR_MAX_DB)
    with pytest.raises(VAEFTError):
        M.psnr(x, torch.zeros(1, 3, 16, 8))
    with pytest.raises(VAEFTError):
        M.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_summarize():
    s = M.summarize(torch.tensor([1.0, 2.0, 3.0]))
    assert s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert M.summarize(torch.tensor([4.0])) == {"mean": 4.0, "std": 0.0}


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    b = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 1.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(S1 S2)) = tr(sqrt(S1^½ S2 S1^½)), the symmetric form
    r1 = linalg.sqrtm(s1)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(r1 @ s2 @ r1)))
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-6)
    # fewer samples than dimensions (rFID over patches: N = 64, D = 2048): rank-deficient covariances
    c, e = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 2 + 0.3
    s1, s2 = np.cov(c, rowvar=False), np.cov(e, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    ref = ((c.mean(0) - e.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(torch.from_numpy(c), torch.from_numpy(e)) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance(torch.from_numpy(c), torch.from_numpy(c)) == pytest.approx(0, abs=1e-9)


def test_rfid_unavailable_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, info = M.load_inception()
    assert model is None and info["available"] is False and "never downloaded" in info["reason"]
    model, info = M.load_inception(str(tmp_path / "nope.pth"))
    assert model is None and "does not exist" in info["reason"]


def test_lpips_distance_shape(pairs):
    torch.manual_seed(0)
    lpips_random, info = M.try_load_lpips("alex", random_backbone=True)
    assert info["available"] is True and "not perceptual" in info["note"]
    originals, recons = pairs
    d = M.lpips_distance(lpips_random, _t(recons[0]).float(), _t(originals[0]).float())
    assert d.shape == (1,) and d.item() > 0
    assert M.lpips_distance(lpips_random, _t(originals[0]).float(), _t(originals[0]).float()).item() == \
        pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- tiling

class _Dist:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class _Out:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class PointwiseVAE:
    """Stand-in whose decode(encode(x)) is a pointwise function: tiling must not change it."""

    def encode(self, x):
        return _Out(latent_dist=_Dist(torch.tanh(1.3 * x)))

    def decode(self, z):
        return _Out(sample=0.9 * z + 0.05 * z ** 2)


def test_tile_layout():
    assert T.tile_starts(100, 128, 16) == [0]
    assert T.tile_starts(128, 128, 16) == [0]
    assert T.tile_starts(300, 128, 32) == [0, 96, 172]
    assert T.tile_boundaries(300, 128, 32) == [96, 128, 172, 224]
    for size in (129, 300, 1000, 2048):
        starts = T.tile_starts(size, 128, 32)
        assert starts[-1] + 128 == size
        assert all(b - a <= 128 - 32 for a, b in zip(starts, starts[1:]))
    with pytest.raises(VAEFTError):
        T.reconstruct_tiled(PointwiseVAE(), torch.zeros(1, 3, 64, 64), tile=100, overlap=8)
    with pytest.raises(VAEFTError):
        T.reconstruct_tiled(PointwiseVAE(), torch.zeros(1, 3, 64, 64), tile=64, overlap=64)


@pytest.mark.parametrize("h,w,tile,overlap", [(200, 333, 64, 16), (37, 90, 32, 8), (130, 130, 64, 0),
                                                (50, 45, 64, 16)])
def test_tiled_equals_untiled_for_pointwise_model(h, w, tile, overlap):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    m = PointwiseVAE()
    full = m.decode(m.encode(img).latent_dist.mode()).sample
    tiled = T.reconstruct_tiled(m, img, tile=tile, overlap=overlap)
    assert tiled.shape == img.shape
    torch.testing.assert_close(tiled, full, atol=1e-6, rtol=0)


def test_tiled_real_vae_shape_and_finite():
    torch.manual_seed(0)
    model = tiny_diffusers_vae().eval()
    img = torch.from_numpy(_photo("coffee")[:75, :90]).permute(2, 0, 1)[None].float() * 2 - 1
    out = T.reconstruct_tiled(model, img, tile=48, overlap=16)
    assert out.shape == img.shape and torch.isfinite(out).all()
    # a single tile that covers the image equals the padded, cropped plain reconstruction
    small = img[:, :, :40, :40]
    with torch.no_grad():
        plain = model.decode(model.encode(small).latent_dist.mode()).sample
    torch.testing.assert_close(T.reconstruct_tiled(model, small, tile=48, overlap=16), plain, atol=1e-5, rtol=0)


def test_seam_error_detects_border_errors():
    g = torch.Generator().manual_seed(0)
    orig = torch.rand(1, 3, 300, 260, generator=g) * 2 - 1
    recon = orig + 0.01 * torch.randn(orig.shape, generator=g)
    base = T.seam_error(orig, recon, tile=128, overlap=32, band=3)
    assert 0.8 < base["ratio"] < 1.25  # uniform error: no seams
    seams = recon.clone()
    for e in T.tile_boundaries(300, 128, 32):
        seams[:, :, e - 1:e + 1, :] += 0.2
    for e in T.tile_boundaries(260, 128, 32):
        seams[:, :, :, e - 1:e + 1] -= 0.2
    bad = T.seam_error(orig, seams, tile=128, overlap=32, band=3)
    assert bad["ratio"] > 3 and bad["seam_mae"] > base["seam_mae"]
    assert bad["interior_mae"] == pytest.approx(base["interior_mae"])
    assert bad["seam_pixels"] + bad["interior_pixels"] == 300 * 260
    one_tile = T.seam_error(orig[:, :, :64, :64], recon[:, :, :64, :64], tile=128, overlap=32)
    assert one_tile["seam_pixels"] == 0 and one_tile["ratio"] is None
