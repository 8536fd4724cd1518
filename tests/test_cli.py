"""`python -m training ...` end to end, as a user runs it: in this process (``cli.main``, the same code
without paying the imports again) where that changes nothing, in a subprocess where the process
matters (Ctrl-C, torchrun, the README's demo)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, cli_main, tiny_ldm_sd, write_images


run = cli_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torchvision

    d = tmp_path_factory.mktemp("cli")
    save_file(tiny_ldm_sd(), str(d / "base.safetensors"))
    write_images(d / "images", size=64)
    torch.manual_seed(0)
    feats = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    torch.save(feats, d / "alexnet-random.pth")
    return d


def fit_args(d, out, *extra):
    return ["fit", "--vae", d / "base.safetensors", "--data", d / "images", "--out", out, "--steps", 3,
            "--patch-size", 32, "--batch-size", 2, "--foreground-threshold", 0, "--no-progress", *extra]


def test_fit_trains_and_exports(setup, tmp_path):
    out = tmp_path / "vae-ft-test-3.safetensors"
    p = run(*fit_args(setup, out, "--lpips-net", "alex", "--loss-plot", tmp_path / "loss.png",
                      "--preview-dir", tmp_path / "previews", "--preview-every", 2, "--val-every", 2,
                      "--val-patches", 2, "--export-best"),
            env={"VAEFT_LPIPS_BACKBONE": str(setup / "alexnet-random.pth")})
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["out"] == str(out)
    assert set(result["final"]) >= {"mse", "lpips", "total"}
    base = load_file(setup / "base.safetensors")
    exported = load_file(out)
    assert set(exported) == set(base) and all(exported[k].shape == base[k].shape for k in base)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / "previews")) == ["preview-0000002.png", "preview-0000003.png"]
    assert result["best_step"] in (2, 3)
    assert result["latent_cache_hits"] == 0     # random patches, augmented: nothing repeats


def test_fit_fixed_grid_patch_set_uses_the_latent_cache(setup, tmp_path):
    out = tmp_path / "vae-ft-grid.safetensors"
    common = ["--sampling", "grid", "--lpips-weight", 0, "--val-fraction", 0]
    p = run(*fit_args(setup, out, *common, "--no-flip", "--no-rotate90"), "--steps", 12)
    hits = json.loads(p.stdout.strip().splitlines()[-1])["latent_cache_hits"]
    n = json.loads(run("patches", "--data", setup / "images", "--patch-size", 32, "--foreground-threshold", 0,
                       "--sampling", "grid", "--val-fraction", 0, "--json").stdout)["patches_per_epoch"]
    assert n < 24 and hits == 24 - n            # every patch after its first appearance
    p = run(*fit_args(setup, tmp_path / "b.safetensors", *common), "--steps", 12)   # flips on
    assert json.loads(p.stdout.strip().splitlines()[-1])["latent_cache_hits"] == 0


def test_fit_resume_from_a_checkpoint_file_to_more_steps(setup, tmp_path):
    """--checkpoint-every writes <out>.ckpt; --resume FILE with a larger --steps goes on from it to the
    weights of a run planned that long (constant lr)."""
    common = ("--lpips-weight", 0, "--export-dtype", "fp32", "--lr", 1e-3)
    straight = tmp_path / "straight.safetensors"
    run(*fit_args(setup, straight, *common, "--steps", 4))
    run(*fit_args(setup, tmp_path / "half.safetensors", *common, "--steps", 2, "--checkpoint-every", 2))
    resumed = tmp_path / "resumed.safetensors"
    run(*fit_args(setup, resumed, *common, "--steps", 4, "--resume", tmp_path / "half.ckpt"))
    a, b = load_file(straight), load_file(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case,expected", [
    ("missing_data", "data folder not found"),
    ("not_a_vae", "not a kl-f8 VAE"),
    ("negative_lr", "lr must be greater than 0"),
    ("micro_batch", "multiple of micro_batch"),
    ("no_lpips_weights", "alexnet-owt-7be5be79.pth"),
    ("empty_folder", "no usable image"),
])
def test_fit_bad_input_is_a_clear_error(setup, tmp_path, case, expected):
    out = tmp_path / "out.safetensors"
    args = fit_args(setup, out, "--lpips-weight", 0)
    env = None
    if case == "missing_data":
        args[args.index("--data") + 1] = tmp_path / "nope"
    elif case == "not_a_vae":
        save_file({"model.diffusion_model.w": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
        args[args.index("--vae") + 1] = tmp_path / "unet.safetensors"
    elif case == "negative_lr":
        args += ["--lr=-1e-4"]
    elif case == "micro_batch":
        args += ["--micro-batch", 3]
    elif case == "no_lpips_weights":
        args = fit_args(setup, out, "--lpips-net", "alex")
        env = {"TORCH_HOME": str(tmp_path / "empty"), "VAEFT_LPIPS_BACKBONE": ""}
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image")
        args[args.index("--data") + 1] = tmp_path / "empty"
    p = run(*args, env=env, check=False)
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr.lower() or expected in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()


def test_fit_refuses_to_overwrite(setup, tmp_path):
    out = tmp_path / "vae-ft-keep-3.safetensors"
    out.write_bytes(b"precious")
    p = run(*fit_args(setup, out, "--lpips-weight", 0), check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert out.read_bytes() == b"precious"


def test_torchrun_two_processes_sync_gradients(setup, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "training",
                        *map(str, fit_args(setup, out, "--lpips-weight", 0, "--batch-size", 4, "--lr", 1e-3))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert out.exists() and len(lines) == 1
    digests = lines[0]["rank_digests"]
    # gradients all-reduced: both ranks end with the same decoder although they saw different patches
    assert len(digests) == 2 and digests[0] == digests[1]


def test_demo_as_in_the_readme(tmp_path):
    p = run("demo", "--out", tmp_path / "demo", "--images", 2, "--size", 64)
    info = json.loads(p.stdout)
    assert os.path.getsize(info["vae"]) > 300e6  # the full SD layout
    sd = load_file(info["vae"])
    assert len(sd) == 248 and sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_loss_curves_can_have_their_own_steps():
    """Validation scores drawn at their own steps, on the training curve's axis."""
    from training.plot import COLOURS, curve_image

    img = curve_image({"loss": [1.0] * 10, "val_mse": [2.0]}, {"loss": list(range(1, 11)), "val_mse": [5]},
                      width=200, height=120, log_y=False)
    left, right, top = 64, 16, 28
    pw = 200 - left - right
    x = round(left + (5 - 1) / (10 - 1) * pw)              # step 5 on the 1..10 axis
    y = top  # the larger value sits on the top edge
    colour = torch.tensor(COLOURS[1], dtype=torch.float32) / 255
    patch = img[:, y - 2:y + 3, x - 2:x + 3].reshape(3, -1)
    assert ((patch - colour[:, None]).abs().max(0).values < 0.02).any()
    elsewhere = img[:, y - 2:y + 3, left + 2:left + 12].reshape(3, -1)
    assert not ((elsewhere - colour[:, None]).abs().max(0).values < 0.02).any()


def test_run_folder_config_rerun_and_ctrl_c_continue(setup, tmp_path):
    """--run-dir writes a run folder; --config re-runs it exactly; Ctrl-C checkpoints the step reached
    and --resume RUN_DIR continues to the same weights as an uninterrupted run."""
    import signal
    import time

    common = ("--lpips-weight", 0, "--export-dtype", "fp32", "--lr", 1e-3, "--val-every", 2, "--val-patches", 2,
              "--preview-every", 2, "--log-every", 1)
    first = tmp_path / "first.safetensors"
    run(*fit_args(setup, first, *common, "--steps", 4, "--run-dir", tmp_path / "run"))
    folder = tmp_path / "run"
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-0000004.ckpt"]
    assert sorted(os.listdir(folder / "previews")) == ["preview-0000002.png", "preview-0000004.png"]
    config = json.loads((folder / "config.json").read_text())
    assert all(not os.path.isabs(v) for v in config["inputs"].values() if v)  # nothing of the user's layout
    metrics = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert "val_mse" in metrics[0] and "total" not in metrics[0]  # the base VAE, before the first step
    assert all("seconds" in m for m in metrics) and "steps_per_s" in metrics[-1]
    # the config alone re-runs the same run
    again = tmp_path / "again.safetensors"
    run("fit", "--config", folder / "config.json", "--out", again, "--run-dir", tmp_path / "run2", "--no-progress")
    a, b = load_file(first), load_file(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a fresh run into a folder that holds a run is refused, and the folder is left alone
    before = (folder / "metrics.jsonl").read_bytes()
    p = run(*fit_args(setup, tmp_path / "x.safetensors", *common, "--run-dir", folder), check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "Traceback" not in p.stderr
    assert (folder / "metrics.jsonl").read_bytes() == before

    # Ctrl-C during a long run: the step reached is checkpointed, exit 130, then continue
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process computes
    args = [str(a) for a in fit_args(setup, tmp_path / "long.safetensors", *common, "--steps", 400,
                                     "--run-dir", tmp_path / "long")]
    proc = subprocess.Popen([sys.executable, "-m", "training", *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (tmp_path / "long" / "metrics.jsonl").exists():
            time.sleep(0.5)
        while time.monotonic() < deadline and len((tmp_path / "long" / "metrics.jsonl").read_text().splitlines()) < 4:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    ckpts = os.listdir(tmp_path / "long" / "checkpoints")
    assert len(ckpts) == 1
    reached = int(ckpts[0][5:12])
    assert 3 <= reached < 400 and not (tmp_path / "long.safetensors").exists()
    # continue to step reached + 2 and compare with a straight run of that length
    n = reached + 2
    straight = tmp_path / "straight.safetensors"
    run(*fit_args(setup, straight, *common, "--steps", n))
    cont = tmp_path / "cont.safetensors"
    run(*fit_args(setup, cont, *common, "--steps", n, "--run-dir", tmp_path / "long", "--resume", tmp_path / "long"))
    a, b = load_file(straight), load_file(cont)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(n + 1))  # one run's log: nothing written past the checkpoint is repeated
    # continuing with other training settings is refused, and the run folder is left as it was
    ckpt = tmp_path / "long" / "checkpoints" / sorted(os.listdir(tmp_path / "long" / "checkpoints"))[-1]
    kept = (ckpt, tmp_path / "long" / "config.json", tmp_path / "long" / "metrics.jsonl")
    before = [p.read_bytes() for p in kept]
    p = run(*fit_args(setup, tmp_path / "y.safetensors", "--lpips-weight", 0, "--export-dtype", "fp32",
                      "--lr", 2e-3, "--steps", n + 2, "--resume", tmp_path / "long"), check=False)
    assert p.returncode == 2 and "other settings" in p.stderr and "lr: 0.001 -> 0.002" in p.stderr
    assert [p.read_bytes() for p in kept] == before
    # one run's checkpoint continued into another run's folder: refused before that folder changes
    kept = (folder / "config.json", folder / "metrics.jsonl", folder / "checkpoints" / "step-0000004.ckpt")
    before = [p.read_bytes() for p in kept]
    p = run(*fit_args(setup, tmp_path / "z.safetensors", *common, "--steps", n, "--resume", ckpt, "--run-dir", folder),
            check=False)
    assert p.returncode == 2 and "holds the checkpoint of a finished run (step 4 of 4)" in p.stderr, p.stderr
    assert [p.read_bytes() for p in kept] == before


def test_outputs_are_checked_before_training(setup, tmp_path, tiny_vae_file):
    """A bad output path costs seconds, not a finished run; nobody's file is replaced."""
    out = tmp_path / "o.safetensors"
    (tmp_path / "afile").write_text("x")
    cases = [
        (("--preview-dir", tmp_path / "afile"), "is a file, not a folder"),
        (("--loss-plot", tmp_path / "missing" / "loss.png"), "does not exist"),
        (("--checkpoint", tiny_vae_file), "not a checkpoint of this run; it is never replaced"),
        (("--run-dir", tmp_path / "afile"), "is a file"),
    ]
    before = tiny_vae_file.read_bytes()
    for extra, expected in cases:
        p = run(*fit_args(setup, out, "--lpips-weight", 0, *extra), check=False)
        assert p.returncode == 2 and expected in p.stderr, (extra, p.stderr[-1500:])
        assert "Traceback" not in p.stderr and "fine-tune" not in p.stderr  # no step was run
        assert not out.exists()
    assert tiny_vae_file.read_bytes() == before
    # --checkpoint-every alone writes <out>.ckpt; a fresh run next to that run's checkpoint says how to continue it
    ckpt = tmp_path / "a.ckpt"
    run(*fit_args(setup, tmp_path / "a.safetensors", "--lpips-weight", 0, "--checkpoint-every", 2, "--steps", 2))
    assert ckpt.exists()
    p = run(*fit_args(setup, tmp_path / "b.safetensors", "--lpips-weight", 0, "--checkpoint", ckpt, "--steps", 4),
            check=False)
    assert p.returncode == 2 and "checkpoint of a finished run (step 2 of 2)" in p.stderr


def test_loss_curve_draws_the_base_level_of_a_series_that_starts_at_step_0():
    from training.plot import COLOURS, curve_image

    kw = dict(width=200, height=120, log_y=False)
    with_base = curve_image({"loss": [3.0, 1.0], "val_mse": [2.0, 1.5]}, {"loss": [1, 10], "val_mse": [0, 10]}, **kw)
    without = curve_image({"loss": [3.0, 1.0], "val_mse": [2.0, 1.5]}, {"loss": [1, 10], "val_mse": [1, 10]}, **kw)
    top, ph = 28, 120 - 28 - 32
    y = round(top + (1 - (2.0 - 1.0) / (3.0 - 1.0)) * ph)        # the base value 2.0 on the 1..3 axis
    colour = torch.tensor(COLOURS[1], dtype=torch.float32) / 255
    def hits(img):
        row = img[:, y - 1:y + 2, 120:180].reshape(3, -1)             # right half: far from the curve's start
        return int(((row - colour[:, None]).abs().max(0).values < 0.02).sum())
    assert hits(with_base) > 10 and hits(without) == 0


def test_a_torn_last_metrics_line_is_set_aside_and_the_run_continues(setup, tmp_path):
    """A crash while metrics.jsonl is appended leaves half a line: the run still continues, the log is
    read up to its last whole line, the torn tail is kept aside (not deleted), and each step is logged once."""
    common = ("--lpips-weight", 0, "--log-every", 1, "--val-every", 0, "--run-dir", tmp_path / "run")
    run(*fit_args(setup, tmp_path / "a.safetensors", *common, "--steps", 2))
    metrics = tmp_path / "run" / "metrics.jsonl"
    torn = '{"step": 3, "note": "caf\u00e9'.encode()[:-1]  # cut off mid-write, inside a character
    with open(metrics, "ab") as f:
        f.write(torn)
    p = run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 4, "--resume", tmp_path / "run"),
            check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "set aside" in p.stderr and "Traceback" not in p.stderr
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "run" / "metrics.jsonl.torn").read_bytes() == torn  # kept as it was, byte for byte


def test_a_run_folder_has_one_writer_and_a_killed_one_leaves_no_stale_lock(setup, tmp_path):
    """While a process writes a run folder, a --resume of it is refused by name and leaves the folder as it
    was; the lock is the kernel's, so a writer killed with SIGKILL leaves nothing that blocks a continue."""
    import signal

    common = ("--lpips-weight", 0, "--log-every", 1, "--val-every", 0)
    folder = tmp_path / "run"
    run(*fit_args(setup, tmp_path / "a.safetensors", *common, "--steps", 2, "--run-dir", folder))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training.files import FolderLock; "
                               "FolderLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", folder],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        kept = [folder / "config.json", folder / "metrics.jsonl", folder / "checkpoints" / "step-0000002.ckpt"]
        before = [p.read_bytes() for p in kept]
        p = run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 3, "--resume", folder), check=False)
        assert p.returncode == 2 and f"being written by another process (pid {holder.pid}" in p.stderr, p.stderr
        assert [p.read_bytes() for p in kept] == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 3, "--resume", folder))
    assert [json.loads(ln)["step"] for ln in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_fit_config_takes_settings_never_safety_switches(setup, tmp_path):
    """A shared config.json cannot switch on --overwrite or point --checkpoint at a user's file; a config the
    node wrote re-runs with --vae and --data; a base VAE replaced since the run is refused unless allowed."""
    import shutil

    base = tmp_path / "base.safetensors"
    shutil.copy(setup / "base.safetensors", base)
    common = ("--lpips-weight", 0, "--val-every", 0, "--steps", 1)
    args = fit_args(setup, tmp_path / "a.safetensors", *common, "--run-dir", tmp_path / "run")
    args[args.index("--vae") + 1] = base
    run(*args)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["base_sha256"]
    # a config carrying safety switches: they are ignored, said so, and the user's file is untouched
    victim = tmp_path / "precious.ckpt"
    victim.write_bytes(b"mine")
    hostile = {**config, "settings": {**config["settings"], "overwrite": True, "checkpoint": str(victim),
                                      "checkpoint_every": 1}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(hostile))
    p = run("fit", "--config", tmp_path / "run" / "config.json", "--out", tmp_path / "b.safetensors", "--no-progress")
    assert "ignored checkpoint, overwrite from the file" in p.stderr
    assert victim.read_bytes() == b"mine"
    # the same switches beside the settings, where no setting lives: said too, never used
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "overwrite": True, "checkpoint": str(victim)}))
    p = run("fit", "--config", tmp_path / "run" / "config.json", "--out", tmp_path / "b2.safetensors", "--no-progress")
    assert "ignored checkpoint, overwrite from the file" in p.stderr
    assert victim.read_bytes() == b"mine"
    # written by the node: ComfyUI names, not files here
    node = {**config, "paths": "comfyui", "inputs": {"vae": "base.safetensors", "dataset": "images",
                                                     "general": "vae_general"}}
    (tmp_path / "node.json").write_text(json.dumps(node))
    p = run("fit", "--config", tmp_path / "node.json", "--out", tmp_path / "c.safetensors", check=False)
    assert p.returncode == 2 and "written by the ComfyUI node" in p.stderr and "--vae" in p.stderr, p.stderr
    p = run("fit", "--config", tmp_path / "node.json", "--vae", base, "--data", setup / "images",
            "--out", tmp_path / "c.safetensors", "--no-progress")
    assert (tmp_path / "c.safetensors").exists()
    # the node's general images are ComfyUI's too: not silently dropped, the user is told how to add them
    assert "also validated on general images ('vae_general' in ComfyUI)" in p.stderr and "--general DIR" in p.stderr
    # the base VAE file replaced by another of the same name: refused by name, unless allowed
    save_file(tiny_ldm_sd(seed=1), str(base))
    p = run("fit", "--config", tmp_path / "node.json", "--vae", base, "--data", setup / "images",
            "--out", tmp_path / "d.safetensors", check=False)
    assert p.returncode == 2 and "is not the base VAE the run" in p.stderr and "--allow-changed-base" in p.stderr
    run("fit", "--config", tmp_path / "node.json", "--vae", base, "--data", setup / "images",
        "--out", tmp_path / "d.safetensors", "--allow-changed-base", "--no-progress")


def test_stop_messages_say_what_was_written_and_the_command_that_continues(setup, tmp_path, monkeypatch):
    from training import cli, session

    common = ("--lpips-weight", 0, "--val-every", 0, "--log-every", 1)
    folder = tmp_path / "run"
    # Ctrl-C before the first step of a run with a run folder: no checkpoint yet, and how to start again
    monkeypatch.setattr(cli._StopOnSigint, "requested", lambda self: True)
    p = run(*fit_args(setup, tmp_path / "a.safetensors", *common, "--run-dir", folder), check=False)
    assert p.returncode == 130 and "no checkpoint was asked for" not in p.stderr, p.stderr
    assert "no checkpoint was written yet" in p.stderr and "--overwrite" in p.stderr
    monkeypatch.undo()
    run(*fit_args(setup, tmp_path / "a.safetensors", *common, "--steps", 2, "--run-dir", folder, "--overwrite"))
    # Ctrl-C twice (stopped at once, e.g. while a checkpoint was written): the newest checkpoint and the command

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "fine_tune", interrupted)
    p = run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 4, "--resume", folder), check=False)
    assert p.returncode == 130 and "nothing was written" not in p.stderr, p.stderr
    assert f"newest checkpoint is {folder / 'checkpoints' / 'step-0000002.ckpt'} (step 2)" in p.stderr
    assert "continue with: python -m training fit --vae" in p.stderr and f"--resume {folder}" in p.stderr


def test_a_damaged_newest_checkpoint_names_the_older_whole_one(setup, tmp_path):
    common = ("--lpips-weight", 0, "--val-every", 0, "--checkpoint-every", 1, "--keep-checkpoints", 2)
    folder = tmp_path / "run"
    run(*fit_args(setup, tmp_path / "a.safetensors", *common, "--steps", 2, "--run-dir", folder))
    newest = folder / "checkpoints" / "step-0000002.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    kept = [folder / "config.json", folder / "metrics.jsonl", newest, folder / "checkpoints" / "step-0000001.ckpt"]
    before = [p.read_bytes() for p in kept]
    p = run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 3, "--resume", folder), check=False)
    assert p.returncode == 2 and "unreadable or corrupt" in p.stderr, p.stderr
    assert "step-0000001.ckpt' (step 1)" in p.stderr and "move 'step-0000002.ckpt' out of" in p.stderr
    assert [p.read_bytes() for p in kept] == before
    newest.rename(tmp_path / "step-0000002.ckpt.damaged")  # as the message says
    only = tmp_path / "only"
    (only / "checkpoints").mkdir(parents=True)
    (only / "checkpoints" / "step-0000002.ckpt").write_bytes(before[2])
    (only / "config.json").write_bytes(before[0])
    p = run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 3, "--resume", only), check=False)
    assert p.returncode == 2 and "unreadable or corrupt" in p.stderr and "Traceback" not in p.stderr
    run(*fit_args(setup, tmp_path / "b.safetensors", *common, "--steps", 3, "--resume", folder))


def test_paths_with_dotdot_and_model_folders_are_checked_before_training(setup, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    cases = [(("--out", f"{tmp_path}/missing/../x.safetensors"), "goes through a folder that does not exist"),
             (("--checkpoint", f"{tmp_path}/nothere/../c.ckpt"), "--checkpoint"),
             (("--run-dir", model), "a diffusers model folder, not a run folder"),
             (("--resume", model), "a diffusers model folder, not a run folder")]
    for extra, expected in cases:
        args = fit_args(setup, tmp_path / "o.safetensors", "--lpips-weight", 0)
        if extra[0] == "--out":
            args[args.index("--out") + 1] = extra[1]
            extra = ()
        p = run(*args, *extra, check=False)
        assert p.returncode == 2 and expected in p.stderr, (extra, p.stderr[-1500:])
        assert "fine-tune" not in p.stderr and not (tmp_path / "x.safetensors").exists()


def test_no_output_replaces_an_input_whatever_overwrite_says(setup, tmp_path):
    """--out (or --loss-plot, --checkpoint) that is the base VAE, or another input, is refused before anything
    is loaded, with --overwrite too: replacing one's own input is never what --overwrite means."""
    import shutil

    base = tmp_path / "base.safetensors"
    shutil.copy(setup / "base.safetensors", base)
    before = base.read_bytes()
    for flag in ("--out", "--loss-plot", "--checkpoint"):
        args = fit_args(setup, tmp_path / "out.safetensors", "--lpips-weight", 0, "--overwrite")
        args[args.index("--vae") + 1] = base
        if flag == "--out":
            args[args.index("--out") + 1] = tmp_path / "." / "base.safetensors"  # the same file, spelt otherwise
        else:
            args += [flag, base]
        p = run(*args, check=False)
        assert p.returncode == 2 and f"{flag} " in p.stderr and "is the run's own input --vae" in p.stderr, p.stderr
        assert "with or without --overwrite" in p.stderr
        assert base.read_bytes() == before and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family,choice", [("wan2.1", "sd"), ("flux2", "flux"), ("kl-f8", "sd3")])
def test_a_latent_family_the_vae_cannot_take_is_refused_before_training(setup, tmp_path, family, choice):
    """--family is checked when the base is read, not after the run: nothing is trained or written."""
    from family_examples import EXAMPLES

    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in EXAMPLES[family].file(0).items()}, str(base))
    args = fit_args(setup, tmp_path / "out.safetensors", "--lpips-weight", 0, "--family", choice,
                    "--run-dir", tmp_path / "run")
    args[args.index("--vae") + 1] = base
    p = run(*args, check=False)
    assert p.returncode == 2 and f"family {choice!r}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["--stop-when-safe", "--export-best"])
def test_a_setting_that_needs_held_out_images_names_the_real_cause(setup, tmp_path, setting):
    """With one image nothing is held out: the refusal says so and how to fix it (not "set val_every > 0",
    which is set), before anything is trained or written."""
    write_images(tmp_path / "one", names=("retina",), size=64)
    args = fit_args(setup, tmp_path / "out.safetensors", "--lpips-weight", 0, setting, "--run-dir", tmp_path / "run")
    args[args.index("--data") + 1] = tmp_path / "one"
    p = run(*args, check=False)
    assert p.returncode == 2 and setting[2:].replace("-", "_") in p.stderr, p.stderr
    assert "no held-out images" in p.stderr and "val_fraction" in p.stderr and "set val_every" not in p.stderr
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "run").exists()
