import pytest
import torch
from safetensors.torch import save_file

from conftest import SD_VAE_CONFIG, tiny_diffusers_vae, tiny_ldm_sd
from training.errors import VAEFTError
from training.families.klf8 import config_from_ldm
from training.families.ldm import diffusers_to_ldm, ldm_to_diffusers
from training.vae import build_vae, load_vae, model_to_file


@pytest.mark.parametrize("latent,quant", [(4, True), (16, False)])
def test_round_trip_is_bit_exact(latent, quant):
    ldm = tiny_ldm_sd(latent, quant)
    back = diffusers_to_ldm(ldm_to_diffusers(ldm), {k: tuple(v.shape) for k, v in ldm.items()})
    assert list(back) == list(ldm) or set(back) == set(ldm)
    for k in ldm:
        assert back[k].shape == ldm[k].shape
        assert torch.equal(back[k], ldm[k]), k


@pytest.mark.parametrize("latent,quant", [(4, True), (16, False)])
def test_config_read_off_shapes(latent, quant):
    loaded = build_vae(tiny_ldm_sd(latent, quant))
    cfg = loaded.model.config
    assert cfg.latent_channels == latent
    assert list(cfg.block_out_channels) == [32, 64]
    assert cfg.layers_per_block == 1
    assert cfg.use_quant_conv is quant and cfg.use_post_quant_conv is quant
    # the built model reproduces the diffusers model it came from, exactly
    ref = tiny_diffusers_vae(latent, quant)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = ref.decode(ref.encode(x).latent_dist.mode()).sample
        b = loaded.model.decode(loaded.model.encode(x).latent_dist.mode()).sample
    assert torch.equal(a, b)


def test_full_size_sd_layout_has_stock_ldm_keys():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL(**SD_VAE_CONFIG)
    ldm = diffusers_to_ldm(ref.state_dict())
    assert len(ldm) == 248
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ldm["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["quant_conv.weight"].shape == (8, 8, 1, 1)
    cfg = config_from_ldm(ldm)
    assert cfg["block_out_channels"] == [128, 256, 512, 512] and cfg["layers_per_block"] == 2


def test_diffusers_keyed_input_and_old_attention_names():
    dsd = tiny_diffusers_vae().state_dict()
    loaded = build_vae(dict(dsd))
    assert loaded.layout.shapes["encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
           .replace("to_out.0", "proj_attn"): v for k, v in dsd.items()}
    loaded_old = build_vae(old)
    for k, v in model_to_file(loaded_old.model, loaded_old.layout).items():
        assert torch.equal(v, model_to_file(loaded.model, loaded.layout)[k])


def test_export_keeps_matrix_attention_layout_and_drops_loss_keys():
    ldm = tiny_ldm_sd()
    for k in list(ldm):
        if ".attn_1." in k and k.endswith("weight") and ldm[k].ndim == 4:
            ldm[k] = ldm[k][:, :, 0, 0].clone()  # some converted checkpoints store these as matrices
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(2)
    loaded = build_vae(ldm)
    assert loaded.layout.dropped_keys == ["loss.discriminator.main.0.weight"]
    out = model_to_file(loaded.model, loaded.layout)
    del ldm["loss.discriminator.main.0.weight"]
    assert set(out) == set(ldm)
    assert all(out[k].shape == ldm[k].shape and torch.equal(out[k], ldm[k]) for k in ldm)


def test_not_a_vae_is_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(path))
    with pytest.raises(VAEFTError, match="not a kl-f8 VAE"):
        load_vae(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(VAEFTError, match="cannot read VAE file"):
        load_vae(junk)
    with pytest.raises(VAEFTError, match="does not exist"):
        load_vae(tmp_path / "missing.safetensors")


def test_load_vae_from_file(tiny_vae_file):
    loaded = load_vae(tiny_vae_file)
    assert loaded.layout.base_name == "tiny_vae.safetensors"
    assert len(loaded.layout.base_sha256) == 64
    assert not any(p.requires_grad for p in loaded.model.parameters())


# ---------------------------------------------------------------------------------------------
# Hostile base files (issue 15): refused at load with a message naming the problem, file untouched


def test_non_finite_base_is_refused_naming_the_tensors(tmp_path):
    sd = tiny_ldm_sd()
    poisoned = ["decoder.conv_in.weight", "decoder.conv_out.bias", "encoder.conv_in.weight",
                "decoder.mid.attn_1.q.weight", "quant_conv.weight", "post_quant_conv.bias"]
    for i, k in enumerate(poisoned):
        sd[k].view(-1)[i % 4] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    path = tmp_path / "nan_vae.safetensors"
    save_file(sd, str(path))
    before = path.read_bytes()
    with pytest.raises(VAEFTError) as e:
        load_vae(path)
    msg = str(e.value)
    assert f"holds NaN or infinite weights in 6 of {len(sd)} tensors" in msg
    shown = [k for k in poisoned if k in msg]
    assert len(shown) == 4 and "and 2 more" in msg
    assert "use another copy of the base VAE" in msg
    assert path.read_bytes() == before
    half = {k: v.half() for k, v in tiny_ldm_sd().items()}  # fp16 files are checked the same way
    half["decoder.conv_out.weight"].view(-1)[0] = float("inf")
    with pytest.raises(VAEFTError, match=r"in 1 of \d+ tensors \(decoder\.conv_out\.weight\)"):
        build_vae(half, "half.safetensors")


@pytest.mark.parametrize("quant", [True, False])
def test_encoder_and_decoder_latent_channels_must_match(quant):
    """An 8-channel encoder with a 4-channel decoder: named before load_state_dict (whose
    size-mismatch RuntimeError names neither the file nor the cause)."""
    eight, four = tiny_ldm_sd(8, quant), tiny_ldm_sd(4, quant)
    mixed = {k: (eight[k] if k.startswith(("encoder.", "quant_conv.")) else four[k]) for k in four}
    with pytest.raises(VAEFTError) as e:
        build_vae(mixed, "mixed.safetensors")
    maker, taker = ("quant_conv", "post_quant_conv") if quant else ("encoder.conv_out", "decoder.conv_in")
    assert str(e.value).startswith(f"mixed.safetensors: the encoder and decoder do not fit together: {maker} makes "
                                   f"8 latent channels (as 16 = mean + log-variance) but {taker} takes 4")
    assert "use one complete VAE file" in str(e.value)
    # the other way round, and with the quant conv of the other half
    mixed = {k: (four[k] if k.startswith("encoder.") else eight[k]) for k in four}
    with pytest.raises(VAEFTError, match="do not fit together"):
        build_vae(mixed, "mixed.safetensors")


def test_any_shape_mismatch_is_named_with_ldm_keys():
    sd = tiny_ldm_sd()
    sd["decoder.mid.block_1.conv1.weight"] = sd["decoder.mid.block_1.conv1.weight"][:, :32].clone()
    with pytest.raises(VAEFTError, match=r"bad\.safetensors: 1 tensor\(s\) have shapes .*"
                                         r"decoder\.mid\.block_1\.conv1\.weight \(64, 32, 3, 3\) "
                                         r"\(expected \(64, 64, 3, 3\)\)"):
        build_vae(sd, "bad.safetensors")


def test_vae_path_that_is_not_a_regular_file(tmp_path):
    import os
    import threading

    with pytest.raises(VAEFTError, match="is a folder, not a regular file"):
        load_vae(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "vae.safetensors"
        os.mkfifo(fifo)
        result = []
        t = threading.Thread(target=lambda: result.append(pytest.raises(VAEFTError, load_vae, fifo)), daemon=True)
        t.start()
        t.join(30)
        if t.is_alive():  # unblock the reader so the test fails instead of hanging
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("load_vae blocked on a FIFO")
        assert "is a named pipe (FIFO), not a regular file" in str(result[0].value)
        os.unlink(fifo)
        os.symlink("/dev/zero", fifo)
        with pytest.raises(VAEFTError, match=r"is a link to a character device \(/dev/zero\)"):
            load_vae(fifo)


def test_pickle_payload_in_a_ckpt_never_runs(tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"decoder.conv_in.weight": Payload()}}, f, protocol=2)
    before = path.read_bytes()
    with pytest.raises(VAEFTError, match="cannot read VAE file"):
        load_vae(path)
    assert not marker.exists()
    assert path.read_bytes() == before
