import copy
import itertools
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_ldm_sd, train
from training import export as export_mod
from training.config import TrainConfig
from training.errors import VAEFTError
from training.export import export_filename, export_vae, safe_name
from training.tensors import sha256
from training.vae import build_vae


@pytest.fixture(scope="module")
def trained():
    base_sd = tiny_ldm_sd()
    vae = build_vae(dict(base_sd), source="/models/base.safetensors")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, lpips_weight=0.0, log_every=1, preview_every=0)
    return base_sd, train(vae, itertools.repeat(x), cfg, device="cpu")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def test_export_has_base_keys_shapes_and_untouched_encoder(tmp_path, trained):
    base_sd, result = trained
    result = copy.copy(result)
    result.dataset = {"images_used": ["a", "b"], "train_images": 2}
    report = export_vae(result, tmp_path / "vae-ft-x-2.safetensors")
    out = load_file(report.path)
    assert set(out) == set(base_sd)
    for k, v in base_sd.items():  # default dtype = the base's (fp32 here): the frozen part is byte for byte the base
        assert out[k].shape == v.shape and out[k].dtype == torch.float32
        if k.startswith(("encoder.", "quant_conv.")):
            assert _same_bytes(out[k], v), k
    assert not torch.equal(out["decoder.conv_out.weight"], base_sd["decoder.conv_out.weight"])
    assert report.frozen_identical is True and report.warnings == []
    assert "bit-identical to the base file" in report.text()
    with safe_open(report.path, "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.recipe"] == "custom (from sd-vae-ft-mse: lpips_weight)"
    assert meta["vaeft.steps"] == "2" and meta["vaeft.weights"] == "ema"
    assert meta["vaeft.base_sha256"] == sha256(base_sd)
    assert meta["vaeft.base_name"] == "base.safetensors"
    assert meta["vaeft.config.lr"] == "0.001" and meta["vaeft.dtype"] == "base"
    assert json.loads(meta["vaeft.stored_dtypes"]) == {"fp32": len(base_sd)}
    assert meta["vaeft.frozen_identical"] == "true"
    ds = json.loads(meta["vaeft.dataset"])
    assert (ds["images"], ds["train_images"], len(ds["files_sha256"])) == (2, 2, 64)


def _mixed(sd):
    """A base stored in three dtypes: encoder fp16, decoder bf16, the rest fp32."""
    return {k: v.half() if k.startswith("encoder.") else v.bfloat16() if k.startswith("decoder.") else v.clone()
            for k, v in sd.items()}


def test_default_dtype_is_the_base_files_per_tensor(tmp_path):
    base_sd = _mixed(tiny_ldm_sd(seed=3))
    vae = build_vae(dict(base_sd))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=2, lr=1e-2, batch_size=2, lpips_weight=0.0, preview_every=0, ema=False)
    result = train(vae, itertools.repeat(x), cfg, device="cpu")
    report = export_vae(result, tmp_path / "v.safetensors")
    out = load_file(report.path)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in base_sd.items()}
    for k in base_sd:
        if k.startswith(("encoder.", "quant_conv.")):
            assert _same_bytes(out[k], base_sd[k]), k
    assert not torch.equal(out["decoder.conv_out.weight"], base_sd["decoder.conv_out.weight"])
    assert report.stored_dtypes == {"fp16": sum(k.startswith("encoder.") for k in base_sd),
                                    "bf16": sum(k.startswith("decoder.") for k in base_sd),
                                    "fp32": sum(k.startswith(("quant_conv.", "post_quant_conv.")) for k in base_sd)}
    assert report.frozen_identical and not report.warnings
    # fp32 on request: every value exact (wider), but the bytes are no longer the base file's
    wide = export_vae(result, tmp_path / "w.safetensors", dtype="fp32")
    assert wide.frozen_identical is False and not wide.warnings and "values exact" in wide.text()
    # bf16 on request rounds the fp16 encoder: said in the report and the metadata
    narrow = export_vae(result, tmp_path / "n.safetensors", dtype="bf16")
    assert narrow.frozen_identical is False
    assert len(narrow.warnings) == 1 and "bf16 export rounds" in narrow.warnings[0]
    assert "dtype 'base'" in narrow.warnings[0] and "WARNING: bf16 export rounds" in narrow.text()
    with safe_open(narrow.path, "pt") as f:
        assert f.metadata()["vaeft.frozen_identical"] == "false"


def test_requested_fp16_from_an_fp32_base_says_it_rounds(tmp_path, trained):
    report = export_vae(trained[1], tmp_path / "h.safetensors", dtype="fp16")
    assert {v.dtype for v in load_file(report.path).values()} == {torch.float16}
    assert report.frozen_identical is False
    assert report.warnings and report.warnings[0].startswith("fp16 export rounds")


def test_the_frozen_check_compares_with_the_base_file_in_its_dtype(tmp_path):
    """Training that starts from weights which are not the file's (here: one encoder value changed after
    loading) passes the check against the fp32 copy training started from, and is still caught: the
    untrained tensors are compared with the base file's own bytes, in its dtype (bf16 here)."""
    base_sd = {k: v.bfloat16() for k, v in tiny_ldm_sd(seed=4).items()}
    vae = build_vae(dict(base_sd))
    with torch.no_grad():
        vae.model.encoder.conv_in.weight[0, 0, 0, 0] += 0.25
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=1, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0)
    result = train(vae, itertools.repeat(x), cfg, device="cpu")
    with pytest.raises(VAEFTError, match=r"untrained tensors differ from the base file \(encoder\.conv_in\.weight\)"):
        export_vae(result, tmp_path / "v.safetensors")
    assert os.listdir(tmp_path) == []


def test_exported_file_has_the_usual_permissions(tmp_path, trained):
    old = os.umask(0o022)
    try:
        path = export_vae(trained[1], tmp_path / "v.safetensors").path
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_export_dtypes(tmp_path, trained, dtype, torch_dtype):
    out = load_file(export_vae(trained[1], tmp_path / "v.safetensors", dtype=dtype).path)
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
    import training.export

    def broken(tensors, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.export, "save", broken)  # safetensors' serialiser, as export calls it
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
        export_mod.file_state_dict(trained[1], "int8")


def test_matrix_form_attention_is_exported_as_1x1_convs(tmp_path):
    from training.vae import load_vae

    conv = tiny_ldm_sd(seed=5)
    attn = [k for k in conv if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k)]
    assert len(attn) == 8 and all(conv[k].ndim == 4 for k in attn)  # encoder and decoder mid-block attention
    matrix = {k: v[:, :, 0, 0].clone() if k in attn else v for k, v in conv.items()}
    vae = build_vae(dict(matrix))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=1, lr=1e-3, batch_size=2, lpips_weight=0.0, preview_every=0)
    result = train(vae, itertools.repeat(x), cfg, device="cpu")
    report = export_vae(result, tmp_path / "v.safetensors")
    out = load_file(report.path)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in conv.items()}
    for k in attn:
        if k.startswith("encoder."):  # untrained: the same bytes, now in conv form
            assert _same_bytes(out[k], conv[k]), k
    assert report.frozen_identical is True
    assert any("8 attention weights as matrices" in n for n in report.notes)
    with safe_open(report.path, "pt") as f:
        assert f.metadata()["vaeft.attention_form"] == "1x1 conv (converted from the base's matrices)"
    # and it is the same model
    again = load_vae(report.path).model.state_dict()
    for k, v in result.model.state_dict().items():
        assert torch.equal(again[k], v), k
    # a conv-form base says so too
    plain = export_vae(result.__class__(**{**result.__dict__, "layout": build_vae(dict(conv)).layout}),
                       tmp_path / "c.safetensors")
    with safe_open(plain.path, "pt") as f:
        assert f.metadata()["vaeft.attention_form"] == "1x1 conv"
