import pytest
import torch
from safetensors.torch import save_file

from conftest import SD_VAE_CONFIG, tiny_diffusers_vae, tiny_ldm_sd
from training.errors import VAEFTError
from training.vae import (build_vae, config_from_ldm, diffusers_to_ldm, ldm_to_diffusers, load_vae,
                          model_to_ldm)


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
    for k, v in model_to_ldm(loaded_old.model, loaded_old.layout).items():
        assert torch.equal(v, model_to_ldm(loaded.model, loaded.layout)[k])


def test_export_keeps_matrix_attention_layout_and_drops_loss_keys():
    ldm = tiny_ldm_sd()
    for k in list(ldm):
        if ".attn_1." in k and k.endswith("weight") and ldm[k].ndim == 4:
            ldm[k] = ldm[k][:, :, 0, 0].clone()  # some converted checkpoints store these as matrices
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(2)
    loaded = build_vae(ldm)
    assert loaded.layout.dropped_keys == ["loss.discriminator.main.0.weight"]
    out = model_to_ldm(loaded.model, loaded.layout)
    del ldm["loss.discriminator.main.0.weight"]
    assert set(out) == set(ldm)
    assert all(out[k].shape == ldm[k].shape and torch.equal(out[k], ldm[k]) for k in ldm)


def test_full_checkpoint_prefix_is_stripped():
    sd = {"first_stage_model." + k: v for k, v in tiny_ldm_sd().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    assert build_vae(sd).model.config.latent_channels == 4


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
