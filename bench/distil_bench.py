"""Decode time of distil's students (issue 30) against their teacher: the full-size kl-f8 VAE (SD/SDXL/SD3/Flux.1's
shape: 4 levels of 128/256/512/512 channels) and Flux.2's, each against its narrow students (the teacher's layout with
decoder width 64 and 96, built by ``training.students.narrow_student``) and its tiny one (TAESD's layout: taesd for
kl-f8, taef2 for Flux.2, ``training.students.tiny_student``), at --sizes (one image of side² pixels, batch 1).

Random weights: decode time depends on shapes only. Each model decodes the same latents (a fixed standard-normal
draw of the teacher's latent shape) --warmup times untimed, then --repeats timed, interleaved model by model in
every round so that all see the same machine; the median is reported, with the speedup over the teacher. fp32
(--dtype on a GPU: bf16/fp16 weights and latents). On CUDA each timing is bracketed by synchronize().

    python bench/distil_bench.py --out /tmp/distil_bench.json                         # the recorded CPU run
    python bench/distil_bench.py --device cuda --dtype bf16 --sizes 512 1024 2048      # on a GPU
    python bench/distil_bench.py --quick                                               # smoke test, ~20 s

JSON to --out (and the last line of stdout), a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SD = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
FLUX2 = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=32)
QUICK = dict(block_out_channels=[64, 64, 64, 64], layers_per_block=1)


def teacher(family: str, config: dict):
    """A random-init full-size teacher, loaded as a VAE file is (``training.vae.build_vae``)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    from training.families import flux2
    from training.families.ldm import diffusers_to_ldm
    from training.vae import build_vae

    torch.manual_seed(0)
    blocks = len(config["block_out_channels"])
    kw = dict(down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks, **config)
    if family == "flux2":
        sd, _ = flux2.file_layout(AutoencoderKLFlux2(**kw).state_dict())
    else:
        sd = diffusers_to_ldm(AutoencoderKL(**kw).state_dict())
    return build_vae({k: v.contiguous() for k, v in sd.items()}, f"{family}-teacher.safetensors")


def models(family: str, config: dict, widths: list[int]) -> dict:
    from training.students import narrow_student, tiny_spec, tiny_student

    t = teacher(family, config)
    out = {"teacher": t.model}
    for w in widths:
        if w < config["block_out_channels"][0]:
            out[f"narrow-{w}"] = narrow_student(t, w).model
    out["tiny (" + tiny_spec(t, "auto")["name"] + ")"] = tiny_student(t, tiny_spec(t, "auto")).model
    return out


def time_decodes(named: dict, side: int, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    from training.distil import decode_times

    times = decode_times(named, side, device, repeats, warmup, dtype)
    teacher_s = statistics.median(times["teacher"])
    return {name: {"median_s": round(statistics.median(t), 5), "runs_s": [round(x, 5) for x in t],
                   "speedup": round(teacher_s / statistics.median(t), 3)} for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--families", nargs="+", choices=("kl-f8", "flux2"), default=["kl-f8", "flux2"])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 96])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="small teachers (64 channels) at 64²: a smoke test")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sizes = [64] if args.quick else args.sizes
    widths = [32] if args.quick else args.widths
    result = {"date": datetime.date.today().isoformat(), "device": _device_name(device), "dtype": args.dtype,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
              "command": "python bench/distil_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": []}
    for family in args.families:
        config = {**(FLUX2 if family == "flux2" else SD), **(QUICK if args.quick else {})}
        named = {k: (m.to(device) if dtype == torch.float32 else m.to(device, dtype)).eval()
                 for k, m in models(family, config, widths).items()}
        for side in sizes:
            for name, row in time_decodes(named, side, device, dtype, args.warmup, args.repeats).items():
                result["rows"].append({"family": family, "side": side, "model": name, **row})
                print(f"{family} {side}² {name}: {row['median_s'] * 1000:.1f} ms ({row['speedup']:.2f}×)",
                      file=sys.stderr)
        del named
    print("| family | side | model | decode (median) | × teacher |\n|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['family']} | {r['side']}² | {r['model']} | {r['median_s'] * 1000:.0f} ms | {r['speedup']:.2f} |")
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
