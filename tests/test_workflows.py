"""The example workflows name every input the nodes declare, so they run as they are, and each UI
template has the thumbnail ComfyUI's template gallery shows."""

import dataclasses
import glob
import json
import os

from PIL import Image

from conftest import ROOT
from training.config import DataConfig, DistilConfig, TrainConfig
from training.options import is_essential

API = os.path.join(ROOT, "examples", "api")
TEMPLATES = os.path.join(ROOT, "example_workflows")


def _node_fields(cls, essential, skip=()):
    return {f.name for f in dataclasses.fields(cls)
            if f.metadata.get("node") is not False and f.name not in skip and is_essential(f) == essential}


def _api(name):
    with open(os.path.join(API, f"{name}_api.json")) as f:
        return json.load(f)


def _api_names():
    return sorted(os.path.basename(p)[:-len("_api.json")] for p in glob.glob(os.path.join(API, "*_api.json")))


def test_api_examples_list_every_input():
    examples = {name: _api(name) for name in _api_names()}
    assert {"vae_finetune", "vae_finetune_advanced", "vae_finetune_flux2", "vae_finetune_qwen_image"} <= set(examples)
    simple, advanced = examples["vae_finetune"], examples["vae_finetune_advanced"]
    for name, prompt in examples.items():
        assert all(n["_meta"]["title"] for n in prompt.values()), name
        by_type = {n["class_type"]: n["inputs"] for n in prompt.values()}
        if "VAEFTFineTune" not in by_type:  # a template that uses a fine-tune (the compare one): checked below
            continue
        has_options = "VAEFTFineTuneOptions" in by_type
        links = {"options"} if has_options else set()
        assert set(by_type["VAEFTFineTune"]) == (_node_fields(TrainConfig, True) | {"vae", "dataset", "run_name",
                                                                                     "continue_run"} | links)
        assert set(by_type["VAEFTPatchDataset"]) == _node_fields(DataConfig, True) | {"folder", "mask_folder"} | links
        assert set(by_type["VAEFTSave"]) == {"trained", "name", "dtype", "overwrite", "format", "family"}
        if has_options:
            assert set(by_type["VAEFTFineTuneOptions"]) == _node_fields(TrainConfig, False)
            assert set(by_type["VAEFTPatchOptions"]) == _node_fields(DataConfig, False, ("mask_dir",))
        # every link points at an existing node
        for node in prompt.values():
            for v in node["inputs"].values():
                if isinstance(v, list):
                    assert v[0] in prompt
    # defaults are the recipe's, so the example is the sd-vae-ft-mse recipe as published
    ft = {n["class_type"]: n["inputs"] for n in advanced.values()}
    opts, main = ft["VAEFTFineTuneOptions"], ft["VAEFTFineTune"]
    assert (main["recipe"], opts["mse_weight"], opts["lpips_weight"], main["trainable"], opts["ema"]) == \
        ("sd-vae-ft-mse", 1.0, 0.1, "decoder", True)
    # the simple example is the advanced one without the options, Evaluate and its preview
    for k, node in simple.items():
        assert {n: v for n, v in advanced[k]["inputs"].items() if n != "options"} == node["inputs"], k
    # a family's template is the simple one for that family's VAE: the same graph and settings, its own base
    # file (the name ComfyUI's own templates give it), run and save names, and titles that say what it is for
    for name, vae, label in (("vae_finetune_qwen_image", "qwen_image_vae.safetensors", "Qwen-Image"),
                             ("vae_finetune_flux2", "flux2-vae.safetensors", "Flux.2"),
                             ("vae_finetune_wan22", "wan2.2_vae.safetensors", "Wan 2.2"),
                             ("vae_finetune_qwen_image21", "qwen_image_2.1_vae_bf16.safetensors", "Qwen-Image 2.1")):
        family = examples[name]
        assert {k: (n["class_type"], set(n["inputs"])) for k, n in family.items()} == \
            {k: (n["class_type"], set(n["inputs"])) for k, n in simple.items()}, name
        assert {(k, i) for k, n in family.items() for i, v in n["inputs"].items() if simple[k]["inputs"][i] != v} == \
            {("1", "vae_name"), ("3", "run_name"), ("4", "name")}, name
        assert family["1"]["inputs"]["vae_name"] == vae
        assert all(label in family[k]["_meta"]["title"] for k in ("1", "3", "4")), name

    # the compare template: the base the simple template starts from beside the file its Save node writes
    # (vae-ft-<name>-<steps>), on a latent Save Latent wrote, every input of the node named
    compare = {n["class_type"]: n for n in examples["vae_compare_on_latents"].values()}
    loaders = [n["inputs"]["vae_name"] for n in examples["vae_compare_on_latents"].values() if n["class_type"] == "VAELoader"]
    save = {n["class_type"]: n["inputs"] for n in simple.values()}
    steps = next(n["inputs"]["steps"] for n in simple.values() if n["class_type"] == "VAEFTFineTune")
    assert loaders == [simple["1"]["inputs"]["vae_name"], f"vae-ft-{save['VAEFTSave']['name']}-{steps}.safetensors"]
    assert set(compare["VAEFTCompareOnLatents"]["inputs"]) == {"base", "tuned", "latent", "limit", "half_precision",
                                                               "lpips_net"}
    assert compare["LoadLatent"]["inputs"]["latent"].endswith(".latent")
    assert compare["PreviewImage"]["inputs"]["images"][0] in examples["vae_compare_on_latents"]

    # the distil template: the simple template's base as the teacher and its dataset, one distil node per student
    # (every input named, the student's own run name), each with its loss curve
    distil = examples["vae_distil_decoder"]
    by_type = {}
    for node in distil.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert by_type["VAELoader"] == [simple["1"]["inputs"]] and by_type["VAEFTPatchDataset"] == [simple["2"]["inputs"]]
    students = by_type["VAEFTDistilDecoder"]
    assert [d["student"] for d in students] == ["narrow", "tiny"] and students[0]["width"] == 64
    essential = _node_fields(TrainConfig, True) - {"recipe", "trainable"}
    for d in students:
        assert set(d) == essential | _node_fields(DistilConfig, True) | _node_fields(DistilConfig, False) | {
            "teacher", "dataset", "image_weight", "family", "save_name", "run_name", "continue_run"}
        assert d["run_name"] == f"vae-distil-{d['student']}" and d["teacher"][0] == "1"
        assert d["lr"] == 0.0  # the student's recipe lr
    assert sorted(g["loss"][0] for g in by_type["VAEFTLossGraph"]) == sorted(
        k for k, n in distil.items() if n["class_type"] == "VAEFTDistilDecoder")


def test_ui_templates_match_the_api_examples_and_have_jpeg_thumbnails():
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(TEMPLATES, "*.json")))
    assert names == _api_names()
    assert {"vae_finetune", "vae_finetune_advanced", "vae_finetune_flux2", "vae_finetune_qwen_image",
            "vae_finetune_wan22", "vae_finetune_qwen_image21", "vae_compare_on_latents",
            "vae_distil_decoder"} <= set(names)
    for name in names:
        with open(os.path.join(TEMPLATES, name + ".json")) as f:
            ui = json.load(f)
        api = _api(name)
        assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
        assert {str(n["id"]): n["title"] for n in ui["nodes"]} == {k: v["_meta"]["title"] for k, v in api.items()}
        with Image.open(os.path.join(TEMPLATES, name + ".jpg")) as thumb:
            assert thumb.format == "JPEG" and min(thumb.size) >= 200, (name, thumb.format, thumb.size)


def test_no_api_format_file_among_the_templates():
    """ComfyUI serves every example_workflows/*.json as a UI template; an API-format one would be a broken
    template (a UI workflow has a "nodes" list)."""
    for path in glob.glob(os.path.join(TEMPLATES, "*.json")):
        with open(path) as f:
            assert isinstance(json.load(f).get("nodes"), list), path
