import itertools
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_ldm_sd, train
from training.config import TrainConfig
from training.errors import VAEFTError
from training.export import check_frozen
from training.trainer import Callbacks, fine_tune, lr_at
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
    result = train(vae, fixed_batches(), cfg(), device="cpu")
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


def test_micro_batches_accumulate_to_the_full_batch(monkeypatch):
    # Plain SGD makes the update linear in the gradient, so equal gradients <=> equal weights
    # (Adam's first step is ~lr·sign(g) and would hide or exaggerate differences).
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr, fused=True))
    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    big = fine_tune(vae, itertools.repeat(x), cfg(steps=1, posterior="mode", grad_clip=0), device="cpu")
    acc = fine_tune(vae, itertools.repeat(x), cfg(steps=1, micro_batch=2, posterior="mode", grad_clip=0),
                    device="cpu")
    assert acc.micro_batch == 2 and big.micro_batch == 4
    sa, sb = big.model.state_dict(), acc.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7) for k in sa)
    moved = sum((sa[k] - vae.model.state_dict()[k]).abs().sum() for k in sa)
    assert moved > 1e-4  # the step did something


@pytest.mark.parametrize("kind", ["GPU", "CPU"])
def test_out_of_memory_is_retried_at_smaller_micro_batches_and_named(monkeypatch, kind):
    """GPU: torch's OutOfMemoryError (simulated, there is no GPU here); CPU: the real allocator's failure,
    as ``fit --batch-size 4096`` meets it on the CPU inside the forward. Both are retried at a smaller
    micro-batch, and named (never a traceback) where nothing can be retried."""
    from training import trainer
    from training.vae import Reconstruct

    def no_room(*args, **kwargs):
        if kind == "GPU":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        torch.empty(2**60, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory (nothing allocated)

    real = Reconstruct.forward

    def limited(self, x, noise, cached=None, shift=None):
        if x.shape[0] > 1:
            no_room()
        return real(self, x, noise, cached, shift)

    monkeypatch.setattr(Reconstruct, "forward", limited)
    vae = build_vae(tiny_ldm_sd())
    result = fine_tune(vae, fixed_batches(4), cfg(steps=2), device="cpu")
    assert result.micro_batch == 1 and result.steps_done == 2
    with pytest.raises(VAEFTError, match=f"out of {kind} memory at micro-batch 2 with 32² patches; turn on "
                                         "grad_checkpointing"):
        fine_tune(vae, fixed_batches(4), cfg(steps=1, micro_batch=2), device="cpu")
    # outside the step (here: validation) there is nothing to retry: a clear error, not a traceback
    said = "Tried to allocate 2.00 GiB" if kind == "GPU" else "can't allocate memory"
    monkeypatch.setattr(trainer, "validation_scores", no_room)
    with pytest.raises(VAEFTError, match=f"out of {kind} memory outside the training step.*{said}.*lower val_patches"):
        fine_tune(vae, fixed_batches(1), cfg(steps=1, batch_size=1, val_every=1), device="cpu",
                  val_batch=torch.zeros(1, 3, 32, 32))


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
    result = train(vae, fixed_batches(), cfg(steps=1), device="cpu")
    with torch.no_grad():
        result.model.encoder.conv_in.weight.add_(1e-3)
    with pytest.raises(VAEFTError, match="frozen weights changed"):
        check_frozen(result)


def test_batch_channel_mismatch_is_named():
    vae = build_vae(tiny_ldm_sd())
    with pytest.raises(VAEFTError, match="3-channel"):
        fine_tune(vae, itertools.repeat(torch.zeros(4, 16, 32, 32)), cfg(steps=1), device="cpu")
    with pytest.raises(VAEFTError, match="expected 4"):
        fine_tune(vae, itertools.repeat(torch.zeros(2, 3, 32, 32)), cfg(steps=1), device="cpu")


def test_lr_schedule():
    c = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.5)
    assert lr_at(110, c) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(50, TrainConfig(lr=0.3)) == 0.3


@pytest.mark.parametrize("kw,field", [(dict(lr=-1e-4), "lr"), (dict(steps=0), "steps"),
                                      (dict(batch_size=6, micro_batch=4), "micro_batch"),
                                      (dict(recipe="sd-vae-ft-xl"), "recipe"),
                                      (dict(batch_size=0), "batch_size"), (dict(export_dtype="fp8"), "export_dtype"),
                                      (dict(lpips_weight=float("nan")), "lpips_weight"),
                                      (dict(gan_weight=0.5, disc_start=1000, steps=500), "disc_start")])
def test_nonsense_hyperparameters_name_the_field(kw, field):
    with pytest.raises(VAEFTError, match=field):
        TrainConfig(**kw)


def test_recipes_compose_their_losses():
    from training.config import RECIPES

    mse = TrainConfig()
    assert (mse.recipe, mse.mse_weight, mse.l1_weight, mse.lpips_weight, mse.trainable) == \
        ("sd-vae-ft-mse", 1.0, 0.0, 0.1, "decoder")
    ema = TrainConfig.from_recipe("sd-vae-ft-ema")
    assert (ema.mse_weight, ema.l1_weight, ema.lpips_weight, ema.gan_weight) == (0.0, 1.0, 1.0, 0.0)
    gan = TrainConfig.from_recipe("ldm-gan", disc_start=5)
    assert (gan.l1_weight, gan.lpips_weight, gan.kl_weight, gan.gan_weight, gan.disc_start) == (1.0, 1.0, 1e-6, 0.5, 5)
    assert gan.recipe_label() == "custom (from ldm-gan: disc_start)"
    assert TrainConfig.from_recipe("sd-vae-ft-ema").recipe_label() == "sd-vae-ft-ema"
    assert set(RECIPES) == {"sd-vae-ft-mse", "sd-vae-ft-ema", "ldm-gan", "fp16-fix", "distil-narrow", "distil-tiny"}
    tiny = TrainConfig.from_recipe("distil-tiny")
    assert (tiny.lr, tiny.mse_weight, tiny.lpips_weight, tiny.trainable) == (5e-4, 1.0, 0.1, "decoder")
    with pytest.raises(VAEFTError, match="unknown recipe"):
        TrainConfig.from_recipe("nope")


def test_gan_recipe_trains_discriminator_after_disc_start(lpips_random):
    vae = build_vae(tiny_ldm_sd())
    c = TrainConfig.from_recipe("ldm-gan", steps=3, disc_start=1, lr=1e-3, batch_size=2, log_every=1,
                                preview_every=0, ema=False)
    result = fine_tune(vae, fixed_batches(2), c, device="cpu", lpips_net=lpips_random)
    h = result.history
    assert "d_loss" not in h[0] and {"d_loss", "g_loss", "gan_w", "l1", "lpips"} <= set(h[1])
    assert h[1]["gan_w"] > 0 and all(math.isfinite(v) for v in h[-1].values())


def test_full_mode_with_kl_and_latent_consistency():
    vae = build_vae(tiny_ldm_sd())
    c = cfg(trainable="full", kl_weight=1e-6, latent_weight=1.0, steps=2)
    result = fine_tune(vae, fixed_batches(), c, device="cpu")
    assert {"kl", "latent"} <= set(result.history[-1])
    with pytest.raises(VAEFTError, match="latent_weight"):
        cfg(latent_weight=1.0)


def test_non_finite_steps_are_skipped_then_stop(monkeypatch):
    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    stream = iter([x, poisoned, x, x])
    result = fine_tune(vae, stream, cfg(steps=4, ema=True), device="cpu")
    assert result.skipped_steps == 1 and result.history[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())
    with pytest.raises(VAEFTError, match="consecutive steps had a non-finite"):
        fine_tune(vae, itertools.repeat(poisoned), cfg(steps=50, max_bad_steps=3, log_every=1), device="cpu")
    # The count is read only at logging steps (no host sync per step), but a streak that ended in
    # between still counts: 3 bad steps, then good ones, with the first log at step 8.
    stream = iter([x, poisoned, poisoned, poisoned] + [x] * 4)
    with pytest.raises(VAEFTError, match="3 consecutive steps had a non-finite"):
        fine_tune(vae, stream, cfg(steps=8, max_bad_steps=3, log_every=8), device="cpu")


def test_a_stopped_run_continues_to_the_uninterrupted_result(tmp_path):
    """The library's resume path (the CLI's Ctrl-C and ComfyUI's Cancel and SIGKILL have their own
    tests): stopped mid-run, the step reached is checkpointed, and continuing from it ends with the
    weights and history of an uninterrupted run, augmentation, EMA and a cosine schedule included."""
    import itertools

    from training import checkpoint as C
    from training.augment import augmenter
    from training.config import DataConfig

    vae = build_vae(tiny_ldm_sd())
    data = [torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(6)]
    aug = augmenter(DataConfig(patch_size=32, color_jitter=0.2))

    def batches(start):
        return iter(data[start:])

    c = cfg(steps=6, ema=True, warmup_steps=2, lr_schedule="cosine", log_every=1, checkpoint_every=0)
    full = fine_tune(vae, batches, c, device="cpu", augment=aug)
    ckpt = tmp_path / "run.ckpt"
    calls = itertools.count()
    stopped = fine_tune(vae, batches, c, device="cpu", augment=aug, checkpoints=ckpt,
                        callbacks=Callbacks(should_stop=lambda: next(calls) >= 3))  # Cancel during step 4
    assert stopped.stopped_early and stopped.steps_done == 3 and C.peek(ckpt)["step"] == 3
    resumed = fine_tune(vae, batches, c, device="cpu", augment=aug, resume=ckpt, checkpoints=ckpt)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == full.history and [h["step"] for h in resumed.history] == list(range(1, 7))
    assert C.peek(ckpt)["step"] == 6  # checkpoint_every=0: the stop and the final step are still written
    # a finished run continues to a larger steps (constant lr here: the same curve as a run planned that long)
    flat = c.replace(lr_schedule="constant", warmup_steps=0)
    short = tmp_path / "short.ckpt"
    fine_tune(vae, batches, flat.replace(steps=3), device="cpu", augment=aug, checkpoints=short)
    longer = fine_tune(vae, batches, flat, device="cpu", augment=aug, resume=short)
    planned = fine_tune(vae, batches, flat, device="cpu", augment=aug).model.state_dict()
    assert all(torch.equal(planned[k], v) for k, v in longer.model.state_dict().items())

    before = ckpt.read_bytes()
    with pytest.raises(VAEFTError, match="other settings.*lr"):
        fine_tune(vae, batches, c.replace(lr=5e-3), device="cpu", resume=ckpt)
    other = build_vae(tiny_ldm_sd(seed=1))
    with pytest.raises(VAEFTError, match="different base VAE"):
        fine_tune(other, batches, c, device="cpu", resume=ckpt)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(VAEFTError, match="corrupt"):
        fine_tune(vae, batches, c, device="cpu", resume=bad)
    assert ckpt.read_bytes() == before


def test_resume_carries_log_sums_and_best_pick_and_refuses_other_data(tmp_path):
    """Resumed mid log window and after export_best's pick: same history, same pick, same weights."""
    from training.checkpoint import load_checkpoint
    from training.vae import trainable_shapes

    vae = build_vae(tiny_ldm_sd())
    val = torch.full((4, 3, 32, 32), 0.8)
    # 4 steps on the validation images, then 4 on other ones: validation is best at step 2 or 4
    data = [val] * 4 + [torch.full((4, 3, 32, 32), -0.8)] * 4

    def batches(start):
        return iter(data[start:])

    c = cfg(steps=8, lr=1e-2, val_every=2, export_best=True, checkpoint_every=5, log_every=4)
    sig = {"patch_size": 32, "train_images": ["a.png 64x64"]}
    full = fine_tune(vae, batches, c, device="cpu", val_batch=val)
    ckpt = tmp_path / "run.ckpt"

    def crash(step, total, losses):  # killed during step 6: the last checkpoint is step 5's, mid log window
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(vae, batches, c, device="cpu", val_batch=val, checkpoints=ckpt, data_signature=sig,
                  callbacks=Callbacks(on_step=crash))
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    resumed = fine_tune(vae, batches, c, device="cpu", val_batch=val, resume=ckpt, data_signature=sig)
    assert full.best_step in (2, 4) and resumed.best_step == full.best_step  # picked before the resume
    assert resumed.history == full.history  # the step-8 line averages steps 5-8, one of them before the resume
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    before = ckpt.read_bytes()
    with pytest.raises(VAEFTError, match=r"other data or data settings \(patch_size: 32 -> 64\)"):
        fine_tune(vae, batches, c, device="cpu", val_batch=val, resume=ckpt, data_signature={**sig, "patch_size": 64})
    with pytest.raises(VAEFTError, match="run of 1 process.*this one has 2"):
        load_checkpoint(ckpt, vae.layout, c, trainable_shapes(vae.model, c.trainable), world_size=2)
    assert ckpt.read_bytes() == before


def test_log_lines_average_each_term_over_the_steps_it_ran(lpips_random):
    """The GAN terms start at disc_start, mid log window: averaged over their own steps."""
    vae = build_vae(tiny_ldm_sd())
    c = TrainConfig.from_recipe("ldm-gan", steps=4, disc_start=2, lr=1e-3, batch_size=2, log_every=1,
                                preview_every=0, ema=False)
    each = fine_tune(vae, fixed_batches(2), c, device="cpu", lpips_net=lpips_random).history
    window = fine_tune(vae, fixed_batches(2), c.replace(log_every=4), device="cpu", lpips_net=lpips_random).history
    assert "d_loss" not in each[1] and "d_loss" in each[2]
    for key in ("d_loss", "g_loss", "total", "l1"):
        steps = [h[key] for h in each if key in h]
        assert window[0][key] == pytest.approx(sum(steps) / len(steps), rel=1e-5), key


def test_validation_and_best_checkpoint(lpips_random):
    vae = build_vae(tiny_ldm_sd())
    val = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    c = cfg(steps=4, val_every=2, export_best=True, ema=False, lpips_weight=0.1, lr=5e-3)
    result = train(vae, fixed_batches(), c, device="cpu", lpips_net=lpips_random, val_batch=val)
    vals = [h for h in result.history if "val_lpips" in h]
    assert [h["step"] for h in vals] == [0, 2, 4]  # 0: the base VAE, before the first step
    base, vals = vals[0], vals[1:]
    assert "total" not in base and base["val_psnr"] > 0
    assert all(h["val_psnr"] > 0 for h in vals)
    best = min(vals, key=lambda h: h["val_lpips"])
    assert result.best_step == best["step"]
    # the model holds the best step's weights: re-scoring it gives that step's number
    from training.metrics import validation_scores

    again = validation_scores(result.model, val, torch.device("cpu"), torch.autocast("cpu", enabled=False), lpips_random)
    assert again["lpips"] == pytest.approx(best["val_lpips"], rel=1e-5)
    # and the export says whose weights they are
    from training.metadata import build_metadata

    meta = build_metadata(result)
    assert meta["vaeft.weights"] == "best-final" and meta["vaeft.best_step"] == str(best["step"])
    assert json.loads(meta["vaeft.best_validation"])["val_lpips"] == pytest.approx(best["val_lpips"], rel=1e-5)
    with pytest.raises(VAEFTError, match="no validation images"):
        fine_tune(vae, fixed_batches(), c, device="cpu", lpips_net=lpips_random)
    with pytest.raises(VAEFTError, match="export_best needs validation"):
        cfg(export_best=True, val_every=0)


def test_bf16_autocast_with_bf16_groupnorm_trains_on_cpu():
    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = fine_tune(vae, itertools.repeat(x), cfg(steps=3, precision="bf16"), device="cpu")
    b = fine_tune(vae, itertools.repeat(x), cfg(steps=3, precision="bf16", norm_in_bf16=False), device="cpu")
    f = fine_tune(vae, itertools.repeat(x), cfg(steps=3, precision="fp32"), device="cpu")
    assert all(math.isfinite(h["total"]) for h in a.history + b.history)
    # bf16 rounding moves the numbers a little, not the outcome
    assert a.history[-1]["mse"] == pytest.approx(f.history[-1]["mse"], rel=0.05)
    assert b.history[-1]["mse"] == pytest.approx(f.history[-1]["mse"], rel=0.05)
    assert type(a.model.decoder.conv_norm_out) is torch.nn.GroupNorm  # the exported model is plain again


def test_latent_cache_reuses_encoder_output_and_trains_the_same():
    """Fixed patches with ids: the frozen encoder runs once per patch, the result is unchanged."""
    vae = build_vae(tiny_ldm_sd())
    g = torch.Generator().manual_seed(0)
    pool = [torch.rand(4, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]
    ids = [torch.arange(4), torch.arange(4, 8)]
    encodes = []
    hook = vae.model.encoder.register_forward_hook(lambda m, i, o: encodes.append(i[0].shape[0]))

    def run(with_keys, **kw):
        encodes.clear()
        items = itertools.cycle(list(zip(pool, ids)) if with_keys else pool)
        return fine_tune(vae, items, cfg(steps=6, **{"posterior": "mode", **kw}), device="cpu")

    try:
        plain = run(False)
        assert sum(encodes) == 24 and plain.latent_cache_hits == 0
        cached = run(True)
        assert sum(encodes) == 8 and cached.latent_cache_hits == 16   # 2 batches encoded, 4 reused
        # the same run to the last bit: same losses at every step, same weights (the latents reach
        # the decoder in one layout whether cached or fresh, so a resumed run, whose cache starts
        # cold, still matches an uninterrupted one)
        def same(r0, r1):
            assert [h["total"] for h in r0.history] == [h["total"] for h in r1.history]
            s0, s1 = r0.model.state_dict(), r1.model.state_dict()
            assert all(torch.equal(s0[k], s1[k]) for k in s0)

        same(plain, cached)
        sampled = [run(w, posterior="sample") for w in (False, True)]
        assert sampled[1].latent_cache_hits == 16
        same(*sampled)
        # not used: with augmentation, training the encoder, or switched off
        assert run(True, latent_cache_mb=0).latent_cache_hits == 0 and sum(encodes) == 24
        assert run(True, trainable="full").latent_cache_hits == 0
        aug = fine_tune(vae, itertools.cycle(list(zip(pool, ids))), cfg(steps=4), device="cpu",
                        augment=lambda x, gen: x.flip(-1))
        assert aug.latent_cache_hits == 0
    finally:
        hook.remove()


def test_latent_cache_respects_its_budget_and_checks_keys():
    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    # one patch's (mean, logvar): 8 channels x 4 x 4 floats = 512 bytes; a budget of 1 MiB holds all
    res = fine_tune(vae, itertools.repeat((x, torch.arange(4))), cfg(steps=3), device="cpu")
    assert res.latent_cache_hits == 8
    with pytest.raises(VAEFTError, match="4 patches but 3 keys"):
        fine_tune(vae, itertools.repeat((x, torch.arange(3))), cfg(steps=1), device="cpu")


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``float(t)``, ``if t:``), which
    on a GPU wait for every queued kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw,augmented", [
    (dict(ema=True, micro_batch=2, grad_clip=1.0, lr_schedule="cosine", warmup_steps=2, lpips_weight=0.1), True),
    (dict(recipe="ldm-gan", disc_start=1, lpips_weight=0.1, ema=True), False),
])
def test_no_host_sync_between_logging_steps(kw, augmented, lpips_random):
    """The spec's "no .item() per step": the host reads device values only on logging steps, with
    augmentation on too (flips, rotations and colour jitter decided without reading a tensor)."""
    from training.augment import augmenter
    from training.config import DataConfig

    vae = build_vae(tiny_ldm_sd())
    reads, per_step = _HostReads(), {}
    callbacks = Callbacks(on_step=lambda step, total, losses: per_step.setdefault(step, reads.count))
    c = cfg(steps=6, log_every=3, **kw)
    augment = augmenter(DataConfig(patch_size=32, color_jitter=0.1)) if augmented else None
    with reads:
        fine_tune(vae, fixed_batches(), c, device="cpu", lpips_net=lpips_random, callbacks=callbacks,
                  augment=augment)
    # steps 1, 2, 4, 5 are not logging steps: nothing read between the end of step 1 and of step 2, etc.
    assert per_step[2] - per_step[1] == 0 and per_step[5] - per_step[4] == 0, per_step
    assert per_step[3] - per_step[2] > 0  # the logging step does read (the losses): the counter works


def test_pick_device_names_bad_devices_and_gives_each_rank_its_gpu(monkeypatch):
    from training.device import Distributed, pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(VAEFTError, match="'bogus' is not a device name"):
        pick_device("bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VAEFTError, match="sees no CUDA GPU"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # under torchrun a bare "cuda" is this rank's GPU (torch.cuda.set_device and DDP need an index)
    assert pick_device("cuda", Distributed(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(VAEFTError, match="'cuda:2' does not exist: this machine has 2"):
        pick_device("cuda:2")


def test_fine_tune_leaves_the_callers_global_rng_alone(lpips_random):
    """ComfyUI runs other nodes' sampling in the same process: training must not reseed it."""
    vae = build_vae(tiny_ldm_sd())
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    fine_tune(vae, fixed_batches(2), TrainConfig.from_recipe("ldm-gan", steps=2, disc_start=1, batch_size=2,
                                                             preview_every=0), device="cpu", lpips_net=lpips_random)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_fused_adamw_still_honours_the_found_inf_flag():
    """The skipped-step path leans on fused AdamW reading ``found_inf`` off the optimizer (the
    GradScaler protocol): if a PyTorch release stops doing so, this fails instead of training
    silently on non-finite gradients."""
    from training.amp import fused_step as _fused_step

    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    w.grad = torch.full((4,), 0.5)
    _fused_step(opt, torch.ones(()))
    assert torch.equal(w.detach(), torch.ones(4)) and w.grad is None
    w.grad = torch.full((4,), 0.5)
    _fused_step(opt, torch.zeros(()))
    assert (w.detach() < 1).all()


def test_precision_auto_follows_the_gpu_and_fp16_scales_the_loss(monkeypatch):
    from training.device import resolve_precision

    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda, (9, 0))[0] == "bf16"      # H100
    assert resolve_precision("auto", cuda, (8, 6))[0] == "bf16"      # RTX 30xx
    assert resolve_precision("auto", cuda, (7, 5))[0] == "fp16"      # RTX 20xx, T4
    assert resolve_precision("auto", cuda, (6, 1))[0] == "fp16"      # GTX 10xx
    assert resolve_precision("auto", cuda, (5, 2))[0] == "fp32"      # Maxwell
    assert resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert "capability 7.5" in resolve_precision("auto", cuda, (7, 5))[1]
    # fp16 autocast with dynamic loss scaling trains (on the CPU here), and an overflow halves the
    # scale and skips the step instead of poisoning the weights
    vae = build_vae(tiny_ldm_sd())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = fine_tune(vae, itertools.repeat(x), cfg(steps=4, precision="fp16"), device="cpu")
    fp32 = fine_tune(vae, itertools.repeat(x), cfg(steps=4, precision="fp32"), device="cpu")
    assert res.precision.startswith("precision = fp16") and res.skipped_steps == 0
    assert res.history[-1]["mse"] == pytest.approx(fp32.history[-1]["mse"], rel=0.05)
    from training import amp
    from training.loop_state import LoopState

    state = LoopState.new(torch.device("cpu"), loss_scaling=True)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([float("inf"), 1.0])
    found = torch.zeros(())
    amp.unscale_([p], found, state.loss_scale)
    amp.update_scale(state.loss_scale, state.scale_growth, found)
    assert found.item() == 1.0 and state.loss_scale.item() == 2.0**15


def test_general_images_are_scored_beside_the_validation_patches_from_step_0():
    """Do-no-harm: other images are validated as gen_* at the same steps, the base's first."""
    vae = build_vae(tiny_ldm_sd())
    g = torch.Generator().manual_seed(3)
    val, general = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    res = fine_tune(vae, fixed_batches(), cfg(steps=4, val_every=2, log_every=2), device="cpu", val_batch=val,
                    general_batch=general)
    scored = [h for h in res.history if "gen_mse" in h]
    assert [h["step"] for h in scored] == [0, 2, 4] and all("val_mse" in h for h in scored)
    assert scored[0]["gen_mse"] != scored[0]["val_mse"]  # its own patches
    from training.plot import history_curves

    values, steps = history_curves(res.history)
    assert steps["gen_mse"] == [0, 2, 4] and len(values["gen_mse"]) == 3


def test_step_seeds_do_not_collide_by_arithmetic():
    """seed * 1_000_003 + step made seed s at step 1,000,003 the same as seed s + 1 at step 0."""
    from training.trainer import step_seed

    assert step_seed(0, 0, 1_000_003) != step_seed(1, 0, 0)
    seeds = {step_seed(s, r, k) for s in range(4) for r in range(3) for k in (0, 1, 2, 1_000_003, 2_000_006)}
    assert len(seeds) == 4 * 3 * 5 and all(0 <= x < 2**63 for x in seeds)
    assert step_seed(7, 1, 5) == step_seed(7, 1, 5)  # a resumed run draws the same
