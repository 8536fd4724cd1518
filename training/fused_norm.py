"""GroupNorm (+ SiLU) as fused Triton kernels on channels-last tensors.

Why: in the kl-f8 VAE every convolution is wrapped in GroupNorm and SiLU. PyTorch's GroupNorm
only has a channels-first (NCHW) kernel, and cuDNN's fast bf16 convolutions are channels-last
(NHWC), so an eager step either transposes around every convolution (cuDNN does it inside:
measured 63 ms of a 379 ms step on an H100 at 512², batch 8) or copies around every GroupNorm
(worse). These kernels normalise channels-last tensors in place of PyTorch's, so the whole model
can stay channels-last, and they fold the SiLU that follows each GroupNorm into the same pass:

    forward   2 reads + 1 write  (per-block statistics, then normalise + affine + SiLU)
    backward  4 reads + 1 write  (per-block sums of the incoming gradient, then dx)

Statistics are accumulated in fp32 (per-block mean and M2, combined with Chan's formula, so a
large mean does not cancel the variance); inputs and outputs keep their dtype (bf16 under the
trainer's autocast), weights stay fp32 masters and get fp32 gradients.

Without Triton (or with ``fused_norm`` off) the trainer uses ``AutocastGroupNorm`` instead: PyTorch's
GroupNorm, kept in bf16 under autocast. :mod:`training.fused_blocks` swaps either into the
trainer's private copy of the model (and back before it is returned).

The op is registered as ``vaeft::group_norm_act`` (torch.library custom op with its own
backward), so torch.compile treats it as one opaque node instead of breaking the graph.

Where it applies: channel counts that are powers of two with power-of-two channels per group
(every SD/SDXL/SD3/Flux VAE: 128/256/512 channels, 32 groups), on CUDA with Triton; other
GroupNorms are left as they are.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only builds and some platforms lack it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = tl = None

TILE = 4096       # elements per tile: BLOCK_S rows of C channels
PROGRAMS = 1024   # reduction programs to aim for (fills an H100's 132 SMs several times)


def triton_available() -> bool:
    return triton is not None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(num_channels: int, num_groups: int) -> bool:
    return (_pow2(num_channels) and num_channels % num_groups == 0 and _pow2(num_channels // num_groups)
            and num_channels <= 2048)


if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, shift_ptr, s1_ptr, s2_ptr, S, ROWS, NCHUNK,
                      C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Per (sample, chunk of ROWS rows), per channel: sum of (x - K) and of (x - K)² where K is
        the mean of the chunk's first BLOCK_S rows (a shift near the mean keeps the sum of squares
        free of cancellation). Accumulates in registers; one reduction at the end."""
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, C)
        base = n.to(tl.int64) * S * C
        first = chunk * ROWS
        rows = first + tl.arange(0, BLOCK_S)
        valid = rows[:, None] < S
        x = tl.load(x_ptr + base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=valid, other=0.0)
        shift = tl.sum(x.to(tl.float32), axis=0) / tl.minimum(S - first, BLOCK_S).to(tl.float32)
        acc1 = tl.zeros((BLOCK_S, C), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_S, C), dtype=tl.float32)
        for r in range(0, ROWS, BLOCK_S):
            rows = first + r + tl.arange(0, BLOCK_S)
            valid = rows[:, None] < S
            x = tl.load(x_ptr + base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=valid, other=0.0)
            d = tl.where(valid, x.to(tl.float32) - shift[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        out = (n * NCHUNK + chunk) * C + cols
        tl.store(shift_ptr + out, shift)
        tl.store(s1_ptr + out, tl.sum(acc1, axis=0))
        tl.store(s2_ptr + out, tl.sum(acc2, axis=0))

    @triton.jit
    def _tile(S, C: tl.constexpr, BLOCK_S: tl.constexpr):
        """This program's sample, channel indices, element offsets and row mask: tile
        program_id(0) of BLOCK_S rows of sample program_id(1) in an (N, S, C) tensor (see _tile_grid)."""
        n = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, C)
        offs = n.to(tl.int64) * S * C + rows[:, None].to(tl.int64) * C + cols[None, :]
        return n, cols, offs, rows[:, None] < S

    @triton.jit
    def _apply_kernel(x_ptr, y_ptr, mean_ptr, a_ptr, beta_ptr, S,
                      C: tl.constexpr, BLOCK_S: tl.constexpr, ACT: tl.constexpr):
        """y = act((x - mean[n, c]) * a[n, c] + beta[c]); centred first, so a large mean does not
        cancel digits."""
        n, cols, offs, valid = _tile(S, C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + n * C + cols)
        a = tl.load(a_ptr + n * C + cols)
        beta = tl.load(beta_ptr + cols)
        u = (x - mean[None, :]) * a[None, :] + beta[None, :]
        if ACT:
            u = u * tl.sigmoid(u)
        tl.store(y_ptr + offs, u.to(y_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _grad_at_norm(x, dy, mean, a, beta, ACT: tl.constexpr):
        """Gradient at the GroupNorm's output (through SiLU when ACT)."""
        if ACT:
            u = (x - mean[None, :]) * a[None, :] + beta[None, :]
            s = tl.sigmoid(u)
            return dy * s * (1.0 + u * (1.0 - s))
        return dy

    @triton.jit
    def _bwd_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, a_ptr, beta_ptr, sg_ptr, sgx_ptr, S, ROWS, NCHUNK,
                         C: tl.constexpr, BLOCK_S: tl.constexpr, ACT: tl.constexpr):
        """Per (sample, chunk of ROWS rows), per channel: sum of g and of g * xhat."""
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, C)
        base = n.to(tl.int64) * S * C
        mean = tl.load(mean_ptr + n * C + cols)
        rstd = tl.load(rstd_ptr + n * C + cols)
        a = tl.load(a_ptr + n * C + cols)
        beta = tl.load(beta_ptr + cols)
        acc_g = tl.zeros((BLOCK_S, C), dtype=tl.float32)
        acc_gx = tl.zeros((BLOCK_S, C), dtype=tl.float32)
        for r in range(0, ROWS, BLOCK_S):
            rows = chunk * ROWS + r + tl.arange(0, BLOCK_S)
            valid = rows[:, None] < S
            offs = base + rows[:, None].to(tl.int64) * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            g = _grad_at_norm(x, dy, mean, a, beta, ACT)   # 0 where masked (dy = 0)
            acc_g += g
            acc_gx += g * ((x - mean[None, :]) * rstd[None, :])
        out = (n * NCHUNK + chunk) * C + cols
        tl.store(sg_ptr + out, tl.sum(acc_g, axis=0))
        tl.store(sgx_ptr + out, tl.sum(acc_gx, axis=0))

    @triton.jit
    def _bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, a_ptr, beta_ptr, q_ptr, r_ptr, S,
                       C: tl.constexpr, BLOCK_S: tl.constexpr, ACT: tl.constexpr):
        """dx = g * a[n, c] + (x - mean[n, c]) * q[n, c] + r[n, c]."""
        n, cols, offs, valid = _tile(S, C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + n * C + cols)
        a = tl.load(a_ptr + n * C + cols)
        beta = tl.load(beta_ptr + cols)
        g = _grad_at_norm(x, dy, mean, a, beta, ACT)
        q = tl.load(q_ptr + n * C + cols)
        r = tl.load(r_ptr + n * C + cols)
        dx = g * a[None, :] + (x - mean[None, :]) * q[None, :] + r[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, rows per tile, rows per reduction chunk, chunks per sample)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    block = max(1, min(TILE // c, triton.next_power_of_2(s)))
    # about PROGRAMS reduction programs in all, each looping over whole tiles
    tiles = triton.cdiv(s, block)
    rows = block * triton.cdiv(tiles, max(1, triton.cdiv(PROGRAMS, n)))
    return n, c, s, block, rows, triton.cdiv(s, rows)


def _tile_grid(n: int, s: int, block: int) -> tuple[int, int]:
    """Launch grid of the per-tile kernels: (tiles per sample, samples). The tile count goes on the
    grid's first axis (up to 2^31 - 1): the second allows only 65535, which 256 channels at 1024²
    (the decoder's last up-block input at 1024² patches: 2^20 rows of 16) already exceed."""
    tiles = triton.cdiv(s, block)
    if n > 65535 or tiles >= 2**31:
        raise RuntimeError(f"fused GroupNorm: {n} samples x {tiles} tiles is past the kernel's launch grid")
    return tiles, n


def _per_channel(t: torch.Tensor, groups: int, c: int) -> torch.Tensor:
    """(N, G) -> (N, C): each group's value repeated over its channels."""
    return t.repeat_interleave(c // groups, dim=1).contiguous()


def _forward_impl(x, weight, bias, groups: int, eps: float, act: bool):
    n, c, s, block, rows, nchunk = _geometry(x)
    shift = torch.empty((n, nchunk, c), device=x.device, dtype=torch.float32)
    s1, s2 = torch.empty_like(shift), torch.empty_like(shift)
    _stats_kernel[(n, nchunk)](x, shift, s1, s2, s, rows, nchunk, C=c, BLOCK_S=block)
    # per (sample, chunk, channel) count / mean / M2, combined per group with Chan's formula
    cnt = (s - torch.arange(nchunk, device=x.device) * rows).clamp(max=rows).float()[None, :, None]
    mean_k = shift + s1 / cnt
    m2_k = (s2 - s1 * s1 / cnt).clamp(min=0)
    total = float(s * (c // groups))
    mean = (mean_k * cnt).view(n, nchunk, groups, -1).sum((1, 3)) / total
    dev = (mean_k.view(n, nchunk, groups, -1) - mean[:, None, :, None]).square()
    m2 = (m2_k.view(n, nchunk, groups, -1) + cnt[..., None] * dev).sum((1, 3))
    rstd = torch.rsqrt(m2 / total + eps)
    a = _per_channel(rstd, groups, c) * weight.float()[None, :]
    y = torch.empty_like(x)
    _apply_kernel[_tile_grid(n, s, block)](x, y, _per_channel(mean, groups, c), a, bias.float().contiguous(),
                                              s, C=c, BLOCK_S=block, ACT=act)
    return y, mean, rstd


def _backward_impl(dy, x, weight, bias, mean, rstd, groups: int, act: bool):
    n, c, s, block, rows, nchunk = _geometry(x)
    dy = _channels_last_dense(dy)
    w = weight.float()
    mean_c, rstd_c = _per_channel(mean, groups, c), _per_channel(rstd, groups, c)
    a = rstd_c * w[None, :]
    beta = bias.float().contiguous()
    sg = torch.empty((n, nchunk, c), device=x.device, dtype=torch.float32)
    sgx = torch.empty_like(sg)
    _bwd_sums_kernel[(n, nchunk)](x, dy, mean_c, rstd_c, a, beta, sg, sgx, s, rows, nchunk,
                                  C=c, BLOCK_S=block, ACT=act)
    sg, sgx = sg.sum(1), sgx.sum(1)                      # (N, C)
    dbias, dweight = sg.sum(0), sgx.sum(0)
    count = float(s * (c // groups))
    m1 = (sg * w).view(n, groups, -1).sum(-1) / count    # mean over the group of d(xhat)
    m2 = (sgx * w).view(n, groups, -1).sum(-1) / count   # mean over the group of d(xhat) * xhat
    # dx = rstd * (d(xhat) - m1 - xhat * m2), with d(xhat) = g * gamma and xhat = (x - mean) * rstd
    q = _per_channel(-rstd * rstd * m2, groups, c)
    r = _per_channel(-rstd * m1, groups, c)
    dx = torch.empty_like(x)
    _bwd_dx_kernel[_tile_grid(n, s, block)](x, dy, dx, mean_c, a, beta, q, r, s, C=c, BLOCK_S=block, ACT=act)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype)


def _channels_last_dense(x: torch.Tensor) -> torch.Tensor:
    """x with memory laid out (N, *spatial, C) densely, shape unchanged."""
    if x.movedim(1, -1).is_contiguous():
        return x
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


@functools.cache
def _ops():
    """Register the custom ops once, on first use."""

    @torch.library.custom_op("vaeft::group_norm_act", mutates_args=())
    def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                       act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward_impl(x, weight, bias, groups, eps, act)

    @group_norm_act.register_fake
    def _(x, weight, bias, groups, eps, act):
        stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
        return torch.empty_like(x), stats, stats.clone()

    @torch.library.custom_op("vaeft::group_norm_act_backward", mutates_args=())
    def group_norm_act_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                mean: torch.Tensor, rstd: torch.Tensor, groups: int,
                                act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward_impl(dy, x, weight, bias, mean, rstd, groups, act)

    @group_norm_act_backward.register_fake
    def _(dy, x, weight, bias, mean, rstd, groups, act):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)

    def setup_context(ctx, inputs, output):
        x, weight, bias, groups, eps, act = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.act = groups, act

    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = group_norm_act_backward(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.act)
        return dx, dw, db, None, None, None

    group_norm_act.register_autograd(backward, setup_context=setup_context)
    return group_norm_act


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                   act: bool) -> torch.Tensor:
    """GroupNorm of ``x`` (N, C, *spatial) with fp32 statistics, then SiLU when ``act``. The
    output has x's dtype and a channels-last layout."""
    with torch.autocast(x.device.type, enabled=False):
        return _ops()(_channels_last_dense(x), weight, bias, groups, eps, act)[0]


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x cast to the autocast dtype when autocast is on for its device, else x."""
    kind = x.device.type
    return x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x


class AutocastGroupNorm(torch.nn.GroupNorm):
    """PyTorch's GroupNorm run in the autocast dtype (autocast's policy is fp32 for group_norm,
    which costs casts and memory traffic). The statistics are still accumulated in fp32 inside the
    kernel; the weights stay fp32 masters. The trainer's choice where the fused kernel is not used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        x = in_autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype),
                                                  self.bias.to(x.dtype), self.eps)


class FusedGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm (same parameters, same state-dict keys) that runs the fused kernel, with the
    SiLU that follows it folded in when ``act`` is set. Under autocast it computes in the
    autocast dtype, as AutocastGroupNorm does."""

    act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(in_autocast_dtype(x), self.weight, self.bias, self.num_groups, self.eps, self.act)


class FusedGroupNormSiLU(FusedGroupNorm):
    act = True
