"""Patch dataset node: a folder under ComfyUI's input directory, or an IMAGE batch."""

from __future__ import annotations

import hashlib
import json
import os

import folder_paths
from comfy_api.latest import io

from ..training.data import DataConfig, build_dataset
from ..training.errors import VAEFTError
from .common import Dataset, config_from_inputs, config_inputs, image_to_training, training_to_image


def resolve_input_folder(folder: str) -> str:
    """``folder`` relative to ComfyUI's input directory; it may not climb out of it."""
    base = os.path.abspath(folder_paths.get_input_directory())
    name = (folder or "").strip()
    if not name:
        raise VAEFTError("no data folder given: name a folder inside ComfyUI's input directory "
                         f"({base}), or connect an IMAGE batch")
    path = os.path.abspath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise VAEFTError(f"data folder {folder!r} is outside ComfyUI's input directory ({base}); "
                         "put (or symlink) the images under it")
    if not os.path.isdir(path):
        from ..training.imageio import describe_path

        kind = describe_path(path)  # stat only: a FIFO named like a folder is never opened
        if kind is not None:
            raise VAEFTError(f"{folder!r} in ComfyUI's input directory ({base}) is {kind}, not a folder; "
                             "name a folder inside it")
        raise VAEFTError(f"data folder {folder!r} does not exist in ComfyUI's input directory ({base})")
    return path


def folder_fingerprint(path: str, recursive: bool) -> str:
    """sha256 of a folder's listing (relative path, size, modification time): changes when an image
    is added, removed, replaced or edited, and not otherwise."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if not recursive:
            break
    return h.hexdigest()


class VAEPatchDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFTPatchDataset",
            display_name="VAE Patch Dataset",
            category="training/vae",
            description="Random (or grid) patches from a folder of large images, with foreground masking, "
                        "augmentation and a validation split by image.",
            inputs=[
                io.String.Input("folder", default="vae_train",
                                tooltip="folder inside ComfyUI's input directory (searched recursively)"),
                io.Image.Input("images", optional=True,
                               tooltip="use this IMAGE batch instead of the folder"),
                *config_inputs(DataConfig, skip=("mask_dir",), order=("patch_size", "sampling")),
                io.String.Input("mask_folder", default="", optional=True,
                                tooltip="optional folder of masks (same names) inside the input directory"),
            ],
            outputs=[
                Dataset.Output("dataset"),
                io.Image.Output("preview"),
                io.String.Output("summary"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, images=None, mask_folder="", recursive=True, **kwargs):
        """Re-run when the files change, not only the inputs (ComfyUI caches by inputs otherwise, and
        would keep training on the old listing)."""
        if images is not None:
            return ""  # an IMAGE batch is part of the inputs already
        try:
            parts = [folder_fingerprint(resolve_input_folder(folder), recursive)]
            if mask_folder and mask_folder.strip():
                parts.append(folder_fingerprint(resolve_input_folder(mask_folder), True))
        except VAEFTError:
            return float("nan")  # never equal: execute runs and reports the problem
        return "/".join(parts)

    @classmethod
    def execute(cls, folder, images=None, mask_folder="", **kwargs) -> io.NodeOutput:
        mask_dir = resolve_input_folder(mask_folder) if mask_folder and mask_folder.strip() else None
        cfg = config_from_inputs(DataConfig, kwargs, mask_dir=mask_dir)
        source = image_to_training(images) if images is not None else resolve_input_folder(folder)
        data = build_dataset(source, cfg)
        summary = data.summary()
        preview = training_to_image(data.preview(16, seed=cfg.seed))
        return io.NodeOutput(data, preview, json.dumps(summary, indent=1))
