"""Save node: writes vae-ft-<name>-<steps>.safetensors into output/vae/, where stock Load VAE lists it."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..training.config import EXPORT_DTYPES
from ..training.export import export_filename, export_vae
from .common import Trained, schema


def vae_output_folder() -> str:
    """ComfyUI's main.py registers output/vae as a "vae" model folder, so files here are listed
    by Load VAE (its file-list cache notices the folder's new mtime, no restart needed)."""
    folder = os.path.join(folder_paths.get_output_directory(), "vae")
    os.makedirs(folder, exist_ok=True)
    return folder


class SaveFineTunedVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTSave",
            display_name="Save Fine-tuned VAE",
            description="Write the fine-tuned VAE as vae-ft-<name>-<steps>.safetensors (ldm keys, the base "
                        "file's exact key set) into output/vae/, loadable by Load VAE and Automatic1111. "
                        "The node shows where the file went.",
            search_aliases=["save vae", "export vae"],
            inputs=[
                Trained.Input("trained", tooltip="VAE Fine-tune's trained output"),
                io.String.Input("name", default="custom", tooltip="a plain name; the file is "
                                "vae-ft-<name>-<steps>.safetensors"),
                io.Combo.Input("dtype", options=list(EXPORT_DTYPES), default="fp16",
                               tooltip="dtype of the saved weights (fp16: the usual VAE file, half the size)"),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="replace an existing file of the same name (off: refuse)"),
            ],
            outputs=[io.String.Output("filename", tooltip="the saved file's name, as Load VAE lists it")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trained, name, dtype, overwrite) -> io.NodeOutput:
        filename = export_filename(name, trained.steps_done)
        path = os.path.join(vae_output_folder(), filename)
        export_vae(trained, path, dtype=dtype, overwrite=overwrite)
        return io.NodeOutput(filename, ui=ui.PreviewText(f"saved {path}"))
