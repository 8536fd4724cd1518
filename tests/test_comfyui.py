"""End to end against a real, headless ComfyUI (COMFYUI_PATH): queue the API example workflow,
then load the exported file with stock Load VAE -> VAEEncode -> VAEDecode in a second prompt.

Skipped, with the reason, when no ComfyUI checkout is available.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from conftest import ROOT, SD_VAE_CONFIG, write_images

COMFYUI = os.environ.get("COMFYUI_PATH", "")
if not COMFYUI or not os.path.isfile(os.path.join(COMFYUI, "main.py")):
    pytest.skip("ComfyUI integration tests need a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {COMFYUI!r})", allow_module_level=True)

requests = pytest.importorskip("requests")

API_WORKFLOW = os.path.join(ROOT, "example_workflows", "vae_finetune_api.json")
PACK = "comfyui-vae-finetune"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(base, "server.log"), "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   VAEFT_LPIPS_BACKBONE=os.path.join(base, "vgg16-random.pth"))
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", base, "--disable-auto-launch", "--disable-api-nodes"],
            cwd=COMFYUI, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.read_log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start:\n{self.read_log()[-4000:]}")

    def read_log(self) -> str:
        self.log.flush()
        with open(os.path.join(self.base, "server.log")) as f:
            return f.read()

    def queue(self, prompt: dict) -> str:
        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=30)
        assert r.ok, r.text
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = requests.get(f"{self.url}/history/{prompt_id}", timeout=10).json()
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.read_log()[-4000:]}")

    def healthy(self) -> bool:
        return self.proc.poll() is None and requests.get(self.url + "/system_stats", timeout=5).ok

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _messages(entry: dict) -> str:
    return json.dumps(entry.get("status", {}).get("messages", []))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torchvision
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from training.vae import diffusers_to_ldm

    base = str(tmp_path_factory.mktemp("comfy"))
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base, "custom_nodes", PACK))
    # A random-init VAE in the full SD channel layout (stock Load VAE accepts only that).
    torch.manual_seed(0)
    sd = diffusers_to_ldm(AutoencoderKL(**SD_VAE_CONFIG).state_dict())
    os.makedirs(os.path.join(base, "models", "vae"))
    base_file = os.path.join(base, "models", "vae", "random_sd_vae.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, base_file)
    # LPIPS runs for real, on an explicitly random VGG backbone (no weights can be downloaded here).
    feats = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith("features.")}
    torch.save(feats, os.path.join(base, "vgg16-random.pth"))
    write_images(os.path.join(base, "input", "vae_train"), size=96)
    write_images(os.path.join(base, "input"), names=("astronaut",), size=64)
    server = Server(base)
    try:
        yield server, base, sd
    finally:
        server.stop()


def _example(vae_name: str, folder: str, **train) -> dict:
    with open(API_WORKFLOW) as f:
        prompt = json.load(f)
    nodes = {n["class_type"]: n for n in prompt.values()}
    nodes["VAELoader"]["inputs"]["vae_name"] = vae_name
    ds = nodes["VAEFTPatchDataset"]["inputs"]
    ds.update(folder=folder, patch_size=32, foreground_threshold=0.0)
    ft = nodes["VAEFTFineTune"]["inputs"]
    ft.update(steps=2, batch_size=1, preview_every=1, log_every=1)
    ft.update(train)
    nodes["VAEFTSave"]["inputs"]["name"] = "retina"
    return prompt


def test_nodes_are_registered(comfy):
    server, _, _ = comfy
    info = requests.get(server.url + "/object_info", timeout=30).json()
    for node in ("VAEFTPatchDataset", "VAEFTFineTune", "VAEFTSave", "VAEFTLossGraph", "VAEFTEvaluate"):
        assert node in info, f"{node} missing; server log:\n{server.read_log()[-3000:]}"
    ft = info["VAEFTFineTune"]
    assert ft["output"] == ["VAE", "LOSS_MAP", "VAEFT_TRAINED"]
    assert ft["input"]["required"]["lpips_weight"][1]["default"] == 0.1


def test_api_example_trains_saves_and_stock_load_vae_loads_it(comfy):
    from safetensors.torch import load_file

    server, base, base_sd = comfy
    entry = server.wait(server.queue(_example("random_sd_vae.safetensors", "vae_train")))
    assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
    out_file = os.path.join(base, "output", "vae", "vae-ft-retina-2.safetensors")
    assert os.path.isfile(out_file)

    exported = load_file(out_file)
    assert set(exported) == set(base_sd)
    for k, v in base_sd.items():
        assert exported[k].shape == v.shape, k
        if k.startswith(("encoder.", "quant_conv.")):  # dtype 'base': the base file's exact tensors
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), f"encoder weight {k} changed"
    assert not torch.equal(exported["decoder.conv_out.weight"], base_sd["decoder.conv_out.weight"])
    from safetensors import safe_open

    from training.vae import state_dict_sha256

    with safe_open(out_file, "pt") as f:
        meta = f.metadata()
    # the node started from the file's own weights (not ComfyUI's working-dtype copy) and says so
    assert meta["vaeft.base_name"] == "random_sd_vae.safetensors"
    assert meta["vaeft.base_sha256"] == state_dict_sha256(base_sd)
    assert meta["vaeft.recipe"] == "sd-vae-ft-mse" and meta["vaeft.weights"] == "ema"

    # Without a restart: Load VAE lists the new file, and a second prompt uses it.
    info = requests.get(server.url + "/object_info/VAELoader", timeout=30).json()
    assert "vae-ft-retina-2.safetensors" in info["VAELoader"]["input"]["required"]["vae_name"][0]
    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-retina-2.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "roundtrip"}},
    }
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry)
    saved = entry["outputs"]["5"]["images"][0]
    assert os.path.isfile(os.path.join(base, "output", saved["subfolder"], saved["filename"]))

    # The fine-tuned VAE output feeds a downstream VAEDecode in the same graph, too.
    prompt = _example("random_sd_vae.safetensors", "vae_train", seed=1)
    prompt["90"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
    vae_out = [next(k for k, n in prompt.items() if n["class_type"] == "VAEFTFineTune"), 0]
    prompt["91"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["90", 0], "vae": vae_out}}
    prompt["92"] = {"class_type": "VAEDecode", "inputs": {"samples": ["91", 0], "vae": vae_out}}
    prompt["93"] = {"class_type": "PreviewImage", "inputs": {"images": ["92", 0]}}
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "retina-b"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry)
    assert entry["outputs"]["93"]["images"]


def test_evaluate_node_compares_base_and_fine_tuned(comfy):
    server, base, _ = comfy
    if not os.path.exists(os.path.join(base, "output", "vae", "vae-ft-retina-2.safetensors")):
        pytest.skip("needs the export of test_api_example_trains_saves_and_stock_load_vae_loads_it")
    example = _example("random_sd_vae.safetensors", "vae_train")
    dataset = next(n for n in example.values() if n["class_type"] == "VAEFTPatchDataset")
    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": "random_sd_vae.safetensors"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-retina-2.safetensors"}},
        "3": dataset,
        "4": {"class_type": "VAEFTEvaluate", "inputs": {"vae_a": ["1", 0], "vae_b": ["2", 0], "dataset": ["3", 0],
                                                         "patches": 4, "rows": 2, "seed": 0, "lpips_net": "alex"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry)
    table = entry["outputs"]["4"]["text"][0]
    assert "PSNR" in table and "A" in table and "B" in table
    assert "lpips: n/a" in table  # no AlexNet weights on this machine: reported, not guessed
    assert entry["outputs"]["5"]["images"]


def test_dataset_from_an_image_batch(comfy):
    server, _, _ = comfy
    example = _example("random_sd_vae.safetensors", "vae_train")
    dataset = dict(next(n for n in example.values() if n["class_type"] == "VAEFTPatchDataset"))
    dataset["inputs"] = dict(dataset["inputs"], images=["1", 0], folder="")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "2": dataset,
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry)
    summary = json.loads(entry["outputs"]["4"]["text"][0])
    assert summary["images_used"] and not summary["images_skipped"]
    assert entry["outputs"]["3"]["images"]


def test_existing_file_is_not_overwritten(comfy):
    server, base, _ = comfy
    target = os.path.join(base, "output", "vae", "vae-ft-keep-2.safetensors")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(b"precious")
    prompt = _example("random_sd_vae.safetensors", "vae_train")
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "keep"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    assert "already exists" in _messages(entry)
    with open(target, "rb") as f:
        assert f.read() == b"precious"


@pytest.mark.parametrize("folder,expected", [("../", "outside ComfyUI's input directory"),
                                             ("no_such_folder", "does not exist")])
def test_bad_folder_is_a_clear_error(comfy, folder, expected):
    server, _, _ = comfy
    entry = server.wait(server.queue(_example("random_sd_vae.safetensors", folder)))
    assert entry["status"]["status_str"] == "error"
    assert expected in _messages(entry)
    assert server.healthy()


def test_bad_save_name_is_a_clear_error(comfy):
    server, base, _ = comfy
    prompt = _example("random_sd_vae.safetensors", "vae_train")
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "../../evil"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    assert "plain file name" in _messages(entry)
    assert not any("evil" in name for _, _, files in os.walk(base) for name in files)


def test_interrupt_stops_training_and_server_stays_healthy(comfy):
    server, base, _ = comfy
    prompt = _example("random_sd_vae.safetensors", "vae_train", steps=100000, preview_every=0)
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "never"
    pid = server.queue(prompt)
    deadline = time.time() + 120
    # wait until *this* prompt is training (an interrupt sent before it starts is cleared by ComfyUI)
    while "/100000:" not in server.read_log() and time.time() < deadline:
        time.sleep(0.5)
    requests.post(server.url + "/interrupt", timeout=10)
    t0 = time.time()
    entry = server.wait(pid, timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in _messages(entry)
    assert time.time() - t0 < 60
    assert not os.path.exists(os.path.join(base, "output", "vae", "vae-ft-never-100000.safetensors"))
    assert server.healthy()
    prompt = _example("random_sd_vae.safetensors", "vae_train", seed=7)
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "after-interrupt"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry)


def test_widgets_keep_what_users_type(comfy):
    """What ComfyUI's frontend does with our specs: it adds a "randomize" control after an INT named
    seed unless told not to, and rounds a FLOAT to the decimals of its step."""
    server, _, _ = comfy
    info = requests.get(server.url + "/object_info", timeout=30).json()
    typical = {"lr": 5e-6, "ema_decay": 0.9999, "kl_weight": 1e-6, "weight_decay": 1e-4, "lpips_weight": 0.05,
               "min_foreground": 0.35, "grad_clip": 0.5}
    seen = set()
    for node in ("VAEFTPatchDataset", "VAEFTFineTune", "VAEFTEvaluate"):
        for name, spec in info[node]["input"]["required"].items():
            kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
            if kind == "INT":  # the frontend's rule for adding the control widget
                control = opts.get("control_after_generate")
                assert not (control or (control is None and name in ("seed", "noise_seed"))), (node, name)
            if kind == "FLOAT":
                decimals = max(0, -math.floor(math.log10(opts["step"])))
                for value in (opts["default"], typical.get(name, opts["default"])):
                    assert round(value, decimals) == pytest.approx(value, rel=1e-9, abs=1e-12), (node, name, value)
                seen.add(name)
    assert set(typical) <= seen


def test_loss_map_with_validation_rows_feeds_stock_plot_loss_graph(comfy):
    """Validation on steps that log no loss: the LOSS_MAP still has no gaps in "loss"."""
    server, base, _ = comfy
    prompt = _example("random_sd_vae.safetensors", "vae_train", steps=3, log_every=2, val_every=1, val_patches=2,
                      preview_every=0)
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "lossmap"
    prompt["99"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["3", 1], "filename_prefix": "vaeft_loss"}}
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-3000:]
    assert entry["outputs"]["99"]["images"] and entry["outputs"]["6"]["images"]


def test_dataset_node_reruns_when_its_folder_changes(comfy):
    """ComfyUI caches a node by its inputs; the dataset must still see images added to its folder."""
    server, base, _ = comfy
    write_images(os.path.join(base, "input", "grows"), names=("astronaut", "coffee"), size=64)
    dataset = next(n for n in _example("random_sd_vae.safetensors", "grows").values()
                   if n["class_type"] == "VAEFTPatchDataset")
    prompt = {"1": dataset, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}

    def cached_nodes() -> list:
        entry = server.wait(server.queue(prompt))
        assert entry["status"]["status_str"] == "success", _messages(entry)
        return [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"][0]

    cached_nodes()
    assert "1" in cached_nodes()           # nothing changed: cached
    write_images(os.path.join(base, "input", "grows"), names=("chelsea",), size=64)
    assert "1" not in cached_nodes()       # a new image: built again


def test_ui_example_matches_the_live_node_definitions(comfy):
    import importlib.util

    server, _, _ = comfy
    spec = importlib.util.spec_from_file_location(
        "build_ui_workflow", os.path.join(ROOT, "example_workflows", "build_ui_workflow.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    info = requests.get(server.url + "/object_info", timeout=30).json()
    with open(API_WORKFLOW) as f:
        api = json.load(f)
    with open(os.path.join(ROOT, "example_workflows", "vae_finetune.json")) as f:
        committed = json.load(f)
    assert builder.build(api, info) == committed, (
        "example_workflows/vae_finetune.json is stale: rebuild it with build_ui_workflow.py")


# ---------------------------------------------------------------------------------------------
# Hostile files in the data folder (issue 15): the node form of tests/test_hostile_inputs.py


def _dataset_prompt(server, folder: str, **settings) -> dict:
    """VAE Patch Dataset on ``folder`` with a PreviewAny of its summary. Each setting goes to the
    dataset node when it has that input, else to the node that has it and feeds one of the
    dataset node's sockets; required inputs left out take their defaults."""
    info = requests.get(server.url + "/object_info", timeout=30).json()

    def inputs(node: str) -> dict:
        return {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}

    ds = inputs("VAEFTPatchDataset")
    prompt = {"1": {"class_type": "VAEFTPatchDataset", "inputs": {"folder": folder}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}}
    for key, value in settings.items():
        if key in ds:
            prompt["1"]["inputs"][key] = value
            continue
        feeder = next(n for n in info if key in inputs(n)
                      and any(spec[0] in info[n]["output"] for spec in ds.values()))
        socket_name = next(s for s, spec in ds.items() if spec[0] in info[feeder]["output"])
        prompt.setdefault("3", {"class_type": feeder, "inputs": {}})["inputs"][key] = value
        prompt["1"]["inputs"][socket_name] = ["3", info[feeder]["output"].index(ds[socket_name][0])]
    for node in prompt.values():
        for name, spec in info[node["class_type"]]["input"]["required"].items():
            if name not in node["inputs"] and len(spec) > 1 and "default" in spec[1]:
                node["inputs"][name] = spec[1]["default"]
    return prompt


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero need a POSIX system")
def test_dataset_node_skips_special_files_without_hanging(comfy):
    from hostile_files import FifoWatchdog, png, snapshot

    server, base, _ = comfy
    folder = os.path.join(base, "input", "hostile")
    write_images(folder, names=("astronaut", "coffee"), size=64)
    os.mkfifo(os.path.join(folder, "x.png"))
    os.symlink("/dev/zero", os.path.join(folder, "z.png"))
    with open(os.path.join(folder, "wide.png"), "wb") as f:
        f.write(png(100000, 1))
    before = snapshot(folder)
    prompt = _dataset_prompt(server, "hostile", patch_size=64, upscale_small=True, foreground_threshold=0.0)
    with FifoWatchdog([os.path.join(folder, "x.png")], seconds=120) as dog:
        entry = server.wait(server.queue(prompt), timeout=240)
    assert not dog.fired, "the prompt blocked on the FIFO"
    assert entry["status"]["status_str"] == "success", _messages(entry)
    summary = json.loads(entry["outputs"]["2"]["text"][0])
    reasons = {e["path"]: e["reason"] for e in summary["images_skipped"]}
    assert reasons["x.png"].startswith("a named pipe (FIFO), not a regular file")
    assert reasons["z.png"].startswith("a link to a character device (/dev/zero), not a regular file")
    assert reasons["wide.png"].startswith("100000×1 pixels would be 6400000×64 (409.6 megapixels)")
    assert summary["images_used"] == ["astronaut.png", "coffee.png"]
    assert snapshot(folder) == before
    assert server.healthy()


@pytest.mark.parametrize("setting", ["folder", "mask_folder"])
def test_dataset_node_folder_that_is_a_file(comfy, setting):
    server, base, _ = comfy
    afile = os.path.join(base, "input", "files", "images.png")  # a subfolder: Load Image lists top-level files
    os.makedirs(os.path.dirname(afile), exist_ok=True)
    with open(afile, "wb") as f:
        f.write(b"precious")
    settings = {"folder": "vae_train", setting: "files/images.png"}
    prompt = _dataset_prompt(server, settings.pop("folder"), **settings)
    entry = server.wait(server.queue(prompt), timeout=240)
    assert entry["status"]["status_str"] == "error"
    text = _messages(entry)
    assert "'files/images.png' in ComfyUI's input directory" in text and "is a file, not a folder" in text
    assert "does not exist" not in text
    with open(afile, "rb") as f:
        assert f.read() == b"precious"
    assert server.healthy()
