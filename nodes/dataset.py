"""Patch dataset node: a folder under ComfyUI's input directory, or an IMAGE batch."""

from __future__ import annotations

import hashlib
import json
import os

import folder_paths
from comfy_api.latest import io

from ..training.config import DataConfig
from ..training.data import build_dataset
from ..training.errors import VAEFTError
from .common import (Dataset, PatchOptions, config_from_inputs, config_inputs, image_to_training, schema,
                     training_to_image)

# Widget order on the node: its essential DataConfig fields; the rest come from VAE Patch Options.
NODE_ORDER = ("patch_size", "sampling", "foreground_threshold", "val_fraction", "seed")


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
        from ..training.files import check_folder

        # stat only: a FIFO named like a folder is never opened
        check_folder(path, f"{folder!r} in ComfyUI's input directory ({base})", "name a folder inside it")
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
        return schema(
            node_id="VAEFTPatchDataset",
            display_name="VAE Patch Dataset",
            description="Random (or grid) patches from a folder of large images, with foreground masking "
                        "(automatic, or a mask folder), augmentation and a validation split by image. "
                        "Augmentation, overlap and loading settings are on VAE Patch Options.",
            search_aliases=["vae dataset", "image patches"],
            inputs=[
                io.String.Input("folder", default="vae_train",
                                tooltip="folder inside ComfyUI's input directory (searched recursively)"),
                io.Image.Input("images", optional=True,
                               tooltip="use this IMAGE batch instead of the folder"),
                # Here, not on VAE Patch Options: ComfyUI fingerprints a node from its own widget values
                # only (never linked ones), and edited masks must make the dataset rebuild.
                io.String.Input("mask_folder", default="",
                                tooltip="optional folder of masks (same relative names as the images; white = "
                                        "use) inside ComfyUI's input directory; replaces the automatic "
                                        "foreground"),
                PatchOptions.Input("options", optional=True,
                                   tooltip="every other setting, from VAE Patch Options (unconnected: "
                                           "the defaults)"),
                *config_inputs(DataConfig, order=NODE_ORDER, essential=True),
            ],
            outputs=[
                Dataset.Output("dataset", tooltip="the patch dataset, for VAE Fine-tune and VAE Evaluate"),
                io.Image.Output("preview", tooltip="sampled patches, foreground outlined"),
                io.String.Output("summary", tooltip="JSON: images used and skipped (with reasons), the split"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, images=None, mask_folder="", **kwargs):
        """Re-run when the files change, not only the inputs (ComfyUI caches by inputs otherwise, and
        would keep training on the old listing). ComfyUI passes only widget values here, never the
        options link, so subfolders always count (at worst a needless rebuild with recursive off)."""
        if images is not None:
            return ""  # an IMAGE batch is part of the inputs already
        recursive = True
        try:
            parts = [folder_fingerprint(resolve_input_folder(folder), recursive)]
            if mask_folder and mask_folder.strip():
                parts.append(folder_fingerprint(resolve_input_folder(mask_folder), True))
        except VAEFTError:
            return float("nan")  # never equal: execute runs and reports the problem
        return "/".join(parts)

    @classmethod
    def execute(cls, folder, images=None, mask_folder="", options=None, **kwargs) -> io.NodeOutput:
        mask_dir = resolve_input_folder(mask_folder) if mask_folder and mask_folder.strip() else None
        cfg = config_from_inputs(DataConfig, {**(options or {}), **kwargs}, mask_dir=mask_dir)
        source = image_to_training(images) if images is not None else resolve_input_folder(folder)
        data = build_dataset(source, cfg)
        summary = data.summary()
        preview = training_to_image(data.preview(16, seed=cfg.seed))
        return io.NodeOutput(data, preview, json.dumps(summary, indent=1))
