"""ComfyUI V3 nodes: thin adapters over the `training` library."""

from .dataset import VAEPatchDataset
from .evaluate import VAEEvaluate
from .finetune import VAEFineTune
from .graph import VAELossGraph
from .save import SaveFineTunedVAE

NODES = [VAEPatchDataset, VAEFineTune, SaveFineTunedVAE, VAELossGraph, VAEEvaluate]
