"""Which settings sit on the main nodes (field metadata, not a second declaration) and the memory
presets that size micro-batch, checkpointing and latent cache — without ComfyUI."""

import dataclasses

import pytest

from training.config import MEMORY_FIELDS, MEMORY_PRESETS, TrainConfig, memory_settings
from training.config import DataConfig
from training.errors import VAEFTError
from training.options import is_essential

from conftest import run_with_node_modules


def _essential(cls):
    return [f.name for f in dataclasses.fields(cls) if is_essential(f)]


def test_the_main_nodes_are_short_and_the_split_is_field_metadata():
    # VAE Fine-tune: these widgets plus two sockets and the options socket; room for two run/continue widgets
    assert set(_essential(TrainConfig)) == {"recipe", "steps", "lr", "batch_size", "memory", "trainable", "seed"}
    assert len(_essential(TrainConfig)) + 2 <= 10
    assert set(_essential(DataConfig)) == {"patch_size", "sampling", "foreground_threshold", "val_fraction", "seed"}
    # every setting still has one declaration: nothing essential is also hidden from the node
    for cls in (TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert not (is_essential(f) and f.metadata.get("node") is False), f.name


@pytest.mark.parametrize("preset", list(MEMORY_PRESETS))
def test_memory_presets_pick_a_micro_batch_that_divides_the_batch_and_fits_the_budget(preset):
    p = MEMORY_PRESETS[preset]
    for patch in (64, 256, 512, 1024):
        for batch in range(1, 17):
            got = memory_settings(preset, batch, patch)
            assert set(got) == set(MEMORY_FIELDS)
            assert (got["grad_checkpointing"], got["latent_cache_mb"]) == (p.grad_checkpointing, p.latent_cache_mb)
            micro = got["micro_batch"]
            if p.patches_512 is None:
                assert micro == 0  # the trainer's largest-that-fits search
                continue
            assert batch % micro == 0
            assert micro == 1 or micro * patch * patch <= p.patches_512 * 512 * 512
            # the largest such divisor
            assert not any(batch % d == 0 and d * patch * patch <= p.patches_512 * 512 * 512
                           for d in range(micro + 1, batch + 1))


def test_memory_preset_values_for_the_usual_cases():
    # batch 8 of 512² patches (bench/RESULTS.md's case): 6 GB one at a time, 8 GB two, 12 GB four with
    # checkpointing (6.3 GiB measured), 24 GB four without (12.5 GiB measured)
    assert [memory_settings(m, 8, 512)["micro_batch"] for m in ("6GB", "8GB", "12GB", "24GB+")] == [1, 2, 4, 4]
    assert [memory_settings(m, 4, 256)["micro_batch"] for m in ("6GB", "8GB", "12GB", "24GB+")] == [4, 4, 4, 4]
    with pytest.raises(VAEFTError, match="unknown memory preset 'huge'; choose one of auto, 6GB"):
        memory_settings("huge", 4, 256)


def test_from_recipe_applies_the_preset_under_explicit_values():
    c = TrainConfig.from_recipe("sd-vae-ft-mse", 512, memory="8GB", batch_size=8)
    assert (c.micro_batch, c.grad_checkpointing, c.latent_cache_mb) == (2, True, 512)
    c = TrainConfig.from_recipe("sd-vae-ft-mse", 512, memory="8GB", batch_size=8, micro_batch=4,
                                grad_checkpointing=False)
    assert (c.micro_batch, c.grad_checkpointing, c.latent_cache_mb) == (4, False, 512)
    # no patch size given: DataConfig's default (256²) sizes it
    c = TrainConfig.from_recipe("sd-vae-ft-mse", memory="6GB", batch_size=8)
    assert c.micro_batch == 4
    # "auto" is the defaults as they were: micro-batch found by the trainer, no checkpointing
    auto = TrainConfig.from_recipe("sd-vae-ft-mse")
    assert (auto.memory, auto.micro_batch, auto.grad_checkpointing, auto.latent_cache_mb) == ("auto", 0, False, 2048)
    assert auto.recipe_label() == "sd-vae-ft-mse"


def test_cli_memory_flag_is_sized_for_the_patch_size():
    import argparse

    from training.cli import add_fit_command, config_from_args

    parser = argparse.ArgumentParser()
    add_fit_command(parser.add_subparsers())
    base = ["fit", "--vae", "v.safetensors", "--data", "d", "--out", "o.safetensors"]
    args = parser.parse_args(base + ["--memory", "8GB", "--patch-size", "512", "--batch-size", "8"])
    c = config_from_args(args)
    assert (c.memory, c.micro_batch, c.grad_checkpointing, c.latent_cache_mb) == ("8GB", 2, True, 512)
    args = parser.parse_args(base + ["--memory", "8GB", "--batch-size", "8", "--micro-batch", "8"])
    assert config_from_args(args).micro_batch == 8
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--memory", "4GB"])


def test_the_distil_node_lr_is_the_students_recipe_lr_at_0_and_overrides_it_above():
    """VAE Distil Decoder's lr (right after steps): 0, its default, takes the student's recipe lr (distil-narrow
    1e-4, distil-tiny 5e-4); a value above 0 reaches TrainConfig, TrainConfig's own default 1e-5 too. Run in a
    fresh interpreter with ComfyUI's comfy_api importable (nodes/common.py imports it), as test_rgba does."""
    run_with_node_modules("""
distil = importlib.import_module("vaeftpack.nodes.distil")
lr = lambda student, **w: distil.distil_train_config(dict(steps=10, **w), student, 64).lr
assert (lr("narrow", lr=0.0), lr("tiny", lr=0.0), lr("narrow"), lr("tiny")) == (1e-4, 5e-4, 1e-4, 5e-4)
assert (lr("narrow", lr=3e-4), lr("tiny", lr=3e-4), lr("tiny", lr=1e-5)) == (3e-4, 3e-4, 1e-5)
inputs = distil.VAEDistilDecoder.define_schema().inputs
ids = [i.id for i in inputs]
assert ids[ids.index("steps") + 1] == "lr", ids
spec = inputs[ids.index("lr")].as_dict()
assert (spec["default"], spec["min"], spec["max"]) == (0.0, 0.0, 1.0) and spec["step"] <= 1e-6, spec
assert spec["tooltip"].startswith("peak learning rate") and "0: the student's recipe lr" in spec["tooltip"], spec
print("OK")
""")
