"""The VAE mid-block attention (one head of dim 512 over the latent grid) under each SDPA backend.

Why: at head dim 512 FlashAttention does not apply (it stops at 256), so PyTorch picks the
memory-efficient kernel, whose backward was 24.7 ms of a 253 ms step at 512², batch 8 (RESULTS.md,
run 3). This times forward + backward of ``scaled_dot_product_attention`` on bf16 q, k, v of shape
(batch, 1, (size/8)², 512) for every backend that accepts it, with its peak memory above the inputs
and its error against a float32 math-backend reference. Prints one JSON object.

    python bench/attn_bench.py --size 512 --batch 8 [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION", "FLASH_ATTENTION")


def fwd_bwd(q, k, v, g):
    q.grad = k.grad = v.grad = None
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(g)
    return out


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="patch side in pixels (latent grid = size/8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512, help="head dim (= channels: the VAE uses one head)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = (a.size // 8) ** 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(a.batch, 1, n, a.dim, device=dev) for _ in range(3))
    g = torch.randn(a.batch, 1, n, a.dim, device=dev)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = fwd_bwd(*ref_in, g)
    ref_grads = [t.grad for t in ref_in]
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    gl = g.to(dtype)
    rows = {}
    for name in BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                out = fwd_bwd(*inputs, gl)                     # warm-up, and the error check
                errs = {"out": rel(out, ref), **{f"d{x}": rel(t.grad, r) for x, t, r in zip("qkv", inputs, ref_grads)}}
                del out
                times = []
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                for _ in range(a.reps):
                    if dev.type == "cuda":
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        fwd_bwd(*inputs, gl)
                        e.record()
                        e.synchronize()
                        times.append(s.elapsed_time(e))
                    else:
                        import time
                        t0 = time.perf_counter()
                        fwd_bwd(*inputs, gl)
                        times.append((time.perf_counter() - t0) * 1e3)
                row = {"fwd_bwd_ms_median": round(statistics.median(times), 3),
                       "fwd_bwd_ms_min": round(min(times), 3), "rel_err": {k: round(x, 6) for k, x in errs.items()}}
                if dev.type == "cuda":
                    row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                rows[name.lower()] = row
        except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result too
            rows[name.lower()] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    doc = {"bench": "attn_bench", "shape_bhld": [a.batch, 1, n, a.dim], "dtype": str(dtype), "reps": a.reps,
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "results": rows}
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
