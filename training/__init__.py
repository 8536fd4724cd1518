"""Fine-tune the Stable Diffusion family's kl-f8 VAE (AutoencoderKL) on your own images.

A pure PyTorch library (no ComfyUI import) shared by the ComfyUI nodes, the CLI
(``python -m training ...``) and multi-GPU runs (``torchrun ... -m training fit``).
"""

__version__ = "0.1.0"
