import itertools
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_ldm_sd
from training import export as export_mod
from training.config import TrainConfig
from training.errors import VAEFTError
from training.export import export_filename, export_vae, safe_name
from training.trainer import fine_tune
from training.vae import build_vae, state_dict_sha256


@pytest.fixture(scope="module")
def trained():
    base_sd = tiny_ldm_sd()
    vae = build_vae(dict(base_sd), source="/models/base.safetensors")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, log_every=1, preview_every=0)
    return base_sd, fine_tune(vae, itertools.repeat(x), cfg, device="cpu")


def test_export_has_base_keys_shapes_and_untouched_encoder(tmp_path, trained):
    base_sd, result = trained
    path = export_vae(result, tmp_path / "vae-ft-x-2.safetensors", dataset_summary={"images_used": ["a", "b"],
                                                                                      "train_images": 2})
    out = load_file(path)
    assert set(out) == set(base_sd)
    for k, v in base_sd.items():
        assert out[k].shape == v.shape and out[k].dtype == torch.float16
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(out[k], v.half()), k
    assert not torch.equal(out["decoder.conv_out.weight"], base_sd["decoder.conv_out.weight"].half())
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.recipe"] == "custom (from sd-vae-ft-mse: lpips_weight)"
    assert meta["vaeft.steps"] == "2" and meta["vaeft.weights"] == "ema"
    assert meta["vaeft.base_sha256"] == state_dict_sha256(base_sd)
    assert meta["vaeft.base_name"] == "base.safetensors"
    assert meta["vaeft.config.lr"] == "0.001" and meta["vaeft.dtype"] == "fp16"
    assert json.loads(meta["vaeft.dataset"]) == {"images_used": 2, "train_images": 2}


def test_exported_file_has_the_usual_permissions(tmp_path, trained):
    old = os.umask(0o022)
    try:
        path = export_vae(trained[1], tmp_path / "v.safetensors")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_export_dtypes(tmp_path, trained, dtype, torch_dtype):
    out = load_file(export_vae(trained[1], tmp_path / "v.safetensors", dtype=dtype))
    assert {v.dtype for v in out.values()} == {torch_dtype}


def test_never_overwrites_unless_asked(tmp_path, trained):
    path = tmp_path / "vae-ft-x-2.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(VAEFTError, match="already exists"):
        export_vae(trained[1], path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["vae-ft-x-2.safetensors"]
    export_vae(trained[1], path, overwrite=True)
    assert set(load_file(path)) == set(trained[0])


def test_failed_write_leaves_nothing(tmp_path, trained, monkeypatch):
    import safetensors.torch

    def broken(tensors, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(VAEFTError, match="No space left on device"):
        export_vae(trained[1], tmp_path / "v.safetensors")
    assert os.listdir(tmp_path) == []


def test_missing_output_folder(tmp_path, trained):
    with pytest.raises(VAEFTError, match="does not exist"):
        export_vae(trained[1], tmp_path / "no" / "v.safetensors")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "", "  ", "/etc/passwd", ".hidden", "a\\b"])
def test_save_names_cannot_leave_the_folder(bad):
    with pytest.raises(VAEFTError):
        safe_name(bad)


def test_export_filename():
    assert export_filename("fundus", 2000) == "vae-ft-fundus-2000.safetensors"
    assert export_filename("vae-ft-retina v2", 10) == "vae-ft-retina_v2-10.safetensors"
    assert export_filename("x.safetensors", 5) == "vae-ft-x-5.safetensors"
    assert export_filename("vae-ft-", 7) == "vae-ft-7.safetensors"


def test_dtype_is_checked(trained):
    with pytest.raises(VAEFTError, match="dtype"):
        export_mod.ldm_state_dict(trained[1], "int8")
