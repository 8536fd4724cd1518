"""Export metadata is private: a file people share says nothing about the user's directory layout."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import tiny_ldm_sd, train, write_images
from training.config import DataConfig, TrainConfig
from training.data import build_dataset
from training.export import export_vae
from training.metadata import dataset_digest, strip_paths
from training.vae import build_vae

# Written independently of training.metadata's pattern: anything that starts like an absolute path.
LOOKS_ABSOLUTE = re.compile(r"""(^|[\s'"(\[=:,])(/|~[\\/]|[A-Za-z]:[\\/]|\\\\)[^\s/\\]""")
PRIVATE_NAMES = ("alice", "secret-project", "clinic 2024", "patient-john-doe", "astronaut", "coffee", "chelsea",
                 "notes.txt", "weights")


@pytest.fixture(scope="module")
def deep_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    deep = root / "home" / "alice" / "secret-project" / "clinic 2024"
    images = deep / "retina images"
    write_images(images / "patient-john-doe", names=("astronaut", "coffee", "chelsea"), size=64)
    (images / "notes.txt").write_text("not an image")        # skipped, with a reason
    (images / "broken.png").write_bytes(b"\x89PNG broken")    # skipped: cannot be decoded
    masks = deep / "masks"
    os.makedirs(masks / "patient-john-doe")
    for name in ("astronaut", "coffee", "chelsea"):
        w, h = Image.open(images / "patient-john-doe" / f"{name}.png").size
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(masks / "patient-john-doe" / f"{name}.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "broken.png")
    data = build_dataset(str(images), DataConfig(patch_size=32, mask_dir=str(masks), val_fraction=0.34))
    backbone = deep / "weights" / "vgg16.pth"
    cfg = TrainConfig(steps=1, batch_size=2, lpips_weight=0.0, preview_every=0, lpips_backbone=str(backbone))
    base_file = deep / "models" / "base.safetensors"
    result = train(build_vae(tiny_ldm_sd(), source=str(base_file)),
                   itertools.repeat(next(iter(data.train_batches(2)))), cfg, device="cpu", dataset=data.summary())
    out = root / "out"
    out.mkdir()
    report = export_vae(result, out / "vae-ft-x-1.safetensors")
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    return root, data.summary(), meta


def test_no_metadata_value_holds_a_path_or_a_private_name(deep_export):
    root, summary, meta = deep_export
    assert str(root) in summary["source"]  # the summary itself (shown to the user) has the full path ...
    assert summary["images_skipped"] and summary["val_paths"]
    for key, value in meta.items():       # ... the shared file has none of it
        assert str(root) not in value, key
        assert not LOOKS_ABSOLUTE.search(value), (key, value)
        for name in PRIVATE_NAMES:
            assert name not in value, (key, name, value)


def test_the_dataset_is_described_by_names_counts_and_a_hash(deep_export):
    _, summary, meta = deep_export
    ds = json.loads(meta["vaeft.dataset"])
    assert ds["folder"] == "retina images"
    assert (ds["images"], ds["train_images"], ds["val_images"], ds["skipped"]) == (3, 2, 1, 2)
    assert ds["masking"].startswith("mask folder masks (> 0.5 = foreground)")
    lists = {"train_paths": summary["train_paths"], "val_paths": summary["val_paths"]}
    assert ds["files_sha256"] == hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()
    assert ds["patch_size"] == 32
    assert meta["vaeft.config.lpips_backbone"] == "vgg16.pth"
    assert meta["vaeft.base_name"] == "base.safetensors"


def test_the_file_list_hash_changes_with_the_files():
    a = dataset_digest({"train_paths": ["a.png", "b.png"], "val_paths": ["c.png"]})["files_sha256"]
    b = dataset_digest({"train_paths": ["a.png", "b2.png"], "val_paths": ["c.png"]})["files_sha256"]
    c = dataset_digest({"train_paths": ["a.png"], "val_paths": ["b.png", "c.png"]})["files_sha256"]
    assert len({a, b, c}) == 3


@pytest.mark.parametrize("text,clean", [
    ("/home/alice/data/images", "images"),
    ("C:\\Users\\alice\\vgg16.pth", "vgg16.pth"),
    ("D:/models/ae.safetensors", "ae.safetensors"),
    ("\\\\server\\share\\fundus", "fundus"),
    ("see ~/private/x.png here", "see x.png here"),
    ("path='/srv/a/b.png', n=2", "path='b.png', n=2"),
    ("MSE + 0.1·LPIPS, 1/std, train / val, images/s", "MSE + 0.1·LPIPS, 1/std, train / val, images/s"),
])
def test_strip_paths(text, clean):
    assert strip_paths(text) == clean
