"""Augmentation (training/augment.py): seeded per (seed, step, rank), host-side parameters, exact
functions, and no host-device synchronisation on the training step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_ldm_sd
from training.augment import AugmentParams, augment, augmenter, color_jitter, dihedral, sample_params
from training.config import TrainConfig
from training.config import DataConfig
from training.errors import VAEFTError


def batch(n=8, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_augment_is_seeded_and_keeps_range():
    x = batch()
    before = x.clone()
    cfg = DataConfig(patch_size=32, color_jitter=0.1)
    a = augment(x, cfg, 1)
    assert torch.equal(a, augment(x, cfg, 1))
    assert not torch.equal(a, augment(x, cfg, 2))
    assert torch.equal(x, before)                        # the input is left as it was
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    geo = augment(x, DataConfig(patch_size=32), 3)
    for i in range(8):  # flips/rotations only: each output is a dihedral transform of its input
        variants = [torch.rot90(v, k, dims=(-2, -1)) for v in (x[i], x[i].flip(-1)) for k in range(4)]
        assert any(torch.equal(geo[i], v) for v in variants)
    assert not torch.equal(geo, x)
    off = DataConfig(patch_size=32, flip=False, rotate90=False)
    assert augment(x, off, 0) is x and augmenter(off) is None
    hook = augmenter(cfg)
    assert torch.equal(hook(x, 1), a)
    with pytest.raises(VAEFTError, match=r"expects \(B, 3, H, W\)"):
        augment(x[:, :2], cfg, 0)
    for bad in (-1, 1.5, None):
        with pytest.raises(VAEFTError, match="seed must be a whole number"):
            augment(x, cfg, bad)


def test_sample_params_follow_the_settings():
    cfg = DataConfig(patch_size=32, color_jitter=0.2)
    p = sample_params(4000, 32, 32, cfg, 7)
    q = sample_params(4000, 32, 32, cfg, 7)
    assert all(np.array_equal(getattr(p, k), getattr(q, k)) for k in ("hflip", "vflip", "rot90", "jitter"))
    assert 0.45 < p.hflip.mean() < 0.55 and 0.45 < p.vflip.mean() < 0.55
    assert sorted(np.unique(p.rot90)) == [0, 1, 2, 3]
    assert p.jitter.shape == (4000, 3) and p.jitter.min() >= 0.8 and p.jitter.max() <= 1.2
    assert p.jitter.min() < 0.81 and p.jitter.max() > 1.19
    # a fixed count of draws: switching jitter or rotation off leaves the flips where they were
    r = sample_params(4000, 32, 32, DataConfig(patch_size=32, rotate90=False), 7)
    assert np.array_equal(r.hflip, p.hflip) and not r.rot90.any() and r.jitter is None
    assert not sample_params(64, 32, 32, DataConfig(patch_size=32, flip=False), 7).hflip.any()
    assert set(np.unique(sample_params(4000, 32, 48, cfg, 7).rot90)) == {0, 2}   # non-square: 180° only
    assert np.array_equal(p.codes, p.hflip + 2 * p.vflip.astype(int) + 4 * p.rot90)


def test_dihedral_matches_each_samples_transform():
    x = batch(8)
    hf = np.array([0, 1, 0, 1, 0, 1, 0, 1], bool)
    vf = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    k = np.array([0, 0, 0, 0, 1, 2, 3, 3])
    out = dihedral(x, hf, vf, k)
    for i in range(8):
        want = x[i]
        if hf[i]:
            want = want.flip(-1)
        if vf[i]:
            want = want.flip(-2)
        assert torch.equal(out[i], torch.rot90(want, int(k[i]), dims=(-2, -1))), i
    rect = batch(2, 32)[..., :16]
    assert torch.equal(dihedral(rect, np.zeros(2, bool), np.zeros(2, bool), np.array([2, 0]))[0],
                       rect[0].flip(-1).flip(-2))
    with pytest.raises(VAEFTError, match="non-square"):
        dihedral(rect, np.zeros(2, bool), np.zeros(2, bool), np.array([1, 0]))


def test_color_jitter_factors():
    x = batch(3)
    assert torch.equal(color_jitter(x, np.ones((3, 3), np.float32)), x)   # factors of 1: unchanged
    black = torch.full((1, 3, 8, 8), -1.0)
    assert torch.equal(color_jitter(black, np.array([[0.7, 1.2, 1.1]], np.float32)), black)  # stays black
    flat = color_jitter(x, np.array([[1, 0, 1]] * 3, np.float32))           # no contrast: one grey each
    assert float((flat - flat.mean(dim=(1, 2, 3), keepdim=True)).abs().max()) < 1e-6
    grey = color_jitter(x, np.array([[1, 1, 0]] * 3, np.float32))           # no saturation: R = G = B
    assert float((grey - grey[:, :1]).abs().max()) < 1e-6
    bright = color_jitter(x, np.array([[1.5, 1, 1]] * 3, np.float32))
    assert bright.max() <= 1 and (bright + 1).mean() > (x + 1).mean()
    with pytest.raises(VAEFTError, match=r"factors must be \(3, 3\)"):
        color_jitter(x, np.ones((2, 3), np.float32))


class _DeviceTraffic(TorchDispatchMode):
    """Host reads of tensor values, and host -> device copies with their non_blocking flag."""

    def __init__(self):
        super().__init__()
        self.reads, self.copies = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)} | (
                {kwargs["device"].type} if kwargs.get("device") is not None else set())
            if len(devices) > 1:
                self.copies.append(bool(kwargs.get("non_blocking") or (len(args) > 2 and args[2])))
        return func(*args, **kwargs)


def test_augment_on_a_device_reads_nothing_back_and_copies_without_waiting():
    """On the 'meta' device (no data, any machine) as on a GPU: the transforms are decided on the host,
    and the small index/factor arrays go to the device by non-blocking copies only."""
    cfg = DataConfig(patch_size=32, color_jitter=0.1)
    x = torch.empty(8, 3, 32, 32, device="meta")
    augment(x, cfg, 0)  # imports kornia outside the recording
    traffic = _DeviceTraffic()
    with traffic:
        y = augment(x, cfg, 5)
    assert y.device.type == "meta" and y.shape == x.shape
    assert traffic.reads == 0
    assert traffic.copies == [True, True], traffic.copies   # transform order, jitter factors


def test_the_trainer_applies_augmentation_and_it_follows_the_seed(lpips_random):
    """The augmentation is applied (it changes the result) and follows the run's seed (an augmented
    run resumes exactly: test_trainer's library resume test)."""
    from training.trainer import fine_tune
    from training.vae import build_vae

    vae = build_vae(tiny_ldm_sd())
    data = [batch(4, 32, seed=i) for i in range(6)]
    aug = augmenter(DataConfig(patch_size=32, color_jitter=0.2))

    def batches(start):
        return iter(data[start:])

    c = TrainConfig(steps=6, lr=1e-3, batch_size=4, lpips_weight=0.1, ema=True, log_every=1, preview_every=0)

    def run(cfg, **kw):
        return fine_tune(vae, batches, cfg, device="cpu", lpips_net=lpips_random, augment=aug, **kw)

    a = run(c).model.state_dict()  # resuming an augmented run: test_trainer's library resume test
    plain = fine_tune(vae, batches, c, device="cpu", lpips_net=lpips_random).model.state_dict()
    other = run(c.replace(seed=1)).model.state_dict()
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_params_dataclass_codes():
    p = AugmentParams(hflip=np.array([True, False]), vflip=np.array([True, True]), rot90=np.array([3, 0]))
    assert p.codes.tolist() == [15, 2] and p.jitter is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_augment_on_cuda_is_sync_free_and_matches_the_cpu():
    cfg = DataConfig(patch_size=64, color_jitter=0.1)
    x = batch(16, 64)
    want = augment(x, cfg, 11)
    xc = x.cuda()
    augment(xc, cfg, 0)  # warm-up: kornia import, pinned-memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")   # any synchronising call raises
    try:
        got = augment(xc, cfg, 11)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float((got.cpu() - want).abs().max()) < 1e-5   # same seed, same augmentation on any device


@cuda
def test_trainer_steps_between_log_lines_do_not_synchronise_on_cuda(lpips_random):
    """The whole training step with augmentation on, on a GPU: steps 2 and 5 of 6 (log_every 3) run
    under CUDA's sync debug mode set to raise on any host-device synchronisation."""
    from training.trainer import Callbacks, fine_tune
    from training.vae import build_vae

    vae = build_vae(tiny_ldm_sd())
    x = batch(4, 64).pin_memory()

    def on_step(step, total, losses):
        torch.cuda.set_sync_debug_mode("error" if step in (1, 4) else "default")

    c = TrainConfig(steps=6, lr=1e-4, batch_size=4, lpips_weight=0.1, ema=True, log_every=3, preview_every=0)
    try:
        res = fine_tune(vae, itertools.repeat(x), c, device="cuda", lpips_net=lpips_random,
                        augment=augmenter(DataConfig(patch_size=64, color_jitter=0.1)),
                        callbacks=Callbacks(on_step=on_step))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.steps_done == 6
