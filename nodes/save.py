"""Save node: writes vae-ft-<name>-<steps>.safetensors into output/vae/, where stock Load VAE lists it."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..training.config import EXPORT_DTYPES
from ..training.errors import VAEFTError
from ..training.export import FORMATS, export_filename, export_vae
from ..training.families import LATENT_CHOICES, diffusers_text, latent_choices_text
from .common import Trained, schema

log = logging.getLogger("vaeft")


def vae_output_folder(sub: str = "vae") -> str:
    """ComfyUI's main.py registers output/vae as a "vae" model folder, so files here are listed
    by Load VAE (its file-list cache notices the folder's new mtime, no restart needed).
    diffusers model folders go to output/vae_diffusers/ instead, where Load VAE does not look."""
    folder = os.path.join(folder_paths.get_output_directory(), sub)
    os.makedirs(folder, exist_ok=True)
    return folder


def _check_not_the_base(trained, path: str, filename: str) -> None:
    """The file a fine-tune started from (a VAE Load VAE lists from output/vae/, say) is never written over,
    whatever overwrite says: replacing one's own input is never what it means."""
    base = folder_paths.get_full_path("vae", trained.layout.base_name) if trained.layout.base_name else None
    if base and os.path.exists(path) and os.path.samefile(base, path):
        raise VAEFTError(f"{filename} is the VAE this fine-tune started from ({trained.layout.base_name!r} in Load "
                         "VAE's list): a fine-tune never writes over its base, with or without overwrite; choose "
                         "another name")


class SaveFineTunedVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTSave",
            display_name="Save Fine-tuned VAE",
            description="Write the fine-tuned VAE as vae-ft-<name>-<steps>.safetensors (the base file's layout, "
                        "exact key set and dtypes) into output/vae/, loadable by Load VAE (and Automatic1111 for "
                        "SD/SDXL VAEs), "
                        "or as a diffusers model folder. Shows where the file went and whether the decoder is "
                        "safe in fp16/bf16.",
            search_aliases=["save vae", "export vae"],
            inputs=[
                Trained.Input("trained", tooltip="VAE Fine-tune's trained output"),
                io.String.Input("name", default="custom", tooltip="a plain name; the file is "
                                "vae-ft-<name>-<steps>.safetensors"),
                io.Combo.Input("dtype", options=list(EXPORT_DTYPES), default="base",
                               tooltip="base: every tensor in the base file's dtype, so the untrained encoder "
                                       "stays bit-identical; fp16/bf16/fp32: cast everything (the node says "
                                       "when that rounds untrained tensors)"),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="replace an existing file of the same name (off: refuse)"),
                io.Combo.Input("format", options=list(FORMATS), default="safetensors", optional=True,
                               tooltip="safetensors: one file in output/vae/ for Load VAE (and Automatic1111 for "
                                       "SD/SDXL VAEs); "
                                       "diffusers: a model folder in output/vae_diffusers/ for diffusers' "
                                       f"from_pretrained ({diffusers_text()})"),
                io.Combo.Input("family", options=list(LATENT_CHOICES), default="auto", optional=True,
                               tooltip="the latent family whose scaling_factor/shift_factor the export "
                                       "records (auto: from the base file's name or its latents; re-estimated "
                                       f"when the encoder was trained). {latent_choices_text()}"),
            ],
            outputs=[io.String.Output("filename", tooltip="the saved file's name, as Load VAE lists it")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trained, name, dtype, overwrite, format="safetensors", family="auto") -> io.NodeOutput:
        import comfy.model_management as mm

        format, family = format or "safetensors", family or "auto"  # older workflows lack these inputs
        filename = export_filename(name, trained.steps_done)
        if format == "diffusers":
            filename = filename[: -len(".safetensors")]
            path = os.path.join(vae_output_folder("vae_diffusers"), filename)
        else:
            path = os.path.join(vae_output_folder(), filename)
            _check_not_the_base(trained, path, filename)
        report = export_vae(trained, path, dtype=dtype, overwrite=overwrite, device=mm.get_torch_device(),
                            format=format, family=family)
        for warning in report.warnings:
            log.warning("Save Fine-tuned VAE: %s", warning)
        return io.NodeOutput(filename, ui=ui.PreviewText(report.text()))
