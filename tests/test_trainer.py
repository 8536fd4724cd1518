import itertools

import pytest
import torch

from conftest import tiny_ldm_sd
from training.config import TrainConfig
from training.errors import VAEFTError
from training.trainer import Callbacks, check_frozen, fine_tune, lr_at
from training.vae import build_vae


def fixed_batches(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return itertools.repeat(x)


def cfg(**kw):
    base = dict(steps=3, lr=1e-3, batch_size=4, lpips_weight=0.0, ema=False, log_every=1, preview_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_decoder_only_trains_decoder_and_leaves_input_untouched():
    vae = build_vae(tiny_ldm_sd())
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    result = fine_tune(vae, fixed_batches(), cfg(), device="cpu")
    after = result.model.state_dict()
    for k, v in before.items():
        assert torch.equal(vae.model.state_dict()[k], v), f"input model changed at {k}"
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(after[k], v), f"frozen {k} changed"
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    assert not torch.equal(after["post_quant_conv.weight"], before["post_quant_conv.weight"])
    check_frozen(result)


def test_full_mode_trains_encoder_too():
    vae = build_vae(tiny_ldm_sd())
    result = fine_tune(vae, fixed_batches(), cfg(trainable="full"), device="cpu")
    assert not torch.equal(result.model.state_dict()["encoder.conv_in.weight"],
                           vae.model.state_dict()["encoder.conv_in.weight"])


def test_loss_goes_down_with_lpips(lpips_random):
    vae = build_vae(tiny_ldm_sd())
    result = fine_tune(vae, fixed_batches(2), cfg(steps=25, lr=2e-3, batch_size=2, lpips_weight=0.1,
                                                  posterior="mode"), device="cpu", lpips_net=lpips_random)
    first, last = result.history[0], result.history[-1]
    assert set(first) >= {"mse", "lpips", "total", "step", "lr"}
    assert last["mse"] < 0.5 * first["mse"]
    assert last["total"] < first["total"]


def test_seeded_runs_are_identical_and_seed_matters():
    vae = build_vae(tiny_ldm_sd())
    a = fine_tune(vae, fixed_batches(), cfg(), device="cpu").model.state_dict()
    b = fine_tune(vae, fixed_batches(), cfg(), device="cpu").model.state_dict()
    c = fine_tune(vae, fixed_batches(), cfg(seed=1), device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("decoder."))


def test_gradient_accumulation_matches_large_batch(monkeypatch):
    # Plain SGD makes the update linear in the gradient, so equal gradients <=> equal weights
    # (Adam's first step is ~lr·sign(g) and would hide or exaggerate differences).
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    big = fine_tune(vae, itertools.repeat(x), cfg(steps=1, posterior="mode", grad_clip=0), device="cpu")

    def halves():
        while True:
            yield x[:2]
            yield x[2:]

    acc = fine_tune(vae, halves(), cfg(steps=1, batch_size=2, grad_accum=2, posterior="mode", grad_clip=0),
                    device="cpu")
    sa, sb = big.model.state_dict(), acc.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7) for k in sa)
    moved = sum((sa[k] - vae.model.state_dict()[k]).abs().sum() for k in sa)
    assert moved > 1e-4  # the step did something


def test_ema_is_what_gets_exported():
    vae = build_vae(tiny_ldm_sd())
    raw = fine_tune(vae, fixed_batches(), cfg(steps=5, ema=True, export_ema=False), device="cpu")
    ema = fine_tune(vae, fixed_batches(), cfg(steps=5, ema=True, ema_decay=0.9), device="cpu")
    base = vae.model.state_dict()
    k = "decoder.conv_out.weight"
    assert ema.used_ema and not raw.used_ema
    # the EMA lies between the base and the raw trained weights
    d_ema = (ema.model.state_dict()[k] - base[k]).norm()
    d_raw = (raw.model.state_dict()[k] - base[k]).norm()
    assert 0 < d_ema < d_raw


def test_cancel_stops_within_a_step():
    vae = build_vae(tiny_ldm_sd())
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3

    result = fine_tune(vae, fixed_batches(), cfg(steps=100), device="cpu",
                       callbacks=Callbacks(should_stop=should_stop))
    assert result.stopped_early and result.steps_done == 3

    class Interrupted(Exception):
        pass

    def raise_at_2(step, total, losses):
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fine_tune(vae, fixed_batches(), cfg(steps=100), device="cpu", callbacks=Callbacks(on_step=raise_at_2))


def test_progress_and_preview_callbacks():
    vae = build_vae(tiny_ldm_sd())
    steps, previews = [], []
    fine_tune(vae, fixed_batches(), cfg(steps=4, preview_every=2, log_every=2), device="cpu",
              preview_batch=torch.zeros(2, 3, 32, 32),
              callbacks=Callbacks(on_step=lambda s, t, l: steps.append((s, t, l is not None)),
                                  on_preview=lambda s, im: previews.append((s, tuple(im.shape)))))
    assert steps == [(1, 4, False), (2, 4, True), (3, 4, False), (4, 4, True)]
    assert previews == [(2, (4, 3, 32, 32)), (4, (4, 3, 32, 32))]


def test_frozen_check_catches_tampering():
    vae = build_vae(tiny_ldm_sd())
    result = fine_tune(vae, fixed_batches(), cfg(steps=1), device="cpu")
    with torch.no_grad():
        result.model.encoder.conv_in.weight.add_(1e-3)
    with pytest.raises(VAEFTError, match="frozen weights changed"):
        check_frozen(result)


def test_batch_channel_mismatch_is_named():
    vae = build_vae(tiny_ldm_sd())
    with pytest.raises(VAEFTError, match="3-channel"):
        fine_tune(vae, itertools.repeat(torch.zeros(2, 16, 32, 32)), cfg(steps=1), device="cpu")


def test_lr_schedule():
    c = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.5)
    assert lr_at(110, c) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(50, TrainConfig(lr=0.3)) == 0.3


@pytest.mark.parametrize("kw,field", [(dict(lr=-1e-4), "lr"), (dict(steps=0), "steps"),
                                      (dict(batch_size=0), "batch_size"), (dict(export_dtype="fp8"), "export_dtype"),
                                      (dict(lpips_weight=float("nan")), "lpips_weight")])
def test_nonsense_hyperparameters_name_the_field(kw, field):
    with pytest.raises(VAEFTError, match=field):
        TrainConfig(**kw)
