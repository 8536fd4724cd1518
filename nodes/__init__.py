"""ComfyUI V3 nodes: thin adapters over the `training` library."""

from .compare import VAECompareOnLatents
from .dataset import VAEPatchDataset
from .distil import VAEDistilDecoder
from .evaluate import VAEEvaluate
from .finetune import VAEFineTune
from .graph import VAELossGraph
from .options import VAEFineTuneOptions, VAEPatchOptions
from .save import SaveFineTunedVAE

NODES = [VAEPatchDataset, VAEPatchOptions, VAEFineTune, VAEFineTuneOptions, SaveFineTunedVAE, VAELossGraph,
         VAEEvaluate, VAECompareOnLatents, VAEDistilDecoder]
