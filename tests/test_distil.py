"""distil (issue 30): a narrow student (the teacher's layout, a narrower decoder cut from the teacher's) and a tiny one
(TAESD's layout, as ComfyUI's previews load it) learn the teacher's decode of its own latents through the one session;
their files load where users load them; hostile inputs are refused by name with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_server import COMFY_LOADER_PREAMBLE, comfyui_path
from conftest import SD_VAE_CONFIG, cli_main, write_images
from training.config import DataConfig, DistilConfig, TrainConfig
from training.data import build_dataset
from training.distil import run_distil
from training.families.ldm import diffusers_to_ldm
from training.students import TinyDecoder, decoder_widths, group_channels, narrow_student, tiny_spec, tiny_student
from training.vae import build_vae, load_vae


def klf8_file(widths, seed=0) -> dict[str, torch.Tensor]:
    """A random kl-f8 VAE (4 latent channels, quant convs) of ``widths`` per level, fp16 as released files are."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    m = AutoencoderKL(block_out_channels=widths, layers_per_block=1, norm_num_groups=32, latent_channels=4,
                      down_block_types=["DownEncoderBlock2D"] * len(widths),
                      up_block_types=["UpDecoderBlock2D"] * len(widths))
    return {k: v.detach().half().contiguous() for k, v in diffusers_to_ldm(m.state_dict()).items()}


def flux2_file(widths, seed=0) -> dict[str, torch.Tensor]:
    """A random Flux.2 VAE of ``widths`` in BFL's layout (bf16), with non-trivial BatchNorm statistics."""
    from diffusers import AutoencoderKLFlux2

    from training.families import flux2

    torch.manual_seed(seed)
    m = AutoencoderKLFlux2(block_out_channels=widths, layers_per_block=1, latent_channels=32,
                           down_block_types=["DownEncoderBlock2D"] * len(widths),
                           up_block_types=["UpDecoderBlock2D"] * len(widths))
    m.bn.running_mean.normal_(0, 0.5)
    m.bn.running_var.uniform_(0.25, 2.25)
    sd, _ = flux2.file_layout({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                               for k, v in m.state_dict().items()})
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distil")
    out = {"images": write_images(str(root / "images"), size=96), "root": root}
    for name, sd in (("sd", klf8_file([64, 128])), ("sd4", klf8_file([32] * 4)), ("flux2", flux2_file([64, 128])),
                     ("flux2_4", flux2_file([32] * 4))):
        out[name] = root / f"{name}-teacher.safetensors"
        save_file(sd, str(out[name]))
    return out


def data(files, patch=32):
    return build_dataset(files["images"], DataConfig(patch_size=patch, val_fraction=0.25))


def test_a_narrow_student_is_the_teachers_file_with_each_decoder_group_cut_from_the_teachers():
    sd = klf8_file([64, 128])
    teacher = build_vae(sd, "teacher.safetensors")
    student = narrow_student(teacher, 32)
    assert decoder_widths(student.model) == [32, 64] and decoder_widths(teacher.model) == [64, 128]
    assert set(student.layout.shapes) == set(sd)
    for k, v in sd.items():
        if not k.startswith("decoder."):  # encoder, quant convs: the teacher file's own bytes
            assert student.layout.tensor_sha256[k] == teacher.layout.tensor_sha256[k], k
        assert student.layout.dtypes[k] == torch.float16
    # each of the 32 groups keeps its first channels: group g of 4 channels -> channels 4g, 4g + 1
    keep = group_channels(128, 64)
    assert keep[:4].tolist() == [0, 1, 4, 5]
    t, s = teacher.model.state_dict(), student.model.state_dict()
    assert torch.equal(s["decoder.conv_in.weight"], t["decoder.conv_in.weight"][keep])
    assert torch.equal(s["decoder.conv_out.weight"], t["decoder.conv_out.weight"][:, group_channels(64, 32)])
    assert torch.equal(s["post_quant_conv.weight"], t["post_quant_conv.weight"])


def test_a_narrow_64_decoder_of_a_full_size_vae_computes_under_a_third_of_the_teachers():
    """What makes it faster, counted rather than timed (bench/distil_bench.py times it)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    teacher = build_vae({k: v.contiguous() for k, v in diffusers_to_ldm(AutoencoderKL(**SD_VAE_CONFIG).state_dict()).items()},
                        "sd_vae.safetensors")
    student = narrow_student(teacher, 64)
    z = torch.randn(1, 4, 8, 8)
    flops = {}
    for name, m in (("teacher", teacher.model), ("student", student.model)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m.decode(z)
        flops[name] = counter.get_total_flops()
    assert flops["student"] < flops["teacher"] / 3, flops


@pytest.mark.parametrize("teacher,student,width", [("sd", "narrow", 32), ("flux2", "narrow", 32), ("sd4", "tiny", 0),
                                                   ("flux2_4", "tiny", 0)])
def test_students_learn_the_teachers_decode_as_steps_grow(files, teacher, student, width):
    t = load_vae(files[teacher])
    dcfg = DistilConfig(student=student, width=width or 64, with_encoder=student == "tiny" and teacher == "sd4")
    cfg = TrainConfig.from_recipe(f"distil-{student}", 32, steps=24, batch_size=2, lpips_weight=0.0, val_every=8,
                                  log_every=8, preview_every=0, ema=False)
    result = run_distil(t, data(files), cfg, dcfg)
    scores = [h["val_teacher_psnr"] for h in result.session.loop.history if "val_teacher_psnr" in h]
    assert len(scores) == 4 and scores[-1] > scores[0] + 1.0, scores
    assert result.figures["teacher_psnr"] > 0 and result.figures["decode"]["speedup"] > 0
    if dcfg.with_encoder:
        losses = [h["enc_mse"] for h in result.session.loop.history if "enc_mse" in h]
        assert losses[-1] < losses[0], losses
    # the teacher's tensors are not the student's to train
    assert torch.equal(result.student.model.state_dict()["encoder.conv_in.weight"] if student == "narrow" else
                       result.student.model.teacher.encoder.conv_in.weight, t.model.encoder.conv_in.weight)


def run(files, *args, check=True):
    return cli_main("distil", "--data", files["images"], "--patch-size", 32, "--batch-size", 2, "--steps", 4,
                    "--lpips-weight", 0, "--val-every", 2, "--no-progress", *args, check=check)


def test_the_cli_writes_a_narrow_vae_that_loads_and_encodes_bit_for_bit_as_the_teacher(files, tmp_path):
    out = tmp_path / "vae-distil-narrow.safetensors"
    p = run(files, "--vae", files["flux2"], "--student", "narrow", "--width", 32, "--out", out)
    summary = json.loads(p.stdout)
    assert summary["files"] == [str(out)] and summary["figures"]["decode"]["side"] == 32
    assert "BFL's Decoder(ch=width)" in p.stderr and ("faster" in p.stderr or "SLOWER" in p.stderr)
    teacher, student = load_vae(files["flux2"]), load_vae(out)
    assert decoder_widths(student.model) == [32, 64]
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(student.model.encode(x).latent_dist.mean, teacher.model.encode(x).latent_dist.mean)
    written, base = load_file(out), load_file(files["flux2"])
    assert all(torch.equal(written[k], base[k]) for k in base if k.startswith(("encoder.", "bn.")))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.distil.student"] == "narrow-32" and meta["vaeft.distil.teacher"] == "flux2-teacher.safetensors"
    assert json.loads(meta["vaeft.distil.figures"])["student"] == "narrow-32"


def test_the_cli_writes_tiny_files_under_comfyuis_names_and_never_replaces_them(files, tmp_path):
    approx = tmp_path / "vae_approx"
    approx.mkdir()
    (approx / "taesd_decoder.safetensors").write_bytes(b"the user's stock decoder")
    p = run(files, "--vae", files["sd4"], "--student", "tiny", "--with-encoder", "--family", "sdxl",
            "--name", "fundus", "--out", approx)
    names = sorted(os.listdir(approx))
    assert names == ["taesd_decoder.safetensors", "taesdxl_decoder.ft-fundus.safetensors",
                     "taesdxl_encoder.ft-fundus.safetensors"], names
    dec = load_file(approx / "taesdxl_decoder.ft-fundus.safetensors")
    assert set(dec) == set(TinyDecoder(4).state_dict()) and dec["1.weight"].shape == (64, 4, 3, 3)
    assert "× 0.13025" in p.stderr and "to switch back, move taesdxl_decoder.ft-fundus.safetensors" in p.stderr
    before = {n: (approx / n).read_bytes() for n in names}
    again = run(files, "--vae", files["sd4"], "--student", "tiny", "--with-encoder", "--family", "sdxl",
                "--name", "fundus", "--out", approx, check=False)
    assert again.returncode == 2 and "taesdxl_decoder.ft-fundus.safetensors' already exists" in again.stderr
    assert {n: (approx / n).read_bytes() for n in os.listdir(approx)} == before


@pytest.mark.parametrize("case,expected", [
    ("not a VAE", "is not a"),
    ("width not narrower", "width 64 is not narrower than the teacher's decoder (base width 64"),
    ("width off the groups", "width 48 does not keep the teacher's 32 GroupNorm groups whole"),
    ("narrow Wan", "a narrow student is built for kl-f8 and Flux.2 VAEs"),
    ("tiny Wan", "no tiny decoder layout is known for a"),
    ("tiny of a 2-level VAE", "a tiny decoder (TAESD's layout) upsamples 8x"),
    ("tiny into a file", "--student tiny writes its files into a folder"),
    ("fp16-fix settings", "the fp16-fix settings do not apply to distil"),
])
def test_hostile_inputs_are_refused_by_name_with_nothing_written(files, tmp_path, case, expected):
    teacher, student, out, extra = files["sd"], "narrow", tmp_path / "out" / "s.safetensors", []
    width = {"width not narrower": 64, "width off the groups": 48}.get(case, 32)
    if case == "not a VAE":
        teacher = tmp_path / "model.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.weight": torch.zeros(4, 4)}, str(teacher))
    elif case in ("narrow Wan", "tiny Wan"):
        from family_examples import wan_file

        teacher = tmp_path / "qwen_image_vae.safetensors"
        save_file(wan_file(0), str(teacher))
    if case.startswith("tiny"):
        student, out = "tiny", tmp_path / "out"
    if case == "tiny into a file":
        out = tmp_path / "out" / "taesd_decoder.safetensors"
    if case == "fp16-fix settings":
        extra = ["--recipe", "fp16-fix"]
    (tmp_path / "out").mkdir()
    p = run(files, "--vae", teacher, "--student", student, "--width", width, "--out", out,
            "--run-dir", tmp_path / "run", *extra, check=False)
    assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert os.listdir(tmp_path / "out") == [] and not (tmp_path / "run").exists()


COMFY_TAESD = COMFY_LOADER_PREAMBLE + r'''
import comfy.taesd.taesd as taesd
from safetensors.torch import load_file, save_file
job = json.load(open(jobs_path))
out = {}
for channels, path in job["decoders"].items():
    model = taesd.TAESD(None, path, latent_channels=int(channels))  # load_state_dict: strict
    x = load_file(job["latents"])[channels]
    out[channels] = model.decode(x).contiguous()
save_file(out, job["out"])
'''


def test_comfyuis_taesd_loads_the_tiny_decoders_strictly_and_decodes_as_the_student(files, tmp_path):
    """ComfyUI's own TAESD class (comfy/taesd/taesd.py) loads the tiny decoders, taesd's 4 channels and taef2's 128
    (2x2-patchified: ComfyUI 0.28 has it), and decodes the scaled latents as the student does."""
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to load the tiny decoders with ComfyUI's TAESD")
    has_flux2 = "DecoderFlux2" in open(os.path.join(comfy, "comfy", "taesd", "taesd.py")).read()
    job = {"decoders": {}, "latents": str(tmp_path / "latents.safetensors"), "out": str(tmp_path / "out.safetensors")}
    latents, ours = {}, {}
    for name in ("sd4",) + (("flux2_4",) if has_flux2 else ()):
        teacher = load_vae(files[name])
        student = tiny_student(teacher, tiny_spec(teacher, "auto"), seed=1)
        channels = str(student.model.spec["channels"])
        path = tmp_path / f"{name}_decoder.safetensors"
        save_file({k: v.contiguous() for k, v in student.model.decoder.state_dict().items()}, str(path))
        z = teacher.model.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist.mode()
        with torch.no_grad():
            latents[channels], ours[channels] = student.model.scaled(z), student.model.decode(z).sample
        job["decoders"][channels] = str(path)
    save_file(latents, job["latents"])
    (tmp_path / "job.json").write_text(json.dumps(job))
    p = subprocess.run([sys.executable, "-c", COMFY_TAESD, comfy, str(tmp_path / "job.json")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = load_file(job["out"])
    assert set(theirs) == set(ours) == ({"4", "128"} if has_flux2 else {"4"})
    for c in ours:
        assert torch.allclose(theirs[c], ours[c], atol=1e-5), (c, float((theirs[c] - ours[c]).abs().max()))


@pytest.mark.parametrize("flag,expected", [(("--recipe", "distil-tiny"), "recipe 'distil-tiny' is distil's"),
                                           (("--image-weight", "0.5"), "image_weight weighs the images beside a teacher")])
def test_fit_refuses_distils_own_settings_with_nothing_written(files, tmp_path, flag, expected):
    out = tmp_path / "vae-ft.safetensors"
    p = cli_main("fit", "--vae", files["sd"], "--data", files["images"], "--out", out, "--patch-size", 32, "--steps", 2,
                 "--no-progress", "--run-dir", tmp_path / "run", *flag, check=False)
    assert p.returncode == 2 and expected in p.stderr, p.stderr
    assert not out.exists() and not (tmp_path / "run").exists()


def test_a_run_folder_continues_only_the_student_it_trains(files, tmp_path):
    approx = tmp_path / "approx"
    approx.mkdir()
    run(files, "--vae", files["sd4"], "--student", "tiny", "--out", approx, "--run-dir", tmp_path / "run")
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    kept = {c: c.read_bytes() for c in ckpts}
    p = run(files, "--vae", files["sd4"], "--student", "tiny", "--with-encoder", "--out", approx, "--steps", 8,
            "--resume", tmp_path / "run", "--overwrite", check=False)
    assert p.returncode == 2 and "distils tiny, not tiny+encoder: continue it as student tiny (--student tiny on the command line)" in p.stderr, p.stderr
    assert {c: c.read_bytes() for c in sorted((tmp_path / "run" / "checkpoints").iterdir())} == kept


@pytest.mark.parametrize("case,expected", [
    ("tiny checkpoint over the teacher", "is the run's own input --vae"),
    ("tiny checkpoints into models/vae_approx", "--checkpoint-every with --student tiny needs --checkpoint FILE"),
    ("Flux.2 tiny patch of 8 pixels per latent", "patch_size 40 is not a multiple of 16"),
    ("timing side below a latent", "the timing side (--time-size) 4 is not a multiple of 8"),
])
def test_what_a_run_would_trip_on_later_is_refused_before_it_starts(files, tmp_path, case, expected):
    approx = tmp_path / "approx"
    approx.mkdir()
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((files["flux2_4"] if "Flux.2" in case else files["sd4"]).read_bytes())
    kept = teacher.read_bytes()
    args = {"tiny checkpoint over the teacher": ["--checkpoint", teacher, "--checkpoint-every", 1, "--overwrite"],
            "tiny checkpoints into models/vae_approx": ["--checkpoint-every", 1],
            "Flux.2 tiny patch of 8 pixels per latent": ["--patch-size", 40],
            "timing side below a latent": ["--time-size", 4]}[case]
    p = run(files, "--vae", teacher, "--student", "tiny", "--out", approx, *args, check=False)
    assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert teacher.read_bytes() == kept and os.listdir(approx) == []
