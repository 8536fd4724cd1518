"""VAE Distil Decoder (issue 30) against a real, headless ComfyUI (COMFYUI_PATH) that reads a narrower decoder:
both students distilled from the full-size random SD VAE through the API, their files read back by ComfyUI's own
loaders (Load VAE, comfy.taesd's TAESD), and a width that is no student refused before anything is written.

ComfyUI's Load VAE reads a narrow kl-f8 decoder from 0.28 on (comfy/sd.py's ``decoder_ch``); on an older one
(0.3.64) the node refuses a narrow student before training, so this module skips there (.ci/run runs it on 0.28.2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from comfy_server import COMFY_LOADER_PREAMBLE, api_example, comfyui_path, comfyui_version, encode_with_each
from comfy_server import messages as _messages
from conftest import remove_run_folders

pytestmark = pytest.mark.integration  # a real ComfyUI: -m "not integration" skips it
COMFYUI = comfyui_path()
if COMFYUI is None:
    pytest.skip("ComfyUI integration tests need a ComfyUI checkout: set COMFYUI_PATH "
                f"(got {os.environ.get('COMFYUI_PATH', '')!r})", allow_module_level=True)
with open(os.path.join(COMFYUI, "comfy", "sd.py")) as _f:
    if "decoder_ch" not in _f.read():
        pytest.skip(f"ComfyUI {comfyui_version() or 'at ' + COMFYUI}'s Load VAE reads no narrower decoder (comfy/sd.py "
                    "has no decoder_ch), so the distil node refuses a narrow student there (.ci/run runs this on "
                    "0.28.2)", allow_module_level=True)

requests = pytest.importorskip("requests")

NAME = "distiltest"


@pytest.fixture(scope="module")
def comfy(comfyui_server):
    yield comfyui_server
    remove_run_folders(comfyui_server[1])


def _distil_prompt(*students: dict) -> dict:
    """Load VAE (the full-size random SD VAE) -> VAE Patch Dataset (32² patches) -> a VAE Distil Decoder per entry
    of ``students`` (its inputs over a 2-step, batch-1 run), every one with VAE Fine-tune Options: LPIPS off,
    validation off (the figures still use 2 held-out patches), a log line every step and a preview at the end."""
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "random_sd_vae.safetensors"}},
              "2": {"class_type": "VAEFTPatchDataset",
                    "inputs": {"folder": "vae_train", "mask_folder": "", "patch_size": 32, "sampling": "random",
                               "foreground_threshold": 0.0, "val_fraction": 0.25, "seed": 0}}}
    options = dict(next(n for n in api_example("vae_finetune_advanced").values()
                        if n["class_type"] == "VAEFTFineTuneOptions")["inputs"])
    options.update(lpips_weight=0.0, val_every=0, val_patches=2, preview_every=2, log_every=1)
    prompt["3"] = {"class_type": "VAEFTFineTuneOptions", "inputs": options}
    for i, inputs in enumerate(students, start=10):
        prompt[str(i)] = {"class_type": "VAEFTDistilDecoder", "inputs": {
            "teacher": ["1", 0], "dataset": ["2", 0], "options": ["3", 0], "student": "narrow", "width": 64,
            "with_encoder": False, "steps": 2, "lr": 0.0, "batch_size": 1, "memory": "auto", "seed": 0,
            "image_weight": 0.0,
            "family": "sd", "save_name": NAME, "run_name": f"distil-{i}", "continue_run": "new run", **inputs}}
    return prompt


def _listing(base: str) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(os.path.join(base, *d.split("/")))) if os.path.isdir(os.path.join(base, *d.split("/")))
            else [] for d in ("output/vae", "models/vae_approx")}


# ComfyUI's own loaders on the students' files (the preamble's job file): Load VAE's reader on the narrow file (its
# log at DEBUG: missing and leftover keys), and comfy.taesd's TAESD on the tiny decoder (load_state_dict, strict)
# decoding given scaled latents.
COMFY_READS_STUDENTS = r'''
from safetensors.torch import load_file, save_file
from comfy.taesd.taesd import TAESD
job = json.load(open(jobs_path))
vae = comfy.sd.VAE(sd=load_file(job["narrow"]))
vae.throw_exception_if_invalid()
conv_in = vae.first_stage_model.decoder.conv_in.weight.shape
taesd = TAESD(None, job["tiny"], latent_channels=4)
z = load_file(job["latents"])["z"]
with torch.no_grad():
    save_file({"decoded": taesd.decode(z).contiguous()}, job["out"])
print("RESULT " + json.dumps({"keys": [m for m in messages if "VAE keys" in m], "conv_in": list(conv_in)}))
'''


def test_distil_node_writes_students_that_comfyuis_own_loaders_read(comfy, tmp_path):
    """Both students from one prompt. narrow 64: output/vae/vae-distil-narrow64-<name>-2.safetensors, listed by Load
    VAE, with the teacher's encoder byte for byte and decoder.conv_in 4 x 64 wide; Load VAE -> VAE Encode gives the
    teacher's latents bit for bit, VAE Decode -> Save Image runs, and ComfyUI's reader uses every key. tiny:
    models/vae_approx/taesd_decoder.ft-<name>.safetensors, loaded strictly by ComfyUI's TAESD, whose decode of scaled
    latents is the library's TinyDecoder's on the same file."""
    from safetensors.torch import load_file, save_file

    from training.students import TinyDecoder

    server, base, teacher = comfy
    t0 = time.time()
    log_start = len(server.read_log())
    entry = server.wait(server.queue(_distil_prompt({}, {"student": "tiny", "lr": 3e-4})))
    assert entry["status"]["status_str"] == "success", _messages(entry) + server.read_log()[-4000:]
    # lr 0 is the student's recipe lr (distil-narrow 1e-4); a value above 0 is what the run trains with
    lrs = [json.load(open(os.path.join(base, "output", "vae_ft_runs", f"distil-{i}", "config.json")))["settings"]["lr"]
           for i in (10, 11)]
    assert lrs == [1e-4, 3e-4], lrs
    narrow_name = f"vae-distil-narrow64-{NAME}-2.safetensors"
    narrow = os.path.join(base, "output", "vae", narrow_name)
    tiny = os.path.join(base, "models", "vae_approx", f"taesd_decoder.ft-{NAME}.safetensors")
    assert os.path.isfile(narrow) and os.path.isfile(tiny), _listing(base)
    # the report: where the file went, then the figures (student against the teacher, decode times)
    report = {k: entry["outputs"][k]["text"][0] for k in ("10", "11")}
    assert f"saved {narrow}" in report["10"], report
    assert "student narrow-64 against the teacher's decode" in report["10"], report
    assert f"saved {tiny}" in report["11"] and "student tiny against the teacher's decode" in report["11"], report
    assert "decode of one 32² image on cpu: teacher" in report["11"], report

    # narrow: the teacher's encoder byte for byte, a decoder of base width 64
    exported = load_file(narrow)
    assert set(exported) == set(teacher)
    for k, v in teacher.items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    assert exported["decoder.conv_in.weight"].shape == (64 * 4, 4, 3, 3)
    assert exported["decoder.conv_out.weight"].shape == (3, 64, 3, 3)

    # stock Load VAE lists it without a restart; VAE Encode with it is the teacher's, bit for bit; it decodes
    listed = requests.get(server.url + "/object_info/VAELoader", timeout=30).json()
    assert narrow_name in listed["VAELoader"]["input"]["required"]["vae_name"][0]
    entry, latents = encode_with_each(server, base, {"teacher": "random_sd_vae.safetensors", "narrow": narrow_name},
                                      "distil")
    assert latents["teacher"].shape == (1, 4, 8, 8) and latents["teacher"].std() > 0
    assert torch.equal(latents["narrow"], latents["teacher"])
    assert entry["outputs"]["25"]["images"]
    log = server.read_log()[log_start:]
    assert "Missing VAE keys" not in log and "Leftover VAE keys" not in log, log[-3000:]

    # ComfyUI's own readers, in a subprocess with its log at DEBUG: every key of the narrow file used, none missing;
    # the tiny decoder loaded strictly, and its decode of scaled latents the library's
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    job = {"narrow": narrow, "tiny": tiny, "latents": str(tmp_path / "z.safetensors"),
           "out": str(tmp_path / "decoded.safetensors")}
    save_file({"z": z}, job["latents"])
    (tmp_path / "job.json").write_text(json.dumps(job))
    p = subprocess.run([sys.executable, "-c", COMFY_LOADER_PREAMBLE + COMFY_READS_STUDENTS, COMFYUI,
                        str(tmp_path / "job.json")], capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads(lines[0][7:]) == {"keys": [], "conv_in": [256, 4, 3, 3]}
    decoder = TinyDecoder(4)
    decoder.load_state_dict(load_file(tiny))  # strict: the file is exactly the library's module
    with torch.no_grad():
        ours = decoder(z) * 2 - 1
    theirs = load_file(job["out"])["decoded"]
    assert theirs.shape == ours.shape == (1, 3, 64, 64)
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())
    print(f"distil node, both students and the checks: {time.time() - t0:.1f} s")


def test_distil_node_refuses_a_width_not_narrower_than_the_teacher_and_an_existing_file(comfy):
    """width 128 (the teacher's own): the prompt fails naming the width and the teacher's widths; a narrow file of
    that name already in output/vae: refused, the file kept. Nothing is written to output/vae or models/vae_approx."""
    server, base, _ = comfy
    before = _listing(base)
    entry = server.wait(server.queue(_distil_prompt({"width": 128, "save_name": "wide"})))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, _messages(entry)
    assert errors[0]["node_type"] == "VAEFTDistilDecoder" and errors[0]["exception_type"].endswith("VAEFTError")
    message = errors[0]["exception_message"]
    assert "width 128 is not narrower than the teacher's decoder (base width 128" in message, message
    assert "Traceback" not in message, message
    assert _listing(base) == before

    taken = os.path.join(base, "output", "vae", "vae-distil-narrow64-taken-2.safetensors")
    with open(taken, "wb") as f:
        f.write(b"precious")
    try:
        entry = server.wait(server.queue(_distil_prompt({"save_name": "taken"})))
        assert entry["status"]["status_str"] == "error", _messages(entry)
        assert "vae-distil-narrow64-taken-2.safetensors already exists in output/vae" in _messages(entry)
        with open(taken, "rb") as f:
            assert f.read() == b"precious"
    finally:
        os.unlink(taken)
    assert _listing(base) == before
    assert server.healthy()
