"""Long runs inside a real, headless ComfyUI: Cancel checkpoints the step reached and "continue" ends
with the same weights as an uninterrupted run; a server killed with SIGKILL loses at most one
checkpoint interval; the status text reaches the page's websocket; a continue with another VAE or
other data is refused and leaves the checkpoint byte-identical, and so is a continue of a run whose only
checkpoint is truncated, with the pack's message saying what to do.

Everything runs on the CPU in fp32, where a continued run is bit-identical to an uninterrupted one
(under bf16 autocast on a GPU the same holds for the same kernels, but is not asserted here). A
checkpoint of the full-size VAE is ~0.8 GB, so runs write one only where the test needs it (at the end,
when stopped, once mid-run for the SIGKILL test).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid

import pytest
import torch

from comfy_server import Server, comfyui_path, messages
from conftest import remove_run_folders, write_images


pytestmark = pytest.mark.integration  # a real ComfyUI: -m "not integration" skips it
if comfyui_path() is None:
    pytest.skip("ComfyUI integration tests need a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {os.environ.get('COMFYUI_PATH', '')!r})", allow_module_level=True)
requests = pytest.importorskip("requests")
aiohttp = pytest.importorskip("aiohttp")

STEPS = 8


@pytest.fixture(scope="module")
def comfy(comfyui_server):
    server, base, _ = comfyui_server
    # a second VAE (other weights, same layout) and a second image folder, for the refusals
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from conftest import SD_VAE_CONFIG
    from training.families.ldm import diffusers_to_ldm

    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(AutoencoderKL(**SD_VAE_CONFIG).state_dict()).items()},
              os.path.join(base, "models", "vae", "other_sd_vae.safetensors"))
    write_images(os.path.join(base, "input", "other_train"), names=("coffee", "chelsea", "astronaut"), size=96)
    yield server
    remove_run_folders(base)


def _defaults(server, class_type: str) -> dict:
    """Every required widget of a node at its default, from the live /object_info."""
    info = server.get(f"/object_info/{class_type}").json()[class_type]["input"]["required"]
    out = {}
    for name, spec in info.items():
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(spec[0], list):
            out[name] = spec[0][0]
    return out


def _prompt(server, *, run_name: str, save: str, continue_run: str = "new run", vae: str = "random_sd_vae.safetensors",
            folder: str = "vae_train", lr: float = 1e-3, **options) -> dict:
    train_opts = {**_defaults(server, "VAEFTFineTuneOptions"), "lpips_weight": 0.0, "log_every": 1, "val_every": 4,
                  "val_patches": 2, "preview_every": 0, "checkpoint_every": 0, "keep_checkpoints": 1,
                  **options}
    finetune = {**_defaults(server, "VAEFTFineTune"), "steps": STEPS, "lr": lr, "batch_size": 2,
                "run_name": run_name, "continue_run": continue_run}
    finetune.update(vae=["1", 0], dataset=["2", 0], options=["5", 0])
    dataset = {**_defaults(server, "VAEFTPatchDataset"), "folder": folder, "patch_size": 32,
               "foreground_threshold": 0.0, "val_fraction": 0.3}
    save_node = {**_defaults(server, "VAEFTSave"), "trained": ["3", 2], "name": save, "dtype": "fp32"}
    return {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "2": {"class_type": "VAEFTPatchDataset", "inputs": dataset},
        "3": {"class_type": "VAEFTFineTune", "inputs": finetune},
        "4": {"class_type": "VAEFTSave", "inputs": save_node},
        "5": {"class_type": "VAEFTFineTuneOptions", "inputs": train_opts},
    }


def _run_dir(server, name: str) -> str:
    return os.path.join(server.base, "output", "vae_ft_runs", name)


def _exported(server, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = os.path.join(server.base, "output", "vae")
    files = [f for f in os.listdir(folder) if f.startswith(f"vae-ft-{name}")]
    assert len(files) == 1, files
    return load_file(os.path.join(folder, files[0]))


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def _checkpoints(server, name: str) -> list[str]:
    folder = os.path.join(_run_dir(server, name), "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _queue_watched(server, prompt: dict) -> list[str]:
    """Queue ``prompt`` over the page's websocket and collect the node's status texts until it ends."""
    client = uuid.uuid4().hex

    async def watch() -> list[str]:
        texts = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client}") as ws:
                r = requests.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client}, timeout=30)
                assert r.ok, r.text
                deadline = time.time() + 600
                while time.time() < deadline:
                    msg = await ws.receive(timeout=600)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data["type"] == "vaeft.status":  # nodes/finetune.py STATUS_EVENT, for node 3
                            assert data["data"]["node"] == "3", data
                            texts.append(data["data"]["text"])
                        elif data["type"] in ("execution_success", "execution_error"):
                            return texts
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return texts
        return texts

    return asyncio.run(watch())


@pytest.fixture(scope="module")
def straight(comfy):
    """The uninterrupted run every other run is compared with, watched as the page watches it:
    (its exported weights, the status texts the node sent)."""
    texts = _queue_watched(comfy, _prompt(comfy, run_name="straight", save="straight"))
    return _exported(comfy, "straight"), texts


def test_cancel_checkpoints_and_continue_gives_the_uninterrupted_result(comfy, straight):
    pid = comfy.queue(_prompt(comfy, run_name="cancelled", save="cancelled"))
    metrics = os.path.join(_run_dir(comfy, "cancelled"), "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 4, 600,
              "the run did not log 3 steps")
    requests.post(comfy.url + "/interrupt", timeout=10)
    entry = comfy.wait(pid)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in messages(entry)
    assert comfy.healthy()
    ckpts = _checkpoints(comfy, "cancelled")
    assert len(ckpts) >= 1
    reached = int(ckpts[-1][5:12])
    assert 3 <= reached < STEPS  # the step reached when Cancel came (no periodic checkpoint in these runs)
    # the run is offered for continuing, and continuing it finishes with the same weights
    options = comfy.get("/object_info/VAEFTFineTune").json()["VAEFTFineTune"]["input"]["required"]["continue_run"]
    assert "cancelled" in options[0] if isinstance(options[0], list) else "cancelled" in options[1]["options"]
    entry = comfy.wait(comfy.queue(_prompt(comfy, run_name="x", save="continued", continue_run="cancelled")))
    assert entry["status"]["status_str"] == "success", messages(entry)
    assert _same(_exported(comfy, "continued"), straight[0])
    steps = [json.loads(ln)["step"] for ln in open(metrics).read().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == STEPS  # one run's log, no repeats


def test_refused_continue_leaves_the_checkpoint_byte_identical(comfy, straight):
    run = _run_dir(comfy, "straight")
    kept = [os.path.join(run, "checkpoints", _checkpoints(comfy, "straight")[-1]), os.path.join(run, "config.json"),
            os.path.join(run, "metrics.jsonl")]
    before = [open(p, "rb").read() for p in kept]
    for change, expected in ((dict(vae="other_sd_vae.safetensors"), "different base VAE"),
                             (dict(folder="other_train"), "other data"),
                             (dict(lr=5e-4), "other settings")):
        entry = comfy.wait(comfy.queue(_prompt(comfy, run_name="x", save="refused", continue_run="straight",
                                               **change)))
        assert entry["status"]["status_str"] == "error" and expected in messages(entry), messages(entry)
        assert [open(p, "rb").read() for p in kept] == before  # the run folder is left as it was
    assert comfy.healthy()


def test_continue_of_a_run_whose_only_checkpoint_is_truncated_is_refused_with_advice(comfy):
    """A run whose only checkpoint was cut short (a full disk, a copy broken off): continuing it is refused
    with the pack's message and what to do (there is no older whole checkpoint), not a library exception;
    the damaged file is left byte-identical."""
    prompt = _prompt(comfy, run_name="truncated", save="truncated")
    prompt["3"]["inputs"]["steps"] = 2
    entry = comfy.wait(comfy.queue(prompt))
    assert entry["status"]["status_str"] == "success", messages(entry)
    ckpts = _checkpoints(comfy, "truncated")
    assert len(ckpts) == 1, ckpts
    path = os.path.join(_run_dir(comfy, "truncated"), "checkpoints", ckpts[0])
    with open(path, "r+b") as f:
        f.truncate(1000)
    kept = [path, os.path.join(_run_dir(comfy, "truncated"), "config.json"),
            os.path.join(_run_dir(comfy, "truncated"), "metrics.jsonl")]
    before = [open(p, "rb").read() for p in kept]
    again = _prompt(comfy, run_name="x", save="truncated-continued", continue_run="truncated")
    again["3"]["inputs"]["steps"] = 4
    entry = comfy.wait(comfy.queue(again))
    assert entry["status"]["status_str"] == "error", messages(entry)
    error = next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")
    text = error["exception_message"]
    assert "unreadable or corrupt" in text and ckpts[0] in text, text
    assert "No older checkpoint of this run is whole" in text and "start it again as a new run" in text, text
    assert error["node_type"] == "VAEFTFineTune", error["node_type"]
    assert error["exception_type"].endswith(".VAEFTError"), error["exception_type"]  # the pack's error, not a subclass
    assert [open(p, "rb").read() for p in kept] == before  # the run folder, damaged checkpoint included, as it was
    assert comfy.healthy()


def test_status_text_reaches_the_websocket(straight):
    texts = straight[1]
    assert any(f"step {STEPS}/{STEPS}" in t for t in texts), texts[-3:]
    last = texts[-1]
    assert "steps/s" in last and "ETA" in last and "validation (now / base)" in last and "val_mse" in last


def test_sigkill_loses_at_most_one_interval(comfy, straight):
    pid = comfy.queue(_prompt(comfy, run_name="killed", save="killed", checkpoint_every=4))
    _wait_for(lambda: any(int(c[5:12]) >= 4 for c in _checkpoints(comfy, "killed")), 600, "no checkpoint at step 4")
    os.kill(comfy.proc.pid, signal.SIGKILL)
    comfy.proc.wait(30)
    comfy.log.close()
    restarted = Server(comfy.base, comfyui_path())
    try:
        kept = int(_checkpoints(restarted, "killed")[-1][5:12])
        assert 4 <= kept < STEPS  # killed mid-run: at most one interval (4 steps) past the last checkpoint was lost
        entry = restarted.wait(restarted.queue(_prompt(restarted, run_name="y", save="revived", continue_run="killed")))
        assert entry["status"]["status_str"] == "success", messages(entry)
        assert _same(_exported(restarted, "revived"), straight[0])
    finally:
        comfy.__dict__.update(restarted.__dict__)  # the session fixture stops whichever server runs now
    del pid
