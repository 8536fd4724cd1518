"""Base beside tuned on saved latents (``python -m training compare``), the LATENT each family's users hold, and
``latent_noise`` (training on latents near the encoder's manifold)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from comfy_server import COMFY_LOADER_PREAMBLE, comfyui_path, flux2_unreadable, write_flux2_vae
from conftest import cli_main, tiny_ldm_sd, write_images
from family_examples import EXAMPLES
from training.families import family_of
from training.latents import held_channels
from training.vae import build_vae, perturbed

VERSION = {"latent_format_version_0": torch.tensor([])}  # what ComfyUI's Save Latent writes beside the tensor


def model_of(sd):
    return build_vae({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}).model


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_family_maps_the_latent_its_users_hold_to_its_decoder_and_back(name):
    model = model_of(EXAMPLES[name].file(0))
    family = family_of(model)
    channels, ratio = held_channels(model)
    z = torch.randn(2, family.latent_channels(model), 4, 6)
    held = family.held_latent(model, z)
    assert held.shape[1] == channels
    assert ratio == family.downsampling(model) * (z.shape[-1] // held.shape[-1])
    assert torch.allclose(family.module_latent(model, held), z, atol=1e-5)
    if name == "flux2":  # 2x2-patchified and normalised by the VAE's own BatchNorm statistics: 128 channels at 1/16
        assert (channels, held.shape[-2:]) == (4 * 32, (2, 3))
        assert abs(float(held.mean())) < 5 and not torch.allclose(held[:, :4], z[:, :1, :2, :2].flatten(1)[:, :4, None, None])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny kl-f8 base and a tuned copy (its decoder moved), Flux.2 and Wan 2.1 VAEs, and their latents."""
    d = tmp_path_factory.mktemp("compare")
    base = tiny_ldm_sd(seed=0)
    tuned = {k: (v + 0.02 * torch.randn_like(v) if k.startswith("decoder.") else v) for k, v in base.items()}
    save_file(base, str(d / "base.safetensors"))
    save_file(tuned, str(d / "tuned.safetensors"))
    save_file(EXAMPLES["flux2"].file(0), str(d / "flux2.safetensors"))
    save_file(EXAMPLES["wan2.1"].file(0), str(d / "wan.safetensors"))
    torch.manual_seed(0)
    z = torch.randn(2, 4, 12, 16)
    (d / "latents").mkdir()
    save_file({"latent_tensor": z, **VERSION}, str(d / "latents" / "ComfyUI_00001_.latent"))
    # an old .latent (no version key) holds SD-scaled latents: Load Latent divides them by 0.18215
    save_file({"latent_tensor": z[:1] * 0.18215}, str(d / "latents" / "ComfyUI_00002_.latent"))
    torch.save({"samples": z[1:]}, str(d / "latents" / "as_a_latent_dict.pt"))
    save_file({"latent_tensor": torch.randn(1, 128, 6, 8), **VERSION}, str(d / "flux2.latent"))
    save_file({"latent_tensor": torch.randn(1, 16, 3, 8, 8), **VERSION}, str(d / "wan.latent"))
    return d


def compare(d, *args, check=True):
    return cli_main("compare", *args, check=check)


def test_compare_reads_every_latent_format_and_shows_base_beside_tuned(files, tmp_path):
    out, js = tmp_path / "grid.png", tmp_path / "report.json"
    p = compare(files, "--base", files / "base.safetensors", "--tuned", files / "tuned.safetensors",
                "--latents", files / "latents", "--out", out, "--json", js, "--half")
    report = json.loads(js.read_text())
    names = [d["name"] for d in report["latents"]]
    assert names == ["ComfyUI_00001_.latent[0]", "ComfyUI_00001_.latent[1]", "ComfyUI_00002_.latent",
                     "as_a_latent_dict.pt"]
    assert all(d["image_px"] == [24, 32] for d in report["latents"])  # the tiny kl-f8 VAE: 2 pixels per latent
    trips = report["base"]["round_trip"]
    # the old file's latent, divided by 0.18215, is the first one again; the .pt's is the second
    assert trips[2] == pytest.approx(trips[0], rel=1e-4) and trips[3] == pytest.approx(trips[1], rel=1e-4)
    assert all(0 < t < 10 for t in trips + report["tuned"]["round_trip"])
    assert report["base"]["half"]["fp16"]["safe"] and report["tuned"]["half"]["bf16"]["safe"]
    psnr = report["base_vs_tuned"]["psnr"]
    assert 10 < psnr["mean"] < 60 and len(psnr["per_latent"]) == 4  # the tuned decoder moved, by a little
    assert psnr["per_latent"][2] == pytest.approx(psnr["per_latent"][0], abs=1e-3)
    assert any("old .latent file" in n for n in report["notes"])
    grid = Image.open(out)
    assert grid.size == (3 * 32 + 2 * 2, 4 * 24 + 3 * 2)  # rows of base | tuned | difference, 2 px apart
    for line in ("round trip (rel. RMS)", "largest activation", "fp16 (vs own fp32)", "base vs tuned: PSNR"):
        assert line in p.stdout
    assert str(out) in p.stdout


def test_one_vae_against_itself_is_identical_on_every_family_layout(files, tmp_path):
    for vae, latent, frames_note in (("flux2", "flux2.latent", False), ("wan", "wan.latent", True)):
        js = tmp_path / f"{vae}.json"
        p = compare(files, "--base", files / f"{vae}.safetensors", "--tuned", files / f"{vae}.safetensors",
                    "--latents", files / latent, "--out", tmp_path / f"{vae}.png", "--json", js, "--no-half")
        report = json.loads(js.read_text())
        assert report["base_vs_tuned"]["psnr"]["mean"] == 100.0, p.stdout
        assert report["base"]["round_trip"] == report["tuned"]["round_trip"]
        assert ("frame 0 compared" in p.stdout) == frames_note
    # the tiny Flux.2 VAE (2 levels): 4 pixels per held latent, a 2x2 patch of 2x-downsampled latents
    assert json.loads((tmp_path / "flux2.json").read_text())["latents"][0]["image_px"] == [24, 32]


@pytest.mark.parametrize("case, expected", [
    ("flux2 latent, kl-f8 VAEs", "has 128 latent channels (shape (1, 128, 6, 8)); the base VAE is a kl-f8 VAE"),
    ("video latent, kl-f8 VAEs", "is a video latent (1, 16, 3, 8, 8)"),
    ("two families", "they do not share a latent space"),
    ("not latents", "cannot read latents"),
    ("empty folder", "holds no .latent, .safetensors, .pt, .pth files"),
    ("existing out", "exists; choose another name or pass --overwrite"),
    ("json over the tuned VAE", "is the run's own input --tuned"),
    ("json over a latent", "is the run's own input --latents"),
    ("json is the out", "--json and --out are the same file"),
])
def test_latents_that_do_not_fit_are_refused_by_name_with_nothing_written(files, tmp_path, case, expected):
    base, tuned, latents = files / "base.safetensors", files / "tuned.safetensors", files / "latents"
    out = tmp_path / "grid.png"
    if case.startswith("flux2"):
        latents = files / "flux2.latent"
    elif case.startswith("video"):
        latents = files / "wan.latent"
    elif case == "two families":
        tuned = files / "flux2.safetensors"
    elif case == "not latents":
        latents = tmp_path / "notes.latent"
        latents.write_text("not a safetensors file")
    elif case == "empty folder":
        latents = tmp_path / "empty"
        latents.mkdir()
    elif case == "existing out":
        out.write_bytes(b"the user's picture")
    js = {"json over the tuned VAE": tuned, "json over a latent": latents / "ComfyUI_00002_.latent",
          "json is the out": out}.get(case, tmp_path / "r.json")
    kept = {f: f.read_bytes() for f in (tuned, latents / "ComfyUI_00002_.latent") if f.is_file()}
    p = compare(files, "--base", base, "--tuned", tuned, "--latents", latents, "--out", out,
                "--json", js, "--overwrite" if case.startswith("json") else "--limit=16", check=False)
    assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "r.json").exists() and all(f.read_bytes() == b for f, b in kept.items())
    assert out.exists() == (case == "existing out")
    if out.exists():
        assert out.read_bytes() == b"the user's picture"


COMFY_FLUX2 = COMFY_LOADER_PREAMBLE + r'''
from safetensors.torch import load_file, save_file
job = json.load(open(jobs_path))
vae = comfy.sd.VAE(sd=load_file(job["vae"]))
image = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(0))
z = vae.encode(image)
save_file({"latent_tensor": z.contiguous(), "latent_format_version_0": torch.tensor([])}, job["latent"])
save_file({"image": image.contiguous(), "decoded": vae.decode(z).contiguous()}, job["images"])
'''


def test_comfyuis_flux2_latent_is_what_the_family_holds(files, tmp_path):
    """ComfyUI's own VAE Encode of a Flux.2 VAE gives the held latent (patchified, normalised): ours is the same,
    and ``compare`` decodes ComfyUI's LATENT as ComfyUI's VAE Decode does."""
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to compare with ComfyUI's Flux.2 latents")
    why = flux2_unreadable()
    if why:
        pytest.skip(f"{why} (.ci/run runs this test on 0.28.2)")
    # full size: ComfyUI builds only the released architecture
    write_flux2_vae(str(tmp_path / "flux2-full.safetensors"))
    job = {"vae": str(tmp_path / "flux2-full.safetensors"), "latent": str(tmp_path / "x.latent"),
           "images": str(tmp_path / "images.safetensors")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    p = subprocess.run([sys.executable, "-c", COMFY_FLUX2, comfy, str(tmp_path / "job.json")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    held = load_file(job["latent"])["latent_tensor"]
    images = load_file(job["images"])
    model = model_of(load_file(job["vae"]))
    x = images["image"].movedim(-1, 1) * 2 - 1
    ours = family_of(model).held_latent(model, model.encode(x).latent_dist.mode())
    assert held.shape == ours.shape == (1, 128, 2, 3)
    assert torch.allclose(held, ours, atol=1e-4), float((held - ours).abs().max())
    decoded = model.decode(family_of(model).module_latent(model, held)).sample.clamp(-1, 1)
    assert torch.allclose((decoded + 1) / 2, images["decoded"].movedim(-1, 1), atol=2e-3)


def test_perturbed_latents_move_by_sigma_times_each_channels_spread():
    torch.manual_seed(0)
    mean = torch.randn(2, 4, 16, 16) * torch.tensor([0.1, 1.0, 3.0, 10.0]).view(1, 4, 1, 1)
    shift = 0.5 * torch.randn(mean.shape)
    moved = perturbed(mean, mean, shift) - mean
    ratio = moved.std(dim=(-2, -1)) / mean.std(dim=(-2, -1))
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), rtol=0.2)
    assert perturbed(mean, mean, None) is mean


def test_latent_noise_is_offered_recorded_and_validated_beside_clean_scores(tmp_path):
    assert "--latent-noise" in cli_main("fit", "--help").stdout
    write_images(tmp_path / "img", names=("astronaut", "coffee", "chelsea", "retina"), size=64)
    save_file(tiny_ldm_sd(), str(tmp_path / "vae.safetensors"))
    run = tmp_path / "run"
    cli_main("fit", "--vae", tmp_path / "vae.safetensors", "--data", tmp_path / "img", "--steps", "2", "--patch-size",
             "32", "--batch-size", "2", "--lpips-weight", "0", "--val-every", "2", "--val-patches", "2",
             "--val-fraction", "0.25", "--no-ema", "--latent-noise", "0.5", "--out", tmp_path / "out.safetensors",
             "--run-dir", run)
    assert json.loads((run / "config.json").read_text())["settings"]["latent_noise"] == 0.5
    scored = [json.loads(line) for line in open(run / "metrics.jsonl") if "val_psnr" in line]
    assert [line["step"] for line in scored] == [0, 2]
    # the base (step 0) scored both ways: decoding latents off the encoder's own is worse
    assert all(line["val_noisy_psnr"] < line["val_psnr"] for line in scored)
    assert (tmp_path / "out.safetensors").is_file()


def test_the_decoder_gets_the_perturbed_latent_and_without_the_setting_nothing_changes():
    from training.metrics import validation_scores
    from training.vae import Reconstruct

    model = model_of(tiny_ldm_sd())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    module = Reconstruct(model, False, False).eval()
    with torch.no_grad():
        clean, mean, _ = module(x, None)
        shift = 0.5 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        moved, _, _ = module(x, None, None, shift)
        assert torch.equal(module(x, None, None, None)[0], clean) and not torch.allclose(moved, clean, atol=1e-3)
        assert torch.allclose(moved, model.decode(perturbed(mean, mean, shift)).sample)
    off = validation_scores(model, x, "cpu", torch.autocast("cpu", enabled=False), None)
    on = validation_scores(model, x, "cpu", torch.autocast("cpu", enabled=False), None, latent_noise=0.5, seed=3)
    assert set(off) == {"mse", "psnr"} and set(on) == {"mse", "psnr", "noisy_mse", "noisy_psnr"}
    assert on["psnr"] == off["psnr"] and on["noisy_psnr"] != off["psnr"]


def test_flux2s_held_latent_is_the_2x2_patchified_latent_normalised_by_its_batchnorm():
    """Channel 4c + 2·pi + pj of held position (i, j) is module channel c at (2i + pi, 2j + pj), then (x - mean) / std:
    ComfyUI's rearrange "c (i pi) (j pj) -> (c pi pj) i j" and its BatchNorm (eps 1e-4)."""
    model = model_of(EXAMPLES["flux2"].file(0))
    z = torch.randn(1, 32, 4, 6)
    held = family_of(model).held_latent(model, z)
    mean, var = model.bn.running_mean, model.bn.running_var
    for c, pi, pj, i, j in ((0, 0, 1, 0, 2), (5, 1, 0, 1, 1), (31, 1, 1, 1, 2)):
        k = 4 * c + 2 * pi + pj
        expected = (z[0, c, 2 * i + pi, 2 * j + pj] - mean[k]) / torch.sqrt(var[k] + 1e-4)
        assert float(held[0, k, i, j]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_the_library_refuses_what_the_files_cannot_carry_and_rows_of_any_size(files):
    from training.latent_compare import compare_on_latents

    base, tuned = model_of(load_file(str(files / "base.safetensors"))), model_of(load_file(str(files / "tuned.safetensors")))
    z = torch.randn(1, 4, 6, 6)
    with pytest.raises(Exception, match="latent 'x' holds NaN or infinite values"):
        compare_on_latents(base, tuned, [("x", torch.where(z > 2, float("nan"), z))])
    # an SD3 / Flux.1 kl-f8 VAE and a Wan 2.1 VAE both take 16-channel latents: still not one latent space
    sd3 = model_of(tiny_ldm_sd(latent_channels=16))
    wan = model_of(EXAMPLES["wan2.1"].file(0))
    with pytest.raises(Exception, match="do not share a latent space"):
        compare_on_latents(sd3, wan, [("x", torch.randn(1, 16, 4, 4))])
    # latents of different sizes (files of different resolutions): one row each, the grid as wide as the widest;
    # a 2x2 latent (4x4 px) is compared too (no SSIM window); --limit's note
    result = compare_on_latents(base, tuned, [("a", torch.randn(2, 4, 6, 10)), ("b", torch.randn(1, 4, 2, 2))],
                                limit=2, half=False)
    assert [d["image_px"] for d in result.report["latents"]] == [[12, 20], [12, 20]]
    assert "3 latents given; the first 2 compared" in result.text
    result = compare_on_latents(base, tuned, [("a", torch.randn(1, 4, 6, 10)), ("b", torch.randn(1, 4, 2, 2))], half=False)
    assert result.grid.shape == (3, 12 + 2 + 4, 3 * 20 + 2 * 2)
    assert "fp16" not in result.report["base"] and "note: fp16/bf16 not checked" not in result.text  # asked off


def test_out_must_be_a_png_and_resuming_with_another_latent_noise_is_refused(files, tmp_path):
    p = compare(files, "--base", files / "base.safetensors", "--tuned", files / "tuned.safetensors", "--latents",
                files / "latents", "--out", tmp_path / "grid.jpg", check=False)
    assert p.returncode == 2 and "the comparison image is a PNG" in p.stderr
    from training.config import TrainConfig
    from training.errors import VAEFTError
    from training.trainer import fine_tune

    vae = build_vae(tiny_ldm_sd())
    data = [torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(4)]
    cfg = dict(steps=1, batch_size=2, lpips_weight=0.0, ema=False, preview_every=0, val_every=0)
    fine_tune(vae, lambda start: iter(data[start:]), TrainConfig(**cfg, latent_noise=0.5), device="cpu",
              checkpoints=tmp_path / "run.ckpt")
    before = (tmp_path / "run.ckpt").read_bytes()
    with pytest.raises(VAEFTError, match="latent_noise"):
        fine_tune(vae, lambda start: iter(data[start:]), TrainConfig(**{**cfg, "steps": 2}), device="cpu",
                  resume=tmp_path / "run.ckpt")
    assert (tmp_path / "run.ckpt").read_bytes() == before
