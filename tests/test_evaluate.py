"""evaluate_vaes on tiny random-init VAEs loaded from ldm files, the eval command end to end,
comparison grids and the metrics table."""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from training import cli
from training import evaluate as E
from training import metrics as M
from training.errors import VAEFTError
from training.families.ldm import diffusers_to_ldm
from training.vae import load_vae

from conftest import tiny_diffusers_vae, write_images

P = 32  # patch size: small, a multiple of 8 and >= the SSIM window


def _save_vae(path, latent_channels=4, quant=True, seed=0):
    from safetensors.torch import save_file

    sd = diffusers_to_ldm(tiny_diffusers_vae(latent_channels, quant, seed).state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vaes")
    return {"base": _save_vae(d / "base.safetensors", seed=0),
            "tuned": _save_vae(d / "tuned.safetensors", seed=1),
            "flux": _save_vae(d / "flux_like.safetensors", latent_channels=16, quant=False, seed=2)}


@pytest.fixture(scope="module")
def patches():
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        arr = getattr(data, name)()[::4, ::4, :3][:P, :P]
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


@pytest.fixture(scope="module")
def lpips_alex():
    torch.manual_seed(0)
    return M.try_load_lpips("alex", random_backbone=True)[0]


def test_evaluate_vaes_two_loaded_vaes(vae_files, patches, lpips_alex):
    vaes = {n: load_vae(vae_files[n]).model for n in ("base", "tuned")}
    res = M.evaluate_vaes(vaes, patches, lpips_net=lpips_alex, batch_size=2, device="cpu")
    assert list(res) == ["base", "tuned"]
    for r in res.values():
        assert r["patches"] == 3 and r["latent_channels"] == 4
        for k in ("psnr", "ssim", "lpips", "delta_e2000", "shift_r", "shift_g", "shift_b"):
            assert set(r[k]) == {"mean", "std"} and np.isfinite(r[k]["mean"]) and r[k]["std"] >= 0
        assert r["rfid"]["available"] is False
    assert res["base"]["psnr"]["mean"] != res["tuned"]["psnr"]["mean"]
    # the same numbers as the metric functions on a direct reconstruction (batching is invisible)
    with torch.no_grad():
        m = vaes["tuned"]
        recon = m.decode(m.encode(patches).latent_dist.mode()).sample.clamp(-1, 1)
    for k, fn in (("psnr", M.psnr), ("ssim", M.ssim), ("delta_e2000", M.delta_e2000)):
        assert res["tuned"][k] == pytest.approx(M.summarize(fn(recon, patches)), rel=1e-4, abs=1e-5)
    # evaluating the same VAE twice gives identical results (same patches, deterministic)
    again = M.evaluate_vaes({"x": vaes["base"]}, patches, lpips_net=lpips_alex, batch_size=3, device="cpu")
    assert again["x"]["psnr"] == pytest.approx(res["base"]["psnr"])


def test_evaluate_vaes_mixed_latent_layouts_and_no_lpips(vae_files, patches):
    vaes = {n: load_vae(vae_files[n]).model for n in ("base", "flux")}
    res = M.evaluate_vaes(vaes, patches[:2], lpips_unavailable="weights missing", device="cpu")
    assert res["flux"]["latent_channels"] == 16 and res["base"]["latent_channels"] == 4
    assert res["flux"]["lpips"] == {"available": False, "reason": "weights missing"}
    assert np.isfinite(res["flux"]["psnr"]["mean"]) and np.isfinite(res["flux"]["ssim"]["mean"])
    with pytest.raises(VAEFTError):
        M.evaluate_vaes(vaes, patches[:, :, :30, :30])
    with pytest.raises(VAEFTError):
        M.evaluate_vaes({}, patches)


class _Identity(torch.nn.Module):
    """decode(encode(x)) == x, through the same interface as AutoencoderKL."""

    def encode(self, x):
        return type("Enc", (), {"latent_dist": type("Dist", (), {"mode": lambda self: x})()})()

    def decode(self, z):
        return type("Dec", (), {"sample": z})()


def test_evaluate_vaes_rfid_with_a_feature_extractor(vae_files, patches):
    # Inception weights are not available offline; any (N, D) feature extractor exercises the path.
    feats = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    vaes = {"identity": _Identity(), "base": load_vae(vae_files["base"]).model}
    res = M.evaluate_vaes(vaes, patches, inception=feats, device="cpu")
    assert res["identity"]["rfid"]["value"] == pytest.approx(0, abs=1e-9)
    assert res["base"]["rfid"]["value"] > 0 and res["base"]["rfid"]["patches"] == 3
    assert res["identity"]["psnr"]["mean"] == pytest.approx(M.PSNR_MAX_DB)
    assert res["identity"]["latent_channels"] is None


def test_comparison_grid_and_heat_map(patches):
    recons = [patches * 0.9, patches.flip(-1)]
    g = E.comparison_grid(patches, recons)
    assert g.shape == (3, 3 * P, 4 * P) and g.min() >= 0 and g.max() <= 1
    torch.testing.assert_close(g[:, :P, :P], (patches[0] + 1) / 2)          # original
    torch.testing.assert_close(g[:, P:2 * P, 2 * P:3 * P], (patches[1].flip(-1) + 1) / 2)  # last recon
    zero = E.comparison_grid(patches[0], [patches[0]], gap=2)                  # (3, H, W) input
    assert zero.shape == (3, P, 3 * P + 4)
    torch.testing.assert_close(zero[:, :, -P:], E.heat_map(torch.zeros(P, P)))  # no error: darkest colour
    hm = E.heat_map(torch.tensor([[0.0, 0.5, 1.0, 7.0]]))
    assert hm.shape == (3, 1, 4) and torch.equal(hm[:, 0, 2], hm[:, 0, 3])     # saturates
    assert hm[:, 0, 0].sum() < hm[:, 0, 1].sum() < hm[:, 0, 2].sum()           # brighter with error
    with pytest.raises(VAEFTError):
        E.comparison_grid(patches, [patches[:, :, :16]])


def _parser():
    parser = argparse.ArgumentParser()
    cli.add_eval_command(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    data = write_images(str(root / "data"), names=("astronaut", "coffee", "chelsea", "retina"), size=64)
    general = write_images(str(root / "general"), names=("rocket", "immunohistochemistry"), size=64)
    single = write_images(str(root / "single"), names=("chelsea",), size=64)
    from skimage import data as skdata

    big = str(root / "big.png")
    Image.fromarray(skdata.astronaut()[::3, ::3][:150, :130]).save(big)
    return {"data": data, "general": general, "single": single, "big": big}


def _run(argv, capsys):
    args = _parser().parse_args(["eval"] + argv)
    assert args.func is cli.run_eval
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0  # exactly one JSON object
    return json.loads(out)


def test_eval_command_end_to_end(vae_files, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "try_load_lpips", functools.partial(M.try_load_lpips, random_backbone=True))
    out_json, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    res = _run(["--vae", vae_files["base"], "--vae", vae_files["tuned"], "--data", folders["data"],
                "--general", folders["general"], "--patch-size", str(P), "--count", "5", "--seed", "3",
                "--device", "cpu", "--json", str(out_json), "--grid", str(grid),
                "--full-image", folders["big"], "--tile", "64", "--overlap", "16"], capsys)
    assert json.loads(out_json.read_text()) == res
    assert res["patch_size"] == P and res["seed"] == 3 and set(res["vaes"]) == {"base", "tuned"}
    assert res["lpips"]["available"] is True and res["rfid"]["available"] is False
    src = res["sources"]
    assert src["data"]["split"] == "validation" and src["data"]["images"] == 1  # 4 images, val_fraction 0.1
    assert src["general"]["split"] == "all" and src["general"]["images"] == 2
    for section in ("data", "general"):
        for name in ("base", "tuned"):
            r = res[section][name]
            assert r["patches"] == 5
            for k in ("psnr", "ssim", "lpips", "delta_e2000", "shift_r"):
                assert np.isfinite(r[k]["mean"])
    assert res["general_delta"]["reference"] == "base"
    assert res["general_delta"]["tuned"]["psnr"] == pytest.approx(
        res["general"]["tuned"]["psnr"]["mean"] - res["general"]["base"]["psnr"]["mean"])
    fi = res["full_image"]
    assert fi["size"] == [150, 130] and fi["vaes"]["tuned"]["seam"]["seam_pixels"] > 0
    assert np.isfinite(fi["vaes"]["base"]["psnr"])
    assert Image.open(grid).size == (4 * P + 3 * 2, 4 * P + 3 * 2)  # 4 patches; orig, 2 VAEs, heat map
    # same seed -> same patches -> same numbers; the table shows every VAE and metric
    again = _run(["--vae", vae_files["tuned"], "--data", folders["data"], "--patch-size", str(P),
                  "--count", "5", "--seed", "3", "--device", "cpu"], capsys)
    assert again["data"]["tuned"]["psnr"] == pytest.approx(res["data"]["tuned"]["psnr"])
    table = E.format_table(res)
    assert "base" in table and "tuned" in table and "PSNR dB" in table and "LPIPS" in table
    assert "general" in table and "seam/interior" in table and "rfid: n/a" in table


def test_eval_without_lpips_weights_and_single_image(vae_files, folders, tmp_path, capsys, monkeypatch):
    hub = tmp_path / "empty_hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("VAEFT_LPIPS_BACKBONE", raising=False)
    res = _run(["--vae", vae_files["base"], "--vae", vae_files["flux"], "--data", folders["single"],
                "--patch-size", str(P), "--count", "3", "--device", "cpu", "--json"], capsys)  # bare --json
    assert res["lpips"]["available"] is False and "never downloaded" in res["lpips"]["reason"]
    assert res["rfid"]["available"] is False and "never downloaded" in res["rfid"]["reason"]
    for name in ("base", "flux_like"):
        r = res["data"][name]
        assert r["lpips"]["available"] is False
        assert np.isfinite(r["psnr"]["mean"]) and np.isfinite(r["ssim"]["mean"])
    assert res["sources"]["data"]["split"] == "all" and "no held-out" in res["sources"]["data"]["note"]
    assert any("latent layouts" in n for n in res["notes"])  # 4 vs 16 latent channels
    assert "lpips: n/a" in E.format_table(res)


def test_eval_errors(vae_files, folders, tmp_path):
    parser = _parser()
    with pytest.raises(SystemExit):  # --vae is required
        parser.parse_args(["eval", "--data", folders["data"]])
    args = parser.parse_args(["eval", "--vae", str(tmp_path / "missing.safetensors"), "--data", folders["data"],
                              "--patch-size", str(P)])
    with pytest.raises(VAEFTError, match="does not exist"):
        cli.run_eval(args)
    args = parser.parse_args(["eval", "--vae", vae_files["base"], "--data", folders["data"], "--patch-size", "30"])
    with pytest.raises(VAEFTError, match="multiple of 8"):
        cli.run_eval(args)


def test_vae_names_unique():
    assert list(cli._vae_names(["a/x.safetensors", "b/x.safetensors", "y.ckpt"])) == ["x", "x-2", "y"]


def test_registered_in_package_cli():
    args = cli.build_parser().parse_args(["eval", "--vae", "v.safetensors", "--data", "d"])
    assert args.func is cli.run_eval and args.count == 64 and args.lpips_net == "alex"
