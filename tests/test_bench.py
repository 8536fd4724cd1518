"""CI smoke test of bench/train_bench.py: its CPU form runs all three sides (seed-style reference,
public peer-best, ours) and prints one JSON object with positive numbers. The script's ``main`` runs in
this process (its imports paid once); one run checks the script from the command line."""

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


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run_bench(*extra: str) -> dict:
    """The bench's main with the smoke flags, in this process: its one JSON line on stdout, parsed."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _bench_module().main([*SMOKE, *extra])
    assert code == 0, err.getvalue()[-4000:]
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
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


def test_bench_cpu_smoke_all_three_sides():
    doc = run_bench()
    assert doc["meta"]["device"] == "cpu" and doc["complete"]
    assert doc["meta"]["sides"] == ["reference", "peer_best", "ours"]
    assert "random" in doc["meta"]["random_init"]
    [entry] = doc["results"]
    assert entry["size"] == 32 and entry["batch"] == 2
    for side in ("reference", "peer_best", "ours"):
        check_side(entry[side])
    for ratio in ("ours_over_reference", "ours_over_peer_best", "peer_best_over_reference"):
        v = entry[ratio]["images_per_s"]
        assert isinstance(v, float) and v > 0, ratio
    assert entry["ours_over_peer_best"]["images_per_s"] == round(
        entry["ours"]["images_per_s"] / entry["peer_best"]["images_per_s"], 3)
    # the reference trains the encoder too, so it does more work per image than the decoder-only sides
    assert entry["reference"]["flops_per_step"] > entry["peer_best"]["flops_per_step"]
    # peer-best does exactly our step's model work: frozen encoder forward, decoder forward and
    # backward, LPIPS forward and backward to its input (under no_grad its backward would be missing)
    assert entry["peer_best"]["flops_per_step"] == entry["ours"]["flops_per_step"]
    assert entry["peer_best"]["precision"].startswith("bf16 autocast")
    assert "batch_used" not in entry["reference"]      # it fitted at the batch asked for


def test_reference_falls_back_to_the_largest_batch_that_fits(monkeypatch):
    """The ≥4× target compares with the reference at its largest batch that fits: on out-of-memory
    it is retried at half the batch, and the entry says so."""
    import argparse

    import torch

    bench = _bench_module()
    tried = []

    def fake(side_fn, vae, lpips_net, size, device, a, batch):
        tried.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"images_per_s": 1.0 * batch}

    monkeypatch.setattr(bench, "run_loop_side", fake)
    a = argparse.Namespace(lpips_weight=0.1)
    out = bench.run_reference(None, None, 64, torch.device("cpu"), a, 8)
    assert tried == [8, 4, 2]
    assert out["batch_used"] == 2 and out["oom_at"] == [8, 4] and out["images_per_s"] == 2.0

    def always(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "run_loop_side", always)
    try:
        bench.run_reference(None, None, 64, torch.device("cpu"), a, 2)
    except torch.OutOfMemoryError:
        pass
    else:
        raise AssertionError("an out-of-memory at batch 1 must surface")


def test_bench_cpu_smoke_16_channel_micro_batch_several_batches():
    doc = run_bench("--latent-channels", "16", "--sides", "ours", "--micro-batch", "1", "--batch", "1,2")
    assert doc["meta"]["latent_channels"] == 16 and doc["meta"]["sides"] == ["ours"]
    assert [(e["size"], e["batch"]) for e in doc["results"]] == [(32, 1), (32, 2)]
    for entry in doc["results"]:
        assert "reference" not in entry and "peer_best" not in entry
        check_side(entry["ours"])


def test_bench_cpu_smoke_latent_cache_counts_only_decoder_work():
    plain = run_bench("--sides", "ours", "--warmup", "2")["results"][0]["ours"]
    cached = run_bench("--sides", "ours", "--warmup", "2", "--latent-cache")["results"][0]["ours"]
    check_side(cached)
    assert cached["latent_cache_hits"] == 4            # steps 3 and 4 reuse both pool batches
    assert cached["flops_per_step"] < plain["flops_per_step"]   # the encoder's forward is gone


def test_bench_refuses_an_untimeable_run():
    """The first step builds optimizer state: with no warm-up step there is nothing fair to time. (From
    the command line, as the README runs it.)"""
    proc = subprocess.run([sys.executable, BENCH, *SMOKE, "--warmup", "0"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--warmup and --steps must be at least 1" in proc.stderr
    import contextlib
    import io

    import pytest

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        _bench_module().main([*SMOKE, "--sides", "ours,theirs"])
    assert e.value.code == 2 and "--sides: unknown ['theirs']" in err.getvalue()


def test_bench_cpu_smoke_wan_2d_path_vs_diffusers_3d():
    """--family wan2.1: the Qwen-Image VAE (tiny here) trained by our trainer through its 2D path and
    through diffusers' own 3D forward (wan_2d off); both timed, the ratio given, and the same first-step
    losses (the 2D path is exact at one frame: only float rounding separates them)."""
    doc = run_bench("--family", "wan2.1", "--steps", "1", "--batch", "1")
    meta = doc["meta"]
    assert doc["complete"] and meta["family"] == "wan2.1" and meta["sides"] == ["diffusers_3d", "ours"]
    assert meta["latent_channels"] == 16 and "AutoencoderKLQwenImage" in meta["model"]
    [entry] = doc["results"]
    assert "reference" not in entry and "peer_best" not in entry
    for side in ("diffusers_3d", "ours"):
        check_side(entry[side])
    assert entry["ours"]["config"]["wan_2d"] is True and entry["ours"]["image_path"] == "2d"
    assert entry["diffusers_3d"]["config"]["wan_2d"] is False
    # the same batch on both sides: the ratio of step times (images_per_s is rounded to 3 decimals)
    assert entry["ours_over_diffusers_3d"]["images_per_s"] == round(
        entry["diffusers_3d"]["step_ms"] / entry["ours"]["step_ms"], 3)
    # the 3D side's causal convolutions also multiply their zero padding in time: more counted FLOPs
    assert entry["diffusers_3d"]["flops_per_step"] > entry["ours"]["flops_per_step"]
    ours, theirs = entry["ours"]["first_step_loss"], entry["diffusers_3d"]["first_step_loss"]
    assert set(ours) == set(theirs) >= {"mse", "lpips", "total"}
    for term in ours:
        assert ours[term] > 0 and abs(ours[term] - theirs[term]) <= 1e-5 * abs(theirs[term]), (term, ours, theirs)
    assert 0 <= entry["first_step_loss_max_rel_diff"] <= 1e-5


def test_bench_wan_refuses_the_kl_f8_only_sides():
    import contextlib
    import io

    import pytest

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        _bench_module().main([*SMOKE, "--family", "wan2.1", "--sides", "reference,ours"])
    assert e.value.code == 2 and "--sides: unknown ['reference']" in err.getvalue()
    assert "diffusers_3d,ours" in err.getvalue()


def test_family_cost_bench_measures_one_case_per_process():
    """bench/family_cost.py from the command line: one JSON line per case with the released kl-f8 size, a
    positive step time and the process's peak memory (each case in its own process)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "family_cost.py"), "--families", "kl-f8",
                        "--patch", "16", "--steps", "1", "--warmup", "1", "--checkpointing", "on"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" not in lines[0], lines
    case = lines[0]
    assert case["family"] == "kl-f8" and case["grad_checkpointing"] is True and case["decoder_params_M"] == 49.5
    assert case["s_per_step"] > 0 and case["peak_GiB"] > 0.3
