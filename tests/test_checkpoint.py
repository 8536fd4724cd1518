"""Checkpoints: whose file may be replaced, damaged files refused, when they are written, Cancel kept."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from conftest import tiny_ldm_sd
from training import checkpoint as C
from training.config import TrainConfig
from training.errors import VAEFTError
from training.trainer import Callbacks, fine_tune
from training.vae import build_vae


def cfg(**kw):
    base = dict(steps=4, lr=1e-3, batch_size=2, lpips_weight=0.0, ema=True, log_every=1, preview_every=0)
    base.update(kw)
    return TrainConfig(**base)


DATA = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(8)]


def batches(start):
    return iter(DATA[start:])


@pytest.fixture(scope="module")
def vae():
    return build_vae(tiny_ldm_sd())


def test_a_file_of_someone_else_is_never_replaced(vae, tmp_path, tiny_vae_file):
    # the user's base VAE at the checkpoint path: refused before the first step, byte-identical after
    target = tmp_path / "base-copy.safetensors"
    shutil.copy(tiny_vae_file, target)
    before = target.read_bytes()
    steps = []
    with pytest.raises(VAEFTError, match="not a checkpoint of this run; it is never replaced"):
        fine_tune(vae, batches, cfg(), device="cpu", checkpoints=target,
                  callbacks=Callbacks(on_step=lambda *a: steps.append(a)))
    assert target.read_bytes() == before and steps == []
    # unless the user says so
    fine_tune(vae, batches, cfg(steps=1), device="cpu", checkpoints=C.Checkpoints(target, overwrite=True))
    assert C.peek(target)["step"] == 1


def test_a_fresh_run_does_not_write_over_an_unfinished_run(vae, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first = fine_tune(vae, batches, cfg(steps=4), device="cpu", checkpoints=ckpt,
                      callbacks=Callbacks(should_stop=_stop_after(2)))  # Cancel after step 2
    assert first.checkpoint == str(ckpt) and C.peek(ckpt)["step"] == 2
    before = ckpt.read_bytes()
    with pytest.raises(VAEFTError, match=r"checkpoint of an unfinished run \(step 2 of 4\).*resuming from it"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", checkpoints=ckpt)
    assert ckpt.read_bytes() == before
    # the run that wrote it continues into the same file, and then it is a finished run's
    resumed = fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=ckpt, checkpoints=ckpt)
    assert resumed.run_id == first.run_id and C.peek(ckpt) == {"run_id": first.run_id, "step": 4, "steps": 4}
    with pytest.raises(VAEFTError, match=r"checkpoint of a finished run \(step 4 of 4\)"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", checkpoints=ckpt)


def _stop_after(n):
    calls = itertools.count()
    # should_stop is polled once per micro-batch (one per step here): True on the (n+1)-th step
    return lambda: next(calls) >= n


def test_damaged_checkpoints_are_refused_and_left_alone(vae, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    fine_tune(vae, batches, cfg(steps=2), device="cpu", checkpoints=ckpt)
    state = torch.load(ckpt, weights_only=True)
    next(iter(state["params"].values())).view(-1)[:16] = 0  # a zeroed block inside a weight tensor, digest unchanged
    damaged = tmp_path / "damaged.ckpt"
    torch.save(state, damaged)
    before = damaged.read_bytes()
    with pytest.raises(VAEFTError, match="is damaged: its tensors do not match the digest"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=damaged)
    assert damaged.read_bytes() == before
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)  # bytes zeroed in the file itself
    (tmp_path / "zeroed.ckpt").write_bytes(bytes(raw))
    with pytest.raises(VAEFTError, match="damaged|corrupt"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=tmp_path / "zeroed.ckpt")
    with pytest.raises(VAEFTError, match="not a file"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=tmp_path)


def test_folder_keeps_the_newest_and_time_triggers_a_checkpoint(vae, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    written = []
    fine_tune(vae, batches, cfg(steps=5), device="cpu",
              checkpoints=C.Checkpoints(folder, every_steps=1, keep=2, folder=True),
              callbacks=Callbacks(on_checkpoint=lambda step, path: written.append(step)))
    assert written == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000004.ckpt", "step-0000005.ckpt"]
    assert C.latest_in(folder).endswith("step-0000005.ckpt")
    # another run may not take the folder over
    with pytest.raises(VAEFTError, match="finished run"):
        fine_tune(vae, batches, cfg(steps=5), device="cpu", checkpoints=C.Checkpoints(folder, folder=True))
    # by time: a clock that moves 6 minutes per step with every_minutes=10 writes every second step
    clock = itertools.count(0, 360)
    monkeypatch.setattr(C.time, "monotonic", lambda: float(next(clock)))
    written.clear()
    fine_tune(vae, batches, cfg(steps=5), device="cpu",
              checkpoints=C.Checkpoints(tmp_path / "t.ckpt", every_minutes=10),
              callbacks=Callbacks(on_checkpoint=lambda step, path: written.append(step)))
    assert written[-1] == 5 and 2 <= len(written) <= 4


def test_a_full_disk_while_checkpointing_is_named_and_the_previous_checkpoint_survives(vae, tmp_path):
    """On a real 2 MiB tmpfs: the first checkpoint fits, the next does not (its folder also holds a
    1 MiB file meanwhile); the error names the disk, the first checkpoint is whole, no temporary is left."""
    import os
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full file system needs root to mount a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt = disk / "run.ckpt"
        small = {"format": C.CHECKPOINT_FORMAT, "step": 1, "w": torch.zeros(64 * 1024)}  # 256 KiB
        C.write_checkpoint(ckpt, small, overwrite=False)
        before = ckpt.read_bytes()
        (disk / "filler.bin").write_bytes(bytes(1024 * 1024))
        big = {**small, "step": 2, "w": torch.ones(256 * 1024)}  # 1 MiB: no longer fits
        with pytest.raises(VAEFTError, match=r"cannot write checkpoint .*No space left on device|ENOSPC"):
            C.write_checkpoint(ckpt, big, overwrite=True)
        assert ckpt.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "run.ckpt"]
        assert C.read_checkpoint(ckpt)["step"] == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_tensors_are_kept_by_name_and_a_mismatch_is_refused_naming_the_key(vae, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    fine_tune(vae, batches, cfg(steps=2), device="cpu", checkpoints=ckpt)
    state = C.read_checkpoint(ckpt)
    trained = [k for k, _ in vae.model.named_parameters() if k.startswith(("decoder.", "post_quant_conv."))]
    assert sorted(state["params"]) == sorted(trained) and sorted(state["ema"]) == sorted(trained)
    assert sorted(state["optimizer"]["state"]) == sorted(trained)
    assert sorted(state["optimizer"]["param_groups"][0]["params"]) == sorted(trained)
    assert "param_shapes" not in state

    def altered(name, change):
        body = {k: v for k, v in state.items() if k != "digest"}
        body["params"] = dict(body["params"])
        change(body["params"])
        path = tmp_path / name
        C.write_checkpoint(path, body, overwrite=False)  # a whole file, digest and all: only the names differ
        return path

    renamed = altered("renamed.ckpt", lambda p: p.update({"decoder.conv_in.bias_old": p.pop("decoder.conv_in.bias")}))
    before = renamed.read_bytes()
    with pytest.raises(VAEFTError, match=r"the trained tensors do not match: 'decoder\.conv_in\.bias' is missing from "
                                         r"the checkpoint \(1 missing, 1 extra\)"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=renamed)
    assert renamed.read_bytes() == before
    reshaped = altered("reshaped.ckpt", lambda p: p.update({"decoder.conv_in.bias": p["decoder.conv_in.bias"][:-1]}))
    with pytest.raises(VAEFTError, match=r"'decoder\.conv_in\.bias' has shape \(63,\) in the checkpoint, \(64,\) in this run"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=reshaped)
    # version 0.1.0's checkpoints kept tensors by position: refused by name, with what to do, never guessed
    old = tmp_path / "old.ckpt"
    torch.save({**state, "format": "vaeft-checkpoint-2"}, old)
    with pytest.raises(VAEFTError, match=r"written by version 0\.1\.0 of this tool, which kept weights by position.*"
                                         r"Finish that run with version 0\.1\.0, or start it again"):
        fine_tune(vae, batches, cfg(steps=4), device="cpu", resume=old)


def test_optimizer_state_is_restored_by_name_whatever_the_parameter_order():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    a.grad, b.grad = torch.full((3,), 0.5), torch.full((2, 2), -1.0)
    opt.step()
    saved = C.optimizer_state(opt, {"a": a, "b": b})
    assert set(saved["state"]) == {"a", "b"} and saved["param_groups"][0]["params"] == ["a", "b"]
    a2, b2 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    reordered = torch.optim.AdamW([b2, a2], lr=0.1)  # the same parameters in another order
    C.load_optimizer_state(reordered, saved, {"a": a2, "b": b2}, "test")
    assert torch.equal(reordered.state[a2]["exp_avg"], opt.state[a]["exp_avg"])
    assert torch.equal(reordered.state[b2]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])
    with pytest.raises(VAEFTError, match=r"'b' is in the checkpoint but not in this run"):
        C.load_optimizer_state(torch.optim.AdamW([a2], lr=0.1), saved, {"a": a2}, "test")
