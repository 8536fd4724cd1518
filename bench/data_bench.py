"""Patch loader throughput (patches/s) at --patch-size (512²) from cached ~2048² images; prints one JSON object.

Eight skimage sample photos (the retina fundus photo, astronaut, ...) upscaled to 2048² and
saved as PNG mimic a folder of fundus photos. Measured: the training stream with
num_workers 0 (with torch's default and 1 intra-op thread) and 2, without and with augmentation (flips, 90° rotations, colour jitter 0.1,
applied on CPU in the consuming process as the trainer does on its device).

    python bench/data_bench.py [--batches 16] [--batch-size 16] [--patch-size 512] [--image-size 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.augment import augment  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data import build_dataset  # noqa: E402

SIZE = 2048


def make_folder(folder: str, size: int = SIZE) -> None:
    import skimage.data as sd

    photos = [sd.retina, sd.astronaut, sd.coffee, sd.chelsea, sd.rocket, sd.immunohistochemistry,
              sd.hubble_deep_field, sd.colorwheel]
    for i, f in enumerate(photos):
        a = f()
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        img = Image.fromarray(a[..., :3]).resize((size, size), Image.BICUBIC)
        img.save(os.path.join(folder, f"{i:02d}_{f.__name__}.png"), compress_level=1)


def measure(data, cfg, batch_size: int, batches: int, workers: int, aug: bool) -> float:
    it = data.train_batches(batch_size, num_workers=workers)
    for _ in range(2):  # warm-up: worker start, first prefetch, kornia's import
        x = next(it)
        if aug:
            augment(x, cfg, 0)
    t = time.perf_counter()
    for k in range(batches):
        x = next(it)
        if aug:
            x = augment(x, cfg, k)  # the trainer passes a seed from (seed, rank, step)
    dt = time.perf_counter() - t
    del it
    return batch_size * batches / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=SIZE, help="side of the upscaled sample photos")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        make_folder(d, a.image_size)
        cfg = DataConfig(patch_size=a.patch_size, color_jitter=0.1, cache_mb=4096)
        t = time.perf_counter()
        data = build_dataset(d, cfg)
        scan_s = time.perf_counter() - t
        s = data.summary()
        results = []
        default_threads = torch.get_num_threads()
        # main-process torch threads matter: on a small, busy machine 2 intra-op threads on
        # per-patch work can be far slower than 1 (workers always use 1)
        for workers, threads in ((0, default_threads), (0, 1), (2, default_threads)):
            torch.set_num_threads(threads)
            for aug in (False, True):
                pps = measure(data, cfg, a.batch_size, a.batches, workers, aug)
                results.append({"num_workers": workers, "main_threads": threads, "augment": aug,
                                "patches_per_s": round(pps, 1)})
        torch.set_num_threads(default_threads)
    print(json.dumps({
        "patch_size": a.patch_size, "batch_size": a.batch_size, "batches_timed": a.batches,
        "images": len(s["images_used"]), "image_size": a.image_size, "train_images": s["train_images"],
        "cached_images": s["cached_images"], "cache_mb_used": s["cache_mb_used"],
        "scan_s": round(scan_s, 2), "mean_foreground": s["mean_foreground"],
        "results": results,
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
