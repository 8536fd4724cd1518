"""The fused GroupNorm(+SiLU) Triton kernels, checked on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set in a subprocess because Triton reads it when kernels are defined), and on
CUDA in bf16 when a GPU is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from training import fused_blocks, fused_norm
from training.fused_norm import supported

from conftest import ROOT, tiny_diffusers_vae

needs_triton = pytest.mark.skipif(not fused_norm.triton_available(),
                                  reason="Triton is not installed (pip install triton; Linux x86-64 wheels only)")
# The interpreter's behaviour differs between Triton releases (checked with Triton 3.8 and 3.9, the
# CI's); on a GPU the compiled kernels themselves are checked instead (test_bf16_kernels_on_cuda and below).
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: the compiled kernels are tested")


def _interpreted(code: str) -> dict:
    path = [ROOT, os.path.join(ROOT, "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_supported_shapes():
    assert supported(128, 32) and supported(512, 32) and supported(32, 32) and supported(64, 8)
    assert not supported(96, 32)      # 3 channels per group
    assert not supported(384, 32)     # not a power of two
    assert not supported(100, 10)


@needs_triton
def test_launch_grids_fit_cuda_limits_at_large_patches():
    """CUDA allows 65535 programs on a grid's second and third axes. At 1024² patches the decoder's last
    up-block normalises 256 channels over 2^20 pixels: 65536 tiles of 16 rows, which once sat on the
    second axis ("Triton Error [CUDA]: invalid argument" on an H200, 2026-11-27)."""
    from training.fused_norm import _geometry, _tile_grid

    for shape in [(1, 256, 1024, 1024), (16, 128, 1024, 1024), (1, 256, 4096, 4096), (64, 512, 64, 64)]:
        x = torch.empty(shape, device="meta")
        n, c, s, block, rows, nchunk = _geometry(x)
        tiles, samples = _tile_grid(n, s, block)
        assert tiles * block >= s and samples == n and samples <= 65535 and tiles < 2**31, shape
        assert nchunk <= 65535 and nchunk * rows >= s, shape     # the reduction kernels' grid: (n, nchunk)


OP_CHECK = """
    import itertools, json, torch
    from test_fused_norm import reference
    from training import fused_norm
    from training.fused_norm import group_norm_act
    torch.manual_seed(0)
    out = []
    # (shape, groups, act, offset): several tiles per sample with a partial last one (S = 221, 400),
    # a 3-D (N, C, L) input, one channel per group, and a large mean (a naive sum of squares in
    # fp32 would lose the variance to cancellation). Each with the default geometry (one tile per
    # reduction program at these sizes), then with few programs: each loops over several tiles,
    # the last chunk and its last tile partial.
    cases = [((2, 64, 13, 17), 32, True, 0.0), ((3, 128, 20, 20), 32, False, 0.0), ((2, 32, 37), 8, True, 0.0),
             ((1, 32, 16, 16), 32, True, 0.0), ((2, 32, 11, 23), 16, True, 1000.0)]
    for (shape, g, act, offset), programs in itertools.product(cases, (1024, 2, 7)):
        fused_norm.PROGRAMS = programs
        x = (torch.randn(*shape, dtype=torch.float64) * 2 + offset).float().double()  # exactly representable
        w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
        gy = torch.randn(*shape, dtype=torch.float64)
        ref = reference(x, w, b, g, act, gy)
        xf = x.float()
        if xf.ndim == 4:
            xf = xf.contiguous(memory_format=torch.channels_last)
        xf, wf, bf = (t.float().requires_grad_() for t in (xf, w, b))
        y = group_norm_act(xf, wf, bf, g, 1e-6, act)
        y.backward(gy.float())
        rel = lambda a, r: float((a.detach().double() - r).norm() / r.norm())
        out.append({"shape": list(shape), "programs": programs, "offset": offset, "y": rel(y, ref[0]), "dx": rel(xf.grad, ref[1]),
                    "dw": rel(wf.grad, ref[2]), "db": rel(bf.grad, ref[3]),
                    "channels_last_out": y.movedim(1, -1).is_contiguous(), "dtype": str(y.dtype)})
    print(json.dumps(out))
"""


def reference(x, w, b, groups, act, gy):
    """float64 GroupNorm (+ SiLU) and its gradients."""
    x, w, b = (t.detach().double().clone().requires_grad_() for t in (x, w, b))
    y = torch.nn.functional.group_norm(x, groups, w, b, 1e-6)
    if act:
        y = torch.nn.functional.silu(y)
    y.backward(gy.double())
    return y.detach(), x.grad, w.grad, b.grad


@needs_triton
@interpreter
def test_kernels_match_float64_reference_interpreted():
    for r in _interpreted(OP_CHECK):
        # fp32 kernels vs float64. With a mean of 1000 the fp32 input itself limits the result
        # (PyTorch's own fp32 group_norm: 1.0e-5 there); E[x²] - mean² in fp32 would be off by ~1e-2.
        tol = 1e-4 if r["offset"] else 1e-5
        for k in ("y", "dx", "dw", "db"):
            assert r[k] < tol, r
        assert r["channels_last_out"] and r["dtype"] == "torch.float32", r


MODEL_CHECK = """
    import json, torch
    from conftest import tiny_diffusers_vae
    from training.fused_blocks import fuse_vae_blocks
    from training.fused_norm import FusedGroupNorm
    vae = tiny_diffusers_vae().float()
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def run():
        vae.zero_grad(set_to_none=True)
        y = vae(x.contiguous(memory_format=torch.channels_last), sample_posterior=False).sample
        y.square().mean().backward()
        return y.detach().clone(), [p.grad.clone() for p in vae.parameters()]

    keys = list(vae.state_dict())
    types = [type(m).__name__ for m in vae.modules()]
    y0, g0 = run()
    count, undo = fuse_vae_blocks(vae)
    resnets = sum(type(m).__name__ == "FusedResnetBlock2D" for m in vae.modules())
    fused_types = sorted({type(m).__name__ for m in vae.modules() if type(m).__name__.startswith("Fused")})
    y1, g1 = run()
    same_keys = list(vae.state_dict()) == keys
    undo()
    y2, _ = run()
    rel = lambda a, r: float((a - r).norm() / r.norm())
    flat = lambda gs: torch.cat([t.flatten() for t in gs])
    # per tensor where the gradient is not ~0 (a conv bias right before a GroupNorm has a true
    # gradient of exactly 0; both sides give rounding noise there), and over all of them
    big = [rel(a, b) for a, b in zip(g1, g0) if b.norm() > 1e-3 * flat(g0).norm() / len(g0) ** 0.5]
    print(json.dumps({"count": count, "fused_types": fused_types, "y": rel(y1, y0),
                      "grad": max(big), "grad_all": rel(flat(g1), flat(g0)), "tensors": len(big), "resnets": resnets,
                      "same_keys": same_keys,
                      "restored": [type(m).__name__ for m in vae.modules()] == types, "after_undo": rel(y2, y0)}))
"""


@needs_triton
@interpreter
def test_fused_model_matches_unfused_interpreted():
    vae = tiny_diffusers_vae()
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
    r = _interpreted(MODEL_CHECK)
    assert r["count"] == norms                      # every GroupNorm of the tiny VAE is fusable
    assert r["fused_types"] == ["FusedGroupNorm", "FusedGroupNormSiLU", "FusedResnetBlock2D", "FusedUpsample2D"]
    assert r["resnets"] == sum(type(m).__name__ == "ResnetBlock2D" for m in vae.modules())
    assert r["y"] < 1e-5 and r["grad"] < 1e-4 and r["grad_all"] < 1e-5, r   # same function and gradients
    assert r["tensors"] > 50, r
    assert r["same_keys"] and r["restored"] and r["after_undo"] == 0.0, r


def test_nearest_upsample_splits_the_batch_past_32_bit_indexing(monkeypatch):
    """PyTorch's CUDA nearest-upsample refuses tensors of INT_MAX elements or more (1024² patches at
    micro-batch 8 on an H200, 2026-11-27): the batch is upsampled in slices under the limit, with the
    same values and gradients as one call."""
    from training.fused_blocks import _interpolate_nearest

    x = torch.randn(5, 4, 3, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    want = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    g = torch.randn_like(want)
    (gx_want,) = torch.autograd.grad(want, x, g)
    per_sample = 4 * 6 * 12
    interpolate, sizes = torch.nn.functional.interpolate, []

    def spy(t, *a, **k):
        out = interpolate(t, *a, **k)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    for limit, calls in ((2**31 - 1, 1), (5 * per_sample + 1, 1), (2 * per_sample + 1, 3), (per_sample + 1, 5), (10, 5)):
        sizes.clear()
        got = _interpolate_nearest(x, limit=limit)
        (gx,) = torch.autograd.grad(got, x, g)
        assert torch.equal(got, want) and torch.equal(gx, gx_want), limit
        assert len(sizes) == calls and (max(sizes) < limit or calls == 5), (limit, sizes)
    sized = _interpolate_nearest(x, output_size=(9, 12), limit=2 * 4 * 9 * 12 + 1)
    assert torch.equal(sized, torch.nn.functional.interpolate(x, size=(9, 12), mode="nearest"))


def test_unsupported_norms_are_left_alone():
    vae = tiny_diffusers_vae()
    odd = torch.nn.GroupNorm(3, 96)
    vae.decoder.conv_norm_out = odd
    count, undo = fused_blocks.fuse_vae_blocks(vae)
    assert type(vae.decoder.conv_norm_out) is torch.nn.GroupNorm
    assert isinstance(vae.decoder.conv_act, torch.nn.SiLU)   # its SiLU stays too
    undo()
    assert all(type(m) is torch.nn.GroupNorm for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@needs_triton
@pytest.mark.parametrize("shape,act", [((8, 128, 64, 64), True), ((4, 512, 33, 31), True), ((2, 256, 4096), False),
                                       ((1, 256, 1024, 1024), True)])   # 65536 tiles: past a 2nd grid axis
def test_bf16_kernels_on_cuda(shape, act):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, device="cuda") * 3 + 1
    w = torch.randn(shape[1], dtype=torch.float64, device="cuda")
    b = torch.randn(shape[1], dtype=torch.float64, device="cuda")
    gy = torch.randn(*shape, dtype=torch.float64, device="cuda")
    ref = reference(x, w, b, 32, act, gy)
    xb = x.to(torch.bfloat16)
    if xb.ndim == 4:
        xb = xb.contiguous(memory_format=torch.channels_last)
    xb.requires_grad_()
    wf, bf = w.float().requires_grad_(), b.float().requires_grad_()
    y = fused_norm.group_norm_act(xb, wf, bf, 32, 1e-6, act)
    y.backward(gy.to(torch.bfloat16))
    for got, want in zip((y, xb.grad, wf.grad, bf.grad), ref):
        assert torch.isfinite(got).all()
        assert float((got.double() - want).norm() / want.norm()) < 1.5e-2   # bf16 inputs and outputs
    assert y.dtype == torch.bfloat16 and wf.grad.dtype == torch.float32


@cuda
@needs_triton
def test_trainer_on_cuda_uses_fused_norms_and_trains_the_same(lpips_random):
    import itertools

    from conftest import tiny_ldm_sd
    from training.config import TrainConfig
    from training.trainer import fine_tune
    from training.vae import build_vae

    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = {}
    for fused in (True, False):
        cfg = TrainConfig(steps=20, lr=1e-3, batch_size=4, ema=False, log_every=1, preview_every=0,
                          posterior="mode", fused_norm=fused)
        runs[fused] = fine_tune(vae, itertools.repeat(x), cfg, device="cuda", lpips_net=lpips_random)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.model.modules())
    assert runs[True].fused_norms == norms and runs[False].fused_norms == 0
    # the returned model is plain again: stock GroupNorm/SiLU modules, contiguous weights
    assert all(type(m) is torch.nn.GroupNorm for m in runs[True].model.modules() if isinstance(m, torch.nn.GroupNorm))
    a = [h["total"] for h in runs[True].history]
    b = [h["total"] for h in runs[False].history]
    assert a[-1] < 0.7 * a[0]                                   # it learns
    assert abs(a[0] - b[0]) < 0.02 * b[0]                       # same first loss (bf16 rounding apart)
    assert abs(a[-1] - b[-1]) < 0.1 * b[-1]                     # and the same course
