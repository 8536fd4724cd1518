"""The family contract, proved once over every registered family (``training.families.FAMILIES``): each
layout it reads is recognised and read back exactly, it builds, trains a step and exports a file in the
base's layout and dtypes whose untrained tensors are byte-identical, its diffusers folder loads with the
family's own diffusers class holding exactly our weights, damaged and mixed files are refused naming the
file, and every user-facing list names it. Family files' own tests keep only what is truly theirs."""

from __future__ import annotations

import itertools
import json
import os

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, train
from family_examples import EXAMPLES
from training.cli import build_parser
from training.config import TrainConfig
from training.errors import VAEFTError
from training.export import export_vae
from training.families import FAMILIES, recognise, trained
from training.probe import make_probe
from training.vae import build_vae, load_vae

pytestmark = pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])


def _example(family):
    if family.name not in EXAMPLES:
        pytest.fail(f"family {family.name!r} is registered but has no example in tests/family_examples.py: "
                    "add one, and the contract test covers it")
    return EXAMPLES[family.name]


def _module_layout(family, sd: dict) -> dict:
    """The same tensors under the module's (diffusers') names and shapes."""
    model, keys = family.build(sd)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {keys[k]: v.reshape(shapes[keys[k]]) for k, v in sd.items()}


def _images(family, n=4, seed=0):
    size, channels = _example(family).image_size, _example(family).channels
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_every_layout_it_reads_is_recognised_and_read_back_exactly(family):
    sd = _example(family).file(0)
    layouts = {"file": sd, "diffusers": _module_layout(family, sd), **_example(family).other_layouts(sd)}
    # a full checkpoint: its VAE part only, whatever else it holds (a video UNet's time_stack, a text encoder's
    # BatchNorm, a diffusion model's own "decoder" neither mark it as another family nor get read)
    others = {"model.diffusion_model.input_blocks.1.time_stack.0.proj_in.weight": torch.zeros(4, 4),
              "conditioner.embedders.1.model.bn.running_mean": torch.zeros(8),
              "model.diffusion_model.decoder.conv_in.weight": torch.zeros(2, 2)}
    for prefix in ("first_stage_model.", "vae."):
        layouts[f"checkpoint {prefix}"] = {**others, **{prefix + k: v for k, v in sd.items()}}
    for name, tensors in layouts.items():
        found, file_sd, dropped = recognise(tensors, f"{name}.safetensors")
        assert found is family, name
        assert set(file_sd) == set(sd) and dropped == [], name
        for k, v in sd.items():
            assert torch.equal(file_sd[k].reshape(v.shape), v), (name, k)


@pytest.fixture(scope="module")
def trained_step():
    """One training step of each family's example, taken once per family for this module's tests."""
    return {}


def _trained(family, cache):
    if family.name not in cache:
        sd = _example(family).file(1)
        base = build_vae(sd, source=f"{family.name}-base.safetensors")
        x = _images(family)
        cfg = TrainConfig(steps=1, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0)
        cache[family.name] = (sd, base, train(base, itertools.repeat(x[:2]), cfg, device="cpu",
                                              probe=make_probe(base, x)))
    return cache[family.name]


def test_a_step_trains_and_the_export_is_the_base_file_with_a_new_decoder(family, tmp_path, trained_step):
    sd, base, result = _trained(family, trained_step)
    assert base.family is family and base.model.vaeft_family is family
    report = export_vae(result, tmp_path / "vae-ft-contract-1.safetensors")
    out = load_file(report.path)
    assert set(out) == set(sd)
    assert all(out[k].shape == sd[k].shape and out[k].dtype == sd[k].dtype for k in sd)
    keys = base.layout.module_keys
    frozen = [k for k in sd if not trained(keys[k], "decoder", family)]
    changed = [k for k in sd if k not in frozen and not torch.equal(out[k], sd[k])]
    assert frozen and changed, "a decoder-only step leaves the encoder and moves the decoder"
    for k in frozen:
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), sd[k].contiguous().reshape(-1).view(torch.uint8)), k
    assert report.frozen_identical is True
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.vae_family"] == family.name
    # it loads back as the same family, and encodes exactly as the base
    again = load_vae(report.path)
    assert again.family is family
    x = _images(family, 1, seed=9)
    assert torch.equal(again.model.encode(x).latent_dist.mean, base.model.encode(x).latent_dist.mean)


def test_its_diffusers_folder_loads_with_the_familys_own_class_holding_our_weights(family, tmp_path, trained_step):
    _, _, result = _trained(family, trained_step)
    folder = tmp_path / "vae-ft-contract-1"
    export_vae(result, folder, format="diffusers", dtype="fp32")
    named = json.loads((folder / "config.json").read_text())["_class_name"]  # the class the folder names
    assert named in family.diffusers_classes.split(" / ")
    cls = getattr(diffusers, named)
    model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    ours = result.model.state_dict()
    theirs = model.state_dict()
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k].to(v.dtype), v), k


def test_damaged_and_mixed_files_are_refused_naming_the_file(family, tmp_path):
    sd = _example(family).file(2)
    model, keys = family.build(sd)
    by_module = {m: f for f, m in keys.items()}
    last, first = by_module["decoder.conv_out.weight"], by_module["decoder.conv_in.weight"]
    nan = dict(sd)
    nan[last] = sd[last].clone()
    nan[last].view(-1)[0] = float("nan")
    mixed = dict(sd)
    w = sd[first]
    mixed[first] = torch.cat([w, w], dim=1)  # a decoder taking twice the latent channels the encoder makes
    bias = by_module["decoder.conv_out.bias"]
    # a missing tensor is named as the user's file names it (not as the module does)
    cases = {"nan": (nan, "NaN or infinite"), "missing": ({k: v for k, v in sd.items() if k != last}, last),
             "missing-bias": ({k: v for k, v in sd.items() if k != bias}, bias), "mixed": (mixed, None)}
    for name, (tensors, says) in cases.items():
        path = tmp_path / f"{name}-{family.name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        before = path.read_bytes()
        with pytest.raises(VAEFTError) as e:
            load_vae(path)
        assert path.name in str(e.value), (name, str(e.value))
        assert says is None or says in str(e.value), (name, str(e.value))
        assert path.read_bytes() == before


def test_every_user_facing_list_names_it(family):
    parser = build_parser()
    assert family.label in parser.description
    helps = {a.dest: a.help for a in parser.fit_parser._actions}  # the texts as written, before argparse wraps them
    assert family.label in helps["vae"] and family.diffusers_classes in helps["format"]
    assert family.short in helps["family"]
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:  # the Comfy Registry's description
        assert family.short in next(line for line in f if line.startswith("description"))
    with pytest.raises(VAEFTError) as e:  # a refusal lists what this version trains
        recognise({"unet.conv.weight": torch.zeros(1)}, "unet.safetensors")
    assert family.label in str(e.value) and family.files in str(e.value)


def test_an_encoder_of_another_family_is_refused_naming_the_file(family, tmp_path):
    """This family's decoder with another family's encoder in one file: refused with the pack's error naming
    the file, whichever family the reader takes it for."""
    decoder = {k: v for k, v in _example(family).file(3).items() if not k.startswith("encoder.")}
    for other in FAMILIES:
        if other is family:
            continue
        encoder = {k: v for k, v in _example(other).file(3).items() if k.startswith("encoder.")}
        path = tmp_path / f"{other.name}-encoder-{family.name}-decoder.safetensors"
        save_file({k: v.contiguous() for k, v in {**encoder, **decoder}.items()}, str(path))
        with pytest.raises(VAEFTError) as e:
            load_vae(path)
        assert path.name in str(e.value), (other.name, str(e.value))
