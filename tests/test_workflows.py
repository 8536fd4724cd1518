"""The example workflows name every input the nodes declare, so they run as they are."""

import dataclasses
import json
import os

from conftest import ROOT
from training.config import TrainConfig
from training.data import DataConfig


def _node_fields(cls, skip=()):
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("node") is not False and f.name not in skip}


def test_api_example_lists_every_input():
    with open(os.path.join(ROOT, "example_workflows", "vae_finetune_api.json")) as f:
        prompt = json.load(f)
    by_type = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert set(by_type["VAEFTFineTune"]) == _node_fields(TrainConfig) | {"vae", "dataset"}
    assert set(by_type["VAEFTPatchDataset"]) == _node_fields(DataConfig, skip=("mask_dir",)) | {"folder",
                                                                                              "mask_folder"}
    assert set(by_type["VAEFTSave"]) == {"trained", "name", "dtype", "overwrite", "format", "family"}
    # defaults are the recipe's, so the example is the sd-vae-ft-mse recipe as published
    ft = by_type["VAEFTFineTune"]
    assert (ft["recipe"], ft["mse_weight"], ft["lpips_weight"], ft["trainable"], ft["ema"]) == \
        ("sd-vae-ft-mse", 1.0, 0.1, "decoder", True)
    # every link points at an existing node
    for node in prompt.values():
        for v in node["inputs"].values():
            if isinstance(v, list):
                assert v[0] in prompt


def test_ui_example_is_valid_json_with_the_same_nodes():
    path = os.path.join(ROOT, "example_workflows", "vae_finetune.json")
    with open(path) as f:
        ui = json.load(f)
    types = {n["type"] for n in ui["nodes"]}
    assert {"VAELoader", "VAEFTPatchDataset", "VAEFTFineTune", "VAEFTSave", "VAEFTLossGraph"} <= types
