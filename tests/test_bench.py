"""CI smoke test of bench/train_bench.py: its CPU form runs and prints one JSON object with positive numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "train_bench.py")
SMOKE = ["--device", "cpu", "--tiny", "--sizes", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
         "--peak-tflops", "1", "--peak-tflops-fp32", "1"]
POSITIVE = ("images_per_s", "step_ms", "flops_per_step", "gflops_per_image", "achieved_tflops", "mfu",
            "mfu_vs_fp32_peak")


def run_bench(*extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, BENCH, *SMOKE, *extra], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}"
    return json.loads(lines[0])


def check_side(side: dict) -> None:
    assert "error" not in side, side.get("error")
    for key in POSITIVE:
        v = side[key]
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, (key, v)
    # CPU memory is a sampled RSS delta: present, and a non-negative number (or null where /proc is absent)
    assert "peak_mem_gb" in side
    assert side["peak_mem_gb"] is None or side["peak_mem_gb"] >= 0


def test_bench_cpu_smoke_both_sides():
    doc = run_bench()
    assert doc["meta"]["device"] == "cpu"
    assert "random" in doc["meta"]["random_init"]
    [entry] = doc["results"]
    assert entry["size"] == 32 and entry["batch"] == 2
    check_side(entry["reference"])
    check_side(entry["ours"])
    ratio = entry["ours_over_reference"]["images_per_s"]
    assert isinstance(ratio, float) and ratio > 0
    # the reference trains the encoder too, so it does more work per image than our decoder-only default
    assert entry["reference"]["flops_per_step"] > entry["ours"]["flops_per_step"]


def test_bench_cpu_smoke_16_channel_micro_batch():
    doc = run_bench("--latent-channels", "16", "--sides", "ours", "--micro-batch", "1")
    assert doc["meta"]["latent_channels"] == 16
    [entry] = doc["results"]
    assert "reference" not in entry
    check_side(entry["ours"])


def test_bench_cpu_smoke_latent_cache_counts_only_decoder_work():
    plain = run_bench("--sides", "ours", "--warmup", "2")["results"][0]["ours"]
    cached = run_bench("--sides", "ours", "--warmup", "2", "--latent-cache")["results"][0]["ours"]
    check_side(cached)
    assert cached["latent_cache_hits"] == 4            # steps 3 and 4 reuse both pool batches
    assert cached["flops_per_step"] < plain["flops_per_step"]   # the encoder's forward is gone


def test_bench_refuses_an_untimeable_run():
    """The first step builds optimizer state: with no warm-up step there is nothing fair to time."""
    proc = subprocess.run([sys.executable, BENCH, *SMOKE, "--warmup", "0"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--warmup and --steps must be at least 1" in proc.stderr
