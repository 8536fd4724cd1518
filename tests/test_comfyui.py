"""End to end against a real, headless ComfyUI (COMFYUI_PATH): queue the API example workflow,
then load the exported file with stock Load VAE -> VAEEncode -> VAEDecode in a second prompt.

Skipped, with the reason, when no ComfyUI checkout is available.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from comfy_server import (PACK, TEMPLATES, api_example, comfyui_path, comfyui_version, encode_with_each, flux2_unreadable,
                         write_flux2_vae)
from comfy_server import messages as _messages
from conftest import remove_run_folders, write_images

pytestmark = pytest.mark.integration  # a real ComfyUI: -m "not integration" skips it
COMFYUI = comfyui_path()
if COMFYUI is None:
    pytest.skip("ComfyUI integration tests need a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {os.environ.get('COMFYUI_PATH', '')!r})", allow_module_level=True)

requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def comfy(comfyui_server):
    yield comfyui_server
    remove_run_folders(comfyui_server[1])


def _example(vae_name: str, folder: str, template: str = "vae_finetune", **train) -> dict:
    """The simple API example (or ``template``'s, same graph) with a short run: VAE Fine-tune's own widgets from
    ``train`` where it has them, every other setting through a VAE Fine-tune Options node (its defaults from
    the advanced example)."""
    prompt = api_example(template)
    nodes = {n["class_type"]: n for n in prompt.values()}
    nodes["VAELoader"]["inputs"]["vae_name"] = vae_name
    ds = nodes["VAEFTPatchDataset"]["inputs"]
    ds.update(folder=folder, patch_size=32, foreground_threshold=0.0)
    ft = nodes["VAEFTFineTune"]["inputs"]
    settings = {**dict(steps=2, batch_size=1, preview_every=1, log_every=1), **train}
    options = dict(next(n for n in api_example("vae_finetune_advanced").values()
                        if n["class_type"] == "VAEFTFineTuneOptions")["inputs"], val_every=0)
    for k, v in settings.items():
        (ft if k in ft else options)[k] = v
    prompt["50"] = {"class_type": "VAEFTFineTuneOptions", "inputs": options}
    ft["options"] = ["50", 0]
    nodes["VAEFTSave"]["inputs"]["name"] = "retina"
    return prompt


def assert_wan_decoder_only(exported: dict, sd: dict) -> None:
    """A Wan-layout export of a decoder-only run (bf16 base): the base's keys, shapes and dtype; the encoder,
    conv1 and the temporal resampling byte for byte; a decoder that moved."""
    assert set(exported) == set(sd)
    for k in sd:
        assert exported[k].dtype == torch.bfloat16 and exported[k].shape == sd[k].shape, k
        if k.startswith(("encoder.", "conv1.")) or ".time_conv." in k:
            assert torch.equal(exported[k], sd[k]), k
    assert not torch.equal(exported["decoder.head.2.weight"], sd["decoder.head.2.weight"])


def _round_trip(server, vae_name: str, prefix: str) -> dict:
    """Stock Load VAE lists ``vae_name`` without a restart, and VAE Encode -> VAE Decode -> Save Image runs
    with it: the finished prompt's history entry."""
    info = requests.get(server.url + "/object_info/VAELoader", timeout=30).json()
    assert vae_name in info["VAELoader"]["input"]["required"]["vae_name"][0]
    entry = server.wait(server.queue({
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }))
    assert entry["status"]["status_str"] == "success", _messages(entry)
    return entry


def test_nodes_are_registered(comfy):
    server, _, _ = comfy
    info = requests.get(server.url + "/object_info", timeout=30).json()
    for node in OUR_NODES:
        assert node in info, f"{node} missing; server log:\n{server.read_log()[-3000:]}"
    ft = info["VAEFTFineTune"]
    assert ft["output"] == ["VAE", "LOSS_MAP", "VAEFT_TRAINED"]
    # sockets named alike on every ComfyUI (0.3.x would name them by type, 0.28 by id)
    assert ft["output_name"] == ["fine_tuned_vae", "loss", "trained"]
    assert info["VAEFTFineTuneOptions"]["input"]["required"]["lpips_weight"][1]["default"] == 0.1
    # VAE Distil Decoder: the teacher in (not "vae": 0.3.x refuses an input and an output of one id), the student
    # (or the teacher, tiny) out; it writes a file, so it runs as an output node
    distil = info["VAEFTDistilDecoder"]
    assert distil["output"] == ["VAE", "LOSS_MAP", "STRING"] and distil["output_name"] == ["vae", "loss", "report"]
    assert distil["output_node"] is True
    assert set(distil["input"]["required"]) == {"teacher", "dataset", "student", "width", "with_encoder", "steps",
                                                "lr", "batch_size", "memory", "seed", "image_weight", "family",
                                                "save_name", "run_name", "continue_run"}
    assert set(distil["input"]["optional"]) == {"options"}
    assert _combo(distil, "student") == ["narrow", "tiny"]
    # lr right after steps; 0 (the default) is the student's recipe lr, and the step allows 1e-5-scale values
    required = list(distil["input"]["required"])
    assert required.index("lr") == required.index("steps") + 1
    lr = distil["input"]["required"]["lr"][1]
    assert (lr["default"], lr["min"], lr["max"]) == (0.0, 0.0, 1.0) and lr["step"] <= 1e-6
    # the distil recipes need a teacher: VAE Fine-tune does not offer them
    assert "sd-vae-ft-mse" in _combo(ft, "recipe") and not [r for r in _combo(ft, "recipe") if "distil" in r]


def _combo(spec: dict, name: str) -> list:
    """A combo input's options, as 0.3.x ([options, {...}]) and 0.28 (["COMBO", {"options": ...}]) list them."""
    s = {**spec["input"]["required"], **spec["input"].get("optional", {})}[name]
    return s[0] if isinstance(s[0], list) else s[1]["options"]


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

    from training.tensors import sha256

    with safe_open(out_file, "pt") as f:
        meta = f.metadata()
    # the node started from the file's own weights (not ComfyUI's working-dtype copy) and says so
    assert meta["vaeft.base_name"] == "random_sd_vae.safetensors"
    assert meta["vaeft.base_sha256"] == sha256(base_sd)
    assert meta["vaeft.recipe"] == "sd-vae-ft-mse" and meta["vaeft.weights"] == "ema"

    # The fine-tuned VAE output feeds a downstream VAEDecode in the same graph, too (the same fine-tune:
    # ComfyUI's cache reuses it, only the new nodes and Save run).
    prompt = _example("random_sd_vae.safetensors", "vae_train")
    prompt["90"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
    vae_out = [next(k for k, n in prompt.items() if n["class_type"] == "VAEFTFineTune"), 0]
    prompt["91"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["90", 0], "vae": vae_out}}
    prompt["92"] = {"class_type": "VAEDecode", "inputs": {"samples": ["91", 0], "vae": vae_out}}
    prompt["93"] = {"class_type": "PreviewImage", "inputs": {"images": ["92", 0]}}
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "retina-b"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry)
    assert entry["outputs"]["93"]["images"]

    # Without a restart: Load VAE lists the new file, and a second prompt uses it.
    entry = _round_trip(server, "vae-ft-retina-2.safetensors", "roundtrip")
    saved = entry["outputs"]["5"]["images"][0]
    assert os.path.isfile(os.path.join(base, "output", saved["subfolder"], saved["filename"]))



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


def _compare_node(base: str, tuned: str, latent: list, half: str = "auto") -> dict:
    """VAE Compare on Latents; fp16/bf16 'auto' is off on a CPU: a full-size SD decoder in fp16 there takes ~100 s
    per VAE even on a 64-px crop (tests/test_latent_compare.py checks the half-precision figures, on small VAEs)."""
    return {"class_type": "VAEFTCompareOnLatents", "inputs": {"base": [base, 0], "tuned": [tuned, 0], "latent": latent,
                                                             "limit": 8, "half_precision": half, "lpips_net": "alex"}}


def test_compare_on_latents_shows_base_beside_tuned_and_refuses_another_familys_latent(comfy):
    """VAE Compare on Latents on VAE Encode's LATENT (a 32-px image): the report has a base and a tuned column, the
    round trip and base-vs-tuned PSNR; the IMAGE is base | tuned | difference; the same VAE twice is identical
    (100 dB). A Flux.2 latent (128 channels, as Save Latent writes it, through Load Latent) on a kl-f8 VAE is
    refused with our message naming both channel counts, no traceback in it, and the server lives on.
    Full-size SD VAEs: ComfyUI's Load VAE reads no smaller kl-f8 (nor any Flux.2 in 0.3.64)."""
    import io

    from PIL import Image
    from safetensors.torch import save_file

    server, base, sd = comfy
    g = torch.Generator().manual_seed(1)
    # the tuned VAE: the base with its decoder's last convolution moved (what a decoder-only fine-tune changes)
    tuned = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if k.startswith("decoder.conv_out.") else v).contiguous()
             for k, v in sd.items()}
    tuned_path = os.path.join(base, "models", "vae", "vae-ft-compare-1.safetensors")
    save_file(tuned, tuned_path)
    latent_path = os.path.join(base, "input", "flux2-sample.latent")
    save_file({"latent_tensor": torch.randn(1, 128, 2, 2, generator=g), "latent_format_version_0": torch.tensor([])},
              latent_path)
    try:
        graph = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "random_sd_vae.safetensors"}},
                 "2": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-compare-1.safetensors"}},
                 "3": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
                 "30": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "area",
                                                               "width": 32, "height": 32, "crop": "disabled"}},
                 "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 0]}},
                 "5": _compare_node("1", "2", ["4", 0]),
                 "6": _compare_node("1", "1", ["4", 0]),
                 "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
        entry = server.wait(server.queue(graph))
        assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
        report = entry["outputs"]["5"]["text"][0]
        lines = report.splitlines()
        assert lines[0].startswith("1 latent (32x32 px), base kl-f8, tuned kl-f8"), report
        assert lines[1].split() == ["base", "tuned"], report
        assert any(line.startswith("round trip (rel. RMS)") and len(line.split()) == 6 for line in lines), report
        assert not any(line.startswith("fp16") for line in lines), report  # half_precision auto, on a CPU: not measured
        assert "note: fp16/bf16 not checked: on a CPU" in report, report
        psnr = next(line for line in lines if line.startswith("base vs tuned: PSNR "))
        assert float(psnr.split("PSNR ")[1].split(" dB")[0]) < 100, report
        assert "PSNR 100.00 dB" in entry["outputs"]["6"]["text"][0]  # the same VAE twice: identical decodes
        (shown,) = entry["outputs"]["7"]["images"]
        r = requests.get(server.url + "/view", params=shown, timeout=30)
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.size == (3 * 32 + 2 * 2, 32), im.size  # base | tuned | difference, 2 px apart

        graph = {"1": graph["1"], "2": graph["2"],
                 "8": {"class_type": "LoadLatent", "inputs": {"latent": "flux2-sample.latent"}},
                 "9": _compare_node("1", "2", ["8", 0], half="on"),  # refused before any decode
                 "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}}
        entry = server.wait(server.queue(graph))
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "error" and errors, _messages(entry)
        error = errors[0]
        assert error["node_type"] == "VAEFTCompareOnLatents" and error["exception_type"].endswith("VAEFTError"), error
        message = error["exception_message"]
        assert "has 128 latent channels" in message and "kl-f8" in message and "whose latents have 4" in message, message
        assert "Traceback" not in message and 'File "' not in message, message
        assert "10" not in entry["outputs"] and "9" not in entry["outputs"]  # nothing shown or written
        assert server.healthy()
    finally:
        os.unlink(tuned_path)
        os.unlink(latent_path)


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


@pytest.mark.parametrize("folder,expected", [("../", "outside ComfyUI's input directory"),
                                             ("no_such_folder", "does not exist")])
def test_bad_folder_is_a_clear_error(comfy, folder, expected):
    server, _, _ = comfy
    entry = server.wait(server.queue(_example("random_sd_vae.safetensors", folder)))
    assert entry["status"]["status_str"] == "error"
    assert expected in _messages(entry)
    assert server.healthy()


def test_save_refuses_an_existing_file_and_a_bad_name(comfy):
    """Save Fine-tuned VAE never overwrites a file and never writes outside output/vae (the second
    prompt differs only in Save's name: ComfyUI reuses the fine-tune and runs Save alone)."""
    server, base, _ = comfy
    target = os.path.join(base, "output", "vae", "vae-ft-keep-2.safetensors")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(b"precious")
    prompt = _example("random_sd_vae.safetensors", "vae_train", seed=3)
    save = next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]
    save["name"] = "keep"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    assert "already exists" in _messages(entry)
    with open(target, "rb") as f:
        assert f.read() == b"precious"

    save["name"] = "../../evil"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    assert "plain file name" in _messages(entry)
    assert not any("evil" in name for _, _, files in os.walk(base) for name in files)

    # a fine-tune of a VAE Load VAE lists from output/vae/, saved under that VAE's own name with overwrite on:
    # refused, the base left as it was
    import shutil

    own = os.path.join(base, "output", "vae", "vae-ft-self-2.safetensors")
    shutil.copy(os.path.join(base, "models", "vae", "random_sd_vae.safetensors"), own)
    with open(own, "rb") as f:
        before = f.read()
    prompt = _example("vae-ft-self-2.safetensors", "vae_train", seed=3)
    save = next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]
    save.update(name="self", overwrite=True)
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error", _messages(entry)
    assert "never writes over its base" in _messages(entry)
    with open(own, "rb") as f:
        assert f.read() == before
    os.remove(own)


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
    prompt = _example("random_sd_vae.safetensors", "vae_train", seed=7, steps=1)
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
    for node in OUR_NODES:
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

    # with a mask folder, and VAE Patch Options connected: an edited mask rebuilds it too
    from PIL import Image

    masks = os.path.join(base, "input", "grows_masks")
    os.makedirs(masks)
    for name in os.listdir(os.path.join(base, "input", "grows")):
        with Image.open(os.path.join(base, "input", "grows", name)) as im:
            Image.new("L", im.size, 255).save(os.path.join(masks, name))
    options = next(n for n in api_example("vae_finetune_advanced").values() if n["class_type"] == "VAEFTPatchOptions")
    prompt["1"] = dict(dataset, inputs=dict(dataset["inputs"], mask_folder="grows_masks", options=["3", 0]))
    prompt["3"] = options
    cached_nodes()
    assert "1" in cached_nodes()
    with Image.open(os.path.join(masks, "coffee.png")) as im:
        Image.new("L", im.size, 0).save(os.path.join(masks, "coffee.png"))
        os.utime(os.path.join(masks, "coffee.png"), ns=(1, 1))  # a new mtime even within the clock's resolution
    assert "1" not in cached_nodes()


def test_ui_examples_match_the_live_node_definitions(comfy):
    import importlib.util

    server, _, _ = comfy
    spec = importlib.util.spec_from_file_location(
        "build_ui_workflow", os.path.join(TEMPLATES, "build_ui_workflow.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    info = requests.get(server.url + "/object_info", timeout=30).json()
    examples = builder.api_examples()
    # every template, each built from its API example
    assert set(examples) == {n[:-5] for n in os.listdir(TEMPLATES) if n.endswith(".json")} == set(TEMPLATE_NAMES)
    for name, path in examples.items():
        with open(path) as f:
            api = json.load(f)
        with open(os.path.join(TEMPLATES, name + ".json")) as f:
            committed = json.load(f)
        assert builder.build(api, info) == committed, (
            f"example_workflows/{name}.json is stale: rebuild it with build_ui_workflow.py")


OUR_NODES = ("VAEFTPatchDataset", "VAEFTPatchOptions", "VAEFTFineTune", "VAEFTFineTuneOptions", "VAEFTSave",
             "VAEFTLossGraph", "VAEFTEvaluate", "VAEFTCompareOnLatents", "VAEFTDistilDecoder")
TEMPLATE_NAMES = ("vae_finetune", "vae_finetune_advanced", "vae_finetune_flux2", "vae_finetune_qwen_image",
                  "vae_finetune_qwen_image21", "vae_finetune_wan22", "vae_compare_on_latents", "vae_distil_decoder")
# Where core files its training nodes (Train LoRA, Loss Graph), in the ComfyUI versions the tests run on
CORE_TRAINING_CATEGORY = {"0.3.48": "training", "0.3.64": "training", "0.28.2": "model/training"}


def test_nodes_describe_every_input_and_output_and_are_marked_like_core_training_nodes(comfy):
    server, _, _ = comfy
    info = requests.get(server.url + "/object_info", timeout=30).json()
    core_training = info["TrainLoraNode"]
    # core files its training nodes under "training" (0.3.x) or "model/training" (0.28): ours go in a "vae"
    # folder beside them, wherever that is
    version = comfyui_version()
    if version in CORE_TRAINING_CATEGORY:
        assert core_training["category"] == CORE_TRAINING_CATEGORY[version], (version, core_training["category"])
    assert core_training["category"].split("/")[-1] == "training", core_training["category"]
    for node in OUR_NODES:
        spec = info[node]
        assert spec["description"], node
        # core marks its training nodes experimental, and so are ours, in a folder beside them
        assert spec["experimental"] is core_training["experimental"] is True, node
        assert spec["category"] == core_training["category"] + "/vae", (node, spec["category"])
        inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        for name, s in inputs.items():
            assert len(s) > 1 and s[1].get("tooltip"), f"{node}.{name} has no tooltip"
        assert all(spec["output_tooltips"]), (node, spec["output_tooltips"])
    # the main nodes stay short: at most ~10 widgets; the rest is on their options nodes
    widgets = lambda n: [k for k, s in info[n]["input"]["required"].items()  # noqa: E731
                         if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
    assert len(widgets("VAEFTFineTune")) <= 10 and len(widgets("VAEFTPatchDataset")) <= 10
    assert "memory" in widgets("VAEFTFineTune")
    assert info["VAEFTFineTune"]["input"]["optional"]["options"][0] == info["VAEFTFineTuneOptions"]["output"][0]
    assert info["VAEFTPatchDataset"]["input"]["optional"]["options"][0] == info["VAEFTPatchOptions"]["output"][0]
    # every registered family is named where users choose a file and an export format (read off the registry)
    from training.families import FAMILIES

    save = info["VAEFTSave"]["input"]["optional"]
    for family in FAMILIES:
        assert family.models in info["VAEFTFineTune"]["description"], family.name
        assert family.diffusers_classes in save["format"][1]["tooltip"], family.name
        assert family.short in save["family"][1]["tooltip"], family.name


def test_templates_are_listed_and_served_with_their_thumbnails(comfy):
    """ComfyUI's template gallery lists example_workflows/*.json and shows <name>.jpg beside each;
    the API-format examples (examples/api/) are not templates."""
    server, _, _ = comfy
    listed = requests.get(server.url + "/workflow_templates", timeout=30).json()
    names = sorted(n[:-5] for n in os.listdir(TEMPLATES) if n.endswith(".json"))
    assert sorted(listed[PACK]) == names == sorted(TEMPLATE_NAMES)
    for name in names:
        r = requests.get(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30)
        assert r.ok and r.headers["Content-Type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff", name
        r = requests.get(f"{server.url}/api/workflow_templates/{PACK}/{name}.json", timeout=30)
        assert r.ok and "nodes" in r.json(), name


def test_advanced_api_example_runs_with_both_options_nodes_and_evaluate(comfy):
    server, base, _ = comfy
    prompt = api_example("vae_finetune_advanced")
    prompt["1"]["inputs"]["vae_name"] = "random_sd_vae.safetensors"
    prompt["2"]["inputs"].update(patch_size=32, foreground_threshold=0.0)
    prompt["8"]["inputs"].update(min_foreground=0.0, cache_mb=0)
    prompt["3"]["inputs"].update(steps=2, batch_size=2, memory="6GB", run_name="advanced-example")
    prompt["9"]["inputs"].update(val_every=1, val_patches=2, preview_every=0, log_every=1)
    prompt["10"]["inputs"].update(patches=2, rows=1)
    prompt["4"]["inputs"]["name"] = "advanced"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-3000:]
    out_file = os.path.join(base, "output", "vae", "vae-ft-advanced-2.safetensors")
    assert any(out_file in t for t in entry["outputs"]["4"]["text"])  # the Save node says where
    assert "PSNR" in entry["outputs"]["10"]["text"][0] and entry["outputs"]["11"]["images"]
    from safetensors import safe_open

    with safe_open(out_file, "pt") as f:
        meta = f.metadata()
    # the options nodes' values reached the run: validation every step, and the 6GB memory preset's
    # micro-batch for 32² patches (the batch of 2 at once) with gradient checkpointing; the patch
    # options' cache_mb=0 reached the dataset (no image kept in memory)
    assert (meta["vaeft.config.memory"], meta["vaeft.config.micro_batch"], meta["vaeft.config.grad_checkpointing"],
            meta["vaeft.config.val_every"], meta["vaeft.config.latent_cache_mb"]) == ("6GB", "2", "True", "1", "256")
    # (the export's metadata keeps only private facts about the data; the run folder's config has them all)
    with open(os.path.join(base, "output", "vae_ft_runs", "advanced-example", "config.json")) as f:
        settings = json.load(f)["settings"]
    assert settings["cache_mb"] == 0 and settings["min_foreground"] == 0.0 and settings["val_every"] == 1


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


def test_a_qwen_image_vae_from_load_vae_trains_saves_and_round_trips(comfy):
    """The Wan 2.1 family through stock Load VAE: a full-size Qwen-Image VAE (random, bf16, the released
    layout) goes through VAE Fine-tune as it is; the saved file is listed by Load VAE, keeps the base's
    encoder (and so its latents) bit for bit, and round-trips VAE Encode -> VAE Decode."""
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import load_file, save_file

    from training.families import wan

    server, base, _ = comfy
    torch.manual_seed(3)
    sd = {wan.to_original_key(k): v.to(torch.bfloat16).contiguous()
          for k, v in AutoencoderKLQwenImage().state_dict().items()}
    save_file(sd, os.path.join(base, "models", "vae", "qwen_image_vae.safetensors"))
    prompt = _example("qwen_image_vae.safetensors", "vae_train", steps=1, batch_size=1, preview_every=0)
    next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "qwen"
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
    out_file = os.path.join(base, "output", "vae", "vae-ft-qwen-1.safetensors")
    assert_wan_decoder_only(load_file(out_file), sd)
    _round_trip(server, "vae-ft-qwen-1.safetensors", "qwen-roundtrip")
    assert "Missing VAE keys" not in server.read_log() and "Leftover VAE keys" not in server.read_log()
    os.unlink(os.path.join(base, "models", "vae", "qwen_image_vae.safetensors"))


# ComfyUI's own Load VAE on a file (the preamble's job path), its log at DEBUG (missing and leftover keys).
COMFY_READS_FLUX2 = r'''
from safetensors.torch import load_file
sd = load_file(jobs_path)
vae = comfy.sd.VAE(sd=sd)
bn = vae.first_stage_model.bn
print("RESULT " + json.dumps({
    "latent_channels": vae.latent_channels, "downscale": vae.downscale_ratio,
    "bn_stats": bool(torch.equal(bn.running_mean.float(), sd["bn.running_mean"].float())
                     and torch.equal(bn.running_var.float(), sd["bn.running_var"].float())),
    "keys": [m for m in messages if "VAE keys" in m]}))
'''


def test_the_flux2_template_trains_and_load_vae_reads_the_result_with_the_base_latents(comfy):
    """The Flux.2 template's graph (examples/api/vae_finetune_flux2_api.json, with a short run's values) on a
    full-size random FLUX.2 VAE in Black Forest Labs' layout, bf16, as flux2-vae.safetensors. The saved file is
    read by ComfyUI's own Load VAE as a Flux.2 VAE (every key used, its BatchNorm statistics among them; 128
    patchified latent channels, 16x down) and encodes an image to exactly the base's latents (decoder-only: the
    encoder and the statistics are the base's, byte for byte), while its decoder changed and decodes."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from comfy_server import COMFY_LOADER_PREAMBLE

    why = flux2_unreadable()
    if why:
        pytest.skip(why)
    server, base, _ = comfy
    src = os.path.join(base, "models", "vae", "flux2-vae.safetensors")
    sd = write_flux2_vae(src)
    out_file = os.path.join(base, "output", "vae", "vae-ft-flux2-2.safetensors")
    try:
        prompt = api_example("vae_finetune_flux2")
        assert prompt["1"]["inputs"]["vae_name"] == "flux2-vae.safetensors"
        prompt["2"]["inputs"].update(patch_size=32, foreground_threshold=0.0)
        prompt["3"]["inputs"].update(steps=2, batch_size=1)
        prompt["4"]["inputs"]["name"] = "flux2"
        entry = server.wait(server.queue(prompt))
        assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
        assert any(out_file in t for t in entry["outputs"]["4"]["text"])  # the Save node says where

        exported = load_file(out_file)
        assert set(exported) == set(sd)
        for k in sd:
            assert exported[k].dtype == sd[k].dtype and exported[k].shape == sd[k].shape, k
            if k.startswith(("encoder.", "bn.")):
                assert torch.equal(exported[k], sd[k]), k
        assert not torch.equal(exported["decoder.conv_out.weight"], sd["decoder.conv_out.weight"])

        # stock Load VAE -> VAE Encode -> Save Latent with the base and the fine-tune; the fine-tune's decode
        vaes = {"base": "flux2-vae.safetensors", "tuned": "vae-ft-flux2-2.safetensors"}
        entry, latents = encode_with_each(server, base, vaes, "flux2")
        assert latents["base"].shape == (1, 128, 4, 4), latents["base"].shape  # 64x64 pixels, 16x down, 4 x 32 channels
        assert latents["base"].std() > 0 and torch.equal(latents["tuned"], latents["base"])
        assert entry["outputs"]["25"]["images"]
        assert "Missing VAE keys" not in server.read_log()

        # every tensor of the saved file is used by ComfyUI's reader (nothing left over), the statistics too
        p = subprocess.run([sys.executable, "-c", COMFY_LOADER_PREAMBLE + COMFY_READS_FLUX2, comfyui_path(), out_file],
                           capture_output=True, text=True, timeout=300)
        lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, p.stdout[-3000:] + p.stderr[-3000:]
        assert json.loads(lines[0][7:]) == {"latent_channels": 128, "downscale": 16, "bn_stats": True, "keys": []}
    finally:
        os.unlink(src)


def test_what_comfyui_0_3_64_does_with_a_flux2_vae(comfy):
    """What the README says of Flux.2 in ComfyUI 0.3.64: it predates FLUX.2, so its own Load VAE fails on the
    file (it builds another family's 32-channel VAE) before the pack's nodes run; the command line is the way
    there. A ComfyUI that reads Flux.2 (0.28.2) runs the Flux.2 template: the test above."""
    from safetensors.torch import save_file

    from test_flux2 import tiny_diffusers
    from training.vae import build_vae, model_to_file

    server, base, _ = comfy
    version = open(os.path.join(comfyui_path(), "comfyui_version.py")).read()
    if '"0.3.64"' not in version:
        pytest.skip("documents ComfyUI 0.3.64's behaviour; this checkout is another version")
    loaded = build_vae(tiny_diffusers().state_dict(), source="flux2 diffusers")
    path = os.path.join(base, "models", "vae", "flux2-vae.safetensors")
    save_file({k: v.contiguous() for k, v in model_to_file(loaded.model, loaded.layout).items()}, path)
    try:
        entry = server.wait(server.queue(_example("flux2-vae.safetensors", "vae_train", steps=1, batch_size=1)))
    finally:
        os.unlink(path)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, _messages(entry)
    assert errors[0]["node_type"] == "VAELoader" and "size mismatch" in errors[0]["exception_message"]



# ComfyUI's own VAE under --fp16-vae (what users with GTX 10xx/RTX 20xx/T4 cards get by default) and --fp32-vae
COMFY_HALF = r'''
from safetensors.torch import load_file
jobs = json.load(open(jobs_path))
z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 4  # small: fp16 convolutions are slow on a CPU
out = {}
for name, path, dtype in jobs["decodes"]:
    vae = comfy.sd.VAE(sd=load_file(path), dtype=getattr(torch, dtype))
    with torch.no_grad():
        decoded = vae.decode(z).float()
    torch.save(decoded, os.path.join(jobs["out"], f"{name}.{dtype}.pt"))
    out[f"{name} {dtype}"] = {"dtype": str(vae.vae_dtype), "nan": int(torch.isnan(decoded).sum())}
print("RESULT " + json.dumps(out))
'''


def test_the_fp16_fix_recipe_on_the_node_makes_a_vae_safe_in_comfyuis_own_fp16_decode(comfy, tmp_path):
    """Issue 21 through the node: a full-size SD VAE built to overflow fp16 (decoder.conv_in 1e5x) goes through
    VAE Fine-tune with recipe fp16-fix and stop_when_safe. The saved file says fp16-safe and keeps the encoder
    bit for bit; ComfyUI's own VAE in fp16 decodes the base to NaN and the fix to finite pixels at 30 dB PSNR or
    more against the base's fp32 decode."""
    import glob
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from comfy_server import COMFY_LOADER_PREAMBLE

    server, base, sd = comfy
    bad = {k: (v * 1e5 if k.startswith("decoder.conv_in.") else v).contiguous() for k, v in sd.items()}
    src = os.path.join(base, "models", "vae", "overflowing_sd_vae.safetensors")
    save_file(bad, src)
    try:
        prompt = _example("overflowing_sd_vae.safetensors", "vae_train", recipe="fp16-fix", stop_when_safe=True,
                          steps=4, val_every=2, preview_every=0)
        next(n for n in prompt.values() if n["class_type"] == "VAEFTSave")["inputs"]["name"] = "fp16fix"
        entry = server.wait(server.queue(prompt))
        assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
        (fixed,) = glob.glob(os.path.join(base, "output", "vae", "vae-ft-fp16fix-*.safetensors"))
        with safe_open(fixed, "pt") as f:
            meta = f.metadata()
        assert meta["vaeft.fp16_safe"] == "true" and json.loads(meta["vaeft.fp16_fix"])["rescale"]["exact"] is True
        exported = load_file(fixed)
        assert set(exported) == set(bad)
        assert all(torch.equal(exported[k], bad[k]) for k in bad if k.startswith(("encoder.", "quant_conv.")))
        decodes = [("base", src, "float16"), ("base", src, "float32"), ("fixed", fixed, "float16")]
        (tmp_path / "jobs.json").write_text(json.dumps({"decodes": decodes, "out": str(tmp_path)}))
        p = subprocess.run([sys.executable, "-c", COMFY_LOADER_PREAMBLE + COMFY_HALF, comfyui_path(),
                            str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    finally:
        os.unlink(src)
    assert result["base float16"] == {"dtype": "torch.float16", "nan": 1 * 3 * 24 * 24}  # black in fp16
    assert result["fixed float16"]["nan"] == 0 and result["base float32"]["nan"] == 0
    reference = torch.load(tmp_path / "base.float32.pt")
    mse = float((torch.load(tmp_path / "fixed.float16.pt") - reference).square().mean())  # images in [0, 1]
    assert 10 * math.log10(1 / mse) >= 30
