"""Compare on Latents node: a base and a tuned VAE decode the same LATENT (a sampler's, Load Latent's, VAE
Encode's) side by side, with each VAE's round trip and fp16/bf16 safety on it (training/latent_compare.py)."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..training.errors import VAEFTError
from ..training.latent_compare import DIFFERENCE_MAX, compare_on_latents
from .common import comfy_vae_to_training, schema, training_to_image


class VAECompareOnLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="VAEFTCompareOnLatents",
            display_name="VAE Compare on Latents",
            description="Decode the same LATENT (a KSampler's, Load Latent's, VAE Encode's) with a base and a tuned "
                        "VAE: rows of base | tuned | amplified difference, and per VAE the round trip (decode, "
                        "encode, distance to the given latent), the largest activation and fp16/bf16 safety on "
                        "these latents; between the two decodes PSNR, LPIPS and ΔE2000. A latent another VAE "
                        "family made is refused, naming both.",
            search_aliases=["compare vae on latents", "base vs tuned", "decode latent with two vaes"],
            inputs=[
                io.Vae.Input("base", tooltip="the base VAE (the one the latents were made for)"),
                io.Vae.Input("tuned", tooltip="the fine-tuned VAE (same latent space as the base)"),
                io.Latent.Input("latent", tooltip="the latents to decode: a KSampler's, Load Latent's (a saved "
                                                  ".latent), VAE Encode's; every latent of the batch is a row"),
                io.Int.Input("limit", default=8, min=1, max=64,
                             tooltip="compare at most this many latents of the batch"),
                io.Combo.Input("half_precision", options=["auto", "on", "off"], default="auto",
                               tooltip="also decode in fp16 and bf16 (NaN/inf, saturated pixels, PSNR against the "
                                       "VAE's own fp32 decode). auto: on a GPU; not on a CPU, where even the 64-px "
                                       "crops of 2 latents it uses there take minutes per full-size VAE"),
                io.Combo.Input("lpips_net", options=["alex", "vgg"], default="alex",
                               tooltip="LPIPS backbone for base vs tuned (alex, as the LPIPS paper reports)"),
            ],
            outputs=[io.Image.Output("comparison",
                                     tooltip=f"a row per latent: base | tuned | |tuned - base| (pale yellow = "
                                             f"{DIFFERENCE_MAX:g} mean difference)"),
                     io.String.Output("report", tooltip="the figures as text: round trip, largest activation, "
                                                        "fp16/bf16 per VAE; base vs tuned PSNR / LPIPS / ΔE2000")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base, tuned, latent, limit, half_precision, lpips_net) -> io.NodeOutput:
        import comfy.model_management as mm

        samples = _samples(latent)
        device = mm.get_torch_device()
        # ComfyUI runs nodes under inference mode; the family modules are built and run as in training
        with torch.inference_mode(False):
            models = {"base": comfy_vae_to_training(base).model}
            # the same VAE twice (a check that the two columns agree) is converted once: a full-size copy takes
            # seconds and hundreds of MB
            models["tuned"] = models["base"] if tuned is base else comfy_vae_to_training(tuned).model
            items = [("input", samples.detach().to("cpu", torch.float32).clone())]
            result = compare_on_latents(models["base"], models["tuned"], items, lpips=lpips_net, device=device,
                                        limit=limit,
                                        half={"on": True, "off": False}.get(half_precision))
        return io.NodeOutput(training_to_image(result.grid), result.text, ui=ui.PreviewText(result.text))


def _samples(latent) -> torch.Tensor:
    """The latents of a LATENT dict (its ``samples``), refused naming what was given instead; a nested (audio and
    video) LATENT is not one VAE's latent."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise VAEFTError(f"the latent input holds no 'samples' tensor (got {type(samples).__name__}: an audio and "
                         "video model's nested LATENT?); connect a VAE's LATENT (KSampler, Load Latent, VAE Encode)")
    return samples  # (its shape is checked against the VAEs by the library, as a file's is)
