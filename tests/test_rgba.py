"""RGBA end to end (straight alpha, training.alpha): alpha read from the files, kept through patches and
augmentation, counted by metrics and the loss, shown over a checkerboard; RGB images made opaque for an RGBA
VAE and RGBA images composited for an RGB one, each with a note; a 4-channel Wan 2.1 VAE (Qwen-Image-Layered's)
trained from the command line and exported as a drop-in file whose alpha output trained."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cli_main, run_with_node_modules, tiny_ldm_sd
from family_examples import wan_file
from training import alpha as A
from training import imageio as tio
from training import metrics as M
from training.augment import augment, sample_params
from training.config import DataConfig, TrainConfig
from training.data import build_dataset
from training.errors import VAEFTError
from training.evaluate import comparison_grid
from training.families import wan
from training.losses import ReconstructionLoss
from training.plot import to_pil
from training.session import Hooks, run_session
from training.vae import build_vae

skimage_data = pytest.importorskip("skimage.data")

P = 32


def astronaut_rgba(size: int = 128) -> np.ndarray:
    """skimage's astronaut, downscaled, with a made-up circular alpha: opaque inside, transparent outside, a
    soft edge of intermediate values between (H, W, 4) uint8."""
    rgb = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((size, size), Image.BILINEAR))
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size * 0.45, xx - size * 0.55)
    a = np.clip((size * 0.35 - r) * 16, 0, 255).astype(np.uint8)
    assert (a == 0).any() and (a == 255).any() and ((a > 0) & (a < 255)).sum() > 50
    return np.dstack([rgb, a])


@pytest.fixture(scope="module")
def rgba_folder(tmp_path_factory):
    """One RGBA PNG (the astronaut with a circular alpha) and one RGB PNG (coffee, no alpha)."""
    d = tmp_path_factory.mktemp("rgba")
    Image.fromarray(astronaut_rgba()).save(d / "astronaut.png")
    coffee = np.asarray(Image.fromarray(skimage_data.coffee()).resize((128, 96), Image.BILINEAR))
    Image.fromarray(coffee).save(d / "coffee.png")
    return d


# ---------------------------------------------------------------------------------------------------- reading

def test_alpha_is_read_straight_from_png_webp_and_tiff(tmp_path):
    import tifffile

    rgba = astronaut_rgba(64)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba).save(tmp_path / "a.webp", lossless=True, exact=True)
    Image.fromarray(rgba).save(tmp_path / "a.tiff")
    want = torch.from_numpy(rgba).permute(2, 0, 1)
    for name in ("a.png", "a.webp", "a.tiff"):
        dec = tio.read_image(tmp_path / name, alpha=True)
        assert dec.pixels.dtype == torch.uint8 and torch.equal(dec.pixels, want), name
        assert any("straight" in n for n in dec.notes), dec.notes
        # without alpha=True: composited over black, as the pack always read it
        old = tio.read_image(tmp_path / name).pixels
        assert old.shape[0] == 3 and torch.equal(old, A.over_black_pixels(want)), name
    # 16-bit: a PNG and TIFFs with straight and with premultiplied ("associated") alpha
    deep = (rgba.astype(np.uint16) * 257) | 1
    deep[..., 3] = rgba[..., 3].astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "straight.tiff", deep, photometric="rgb", extrasamples=["unassalpha"])
    a = deep[..., 3:].astype(np.uint64)
    pre = ((deep[..., :3].astype(np.uint64) * a + 32767) // 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "premultiplied.tiff", np.dstack([pre, deep[..., 3]]), photometric="rgb",
                     extrasamples=["assocalpha"])
    from test_data import png16  # a 16-bit PNG writer (PIL cannot write one)

    (tmp_path / "deep.png").write_bytes(png16(deep))
    (tmp_path / "grey.png").write_bytes(png16(deep[..., [1, 3]]))
    want16 = torch.from_numpy(deep).permute(2, 0, 1)
    assert torch.equal(tio.read_image(tmp_path / "deep.png", alpha=True).pixels, want16)
    assert torch.equal(tio.read_image(tmp_path / "grey.png", alpha=True).pixels, want16[[1, 1, 1, 3]])
    straight = tio.read_image(tmp_path / "straight.tiff", alpha=True).pixels
    assert straight.dtype == torch.uint16 and torch.equal(straight, torch.from_numpy(deep).permute(2, 0, 1))
    unpre = tio.read_image(tmp_path / "premultiplied.tiff", alpha=True).pixels.int()
    visible = torch.from_numpy(rgba[..., 3] > 8)  # un-premultiplying small alphas cannot give the colour back
    assert torch.equal(unpre[3], straight[3].int())
    assert (unpre[:3] - straight[:3].int()).abs()[:, visible].max() <= 65535 // int(8 * 257) + 1
    # over black, a premultiplied colour is the stored one (not multiplied by alpha a second time)
    assert torch.equal(tio.read_image(tmp_path / "premultiplied.tiff").pixels, torch.from_numpy(pre).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------------- patches

def test_alpha_is_kept_through_patches_and_moves_with_the_geometry_only(rgba_folder):
    cfg = DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0, flip=True, rotate90=True,
                     color_jitter=0.3)
    ds = build_dataset(rgba_folder, cfg).for_channels(4)
    src = torch.from_numpy(astronaut_rgba()).permute(2, 0, 1)
    specs = ds._batch_specs(0, 16)
    x = ds._extract(specs)
    assert x.shape == (16, 4, P, P)
    i_astro = ds.summary()["images_used"].index("astronaut.png")
    from_astro = [j for j, s in enumerate(specs) if s.img == i_astro]
    assert from_astro and len(from_astro) < 16
    for j in range(16):
        s = specs[j]
        if j in from_astro:  # the file's pixels, alpha and colours, exactly where the patch was cut
            crop = src[:, s.top:s.top + P, s.left:s.left + P].float() / 127.5 - 1
            assert torch.equal(x[j], crop), j
        else:  # the RGB image: opaque
            assert torch.equal(x[j, 3], torch.ones(P, P)), j
    assert (x[from_astro, 3] < 1).any() and (x[from_astro, 3] > -1).any()  # the patches hold real alpha
    # augmentation: flips and quarter turns move alpha with the colours; colour jitter never touches alpha
    seed = 5
    p = sample_params(16, P, P, cfg, seed)
    assert p.hflip.any() and p.rot90.any() and p.jitter is not None
    out = augment(x, cfg, seed)
    for j in range(16):
        want = x[j]
        if p.hflip[j]:
            want = want.flip(-1)
        if p.vflip[j]:
            want = want.flip(-2)
        want = torch.rot90(want, int(p.rot90[j]), dims=(-2, -1))
        assert torch.equal(out[j, 3], want[3]), j
    geometric = augment(x, DataConfig(patch_size=P, flip=True, rotate90=True, color_jitter=0.0), seed)
    assert torch.equal(out[:, 3], geometric[:, 3]) and not torch.equal(out[:, :3], geometric[:, :3])
    with pytest.raises(VAEFTError, match=r"expects \(B, 3, H, W\) or RGBA"):
        augment(x[:, :2], cfg, 0)


def test_rgb_images_get_opaque_alpha_and_rgba_images_are_composited_for_an_rgb_vae(rgba_folder):
    cfg = DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0, scale_jitter=0.3)
    plain = build_dataset(rgba_folder, cfg)
    assert plain.channels == 3 and plain.alpha_images == 1
    four = plain.for_channels(4)
    assert four is not plain and four.for_channels(4) is four and plain.for_channels(3).for_channels(3).chosen
    assert plain.alpha_note() is None and "1 of 2 images have transparency" in plain.summary()["alpha"]
    assert "a VAE of RGB images on the images composited over black" in plain.summary()["alpha"]
    plain = plain.for_channels(3)  # chosen for an RGB VAE
    assert re.fullmatch(r"1 of 2 images have no alpha channel: given alpha 1\.0 \(opaque\).*", four.alpha_note())
    assert "1 of 2 images have an alpha channel: composited over black" in plain.alpha_note()
    s4, s3 = four.summary(), plain.summary()
    assert s4["image_channels"] == 4 and s4["alpha_images"] == 1 and "straight (not premultiplied)" in s4["alpha"]
    assert s3["image_channels"] == 3 and "black" in s3["alpha"] and "given alpha 1.0" in s4["alpha"]
    assert "image_channels" not in plain.order_signature() and four.order_signature()["image_channels"] == 4
    # the same patches (scale jitter too) in both: RGB patches are the RGBA ones over black
    rgb, rgba = plain.patches_at(3, 8), four.patches_at(3, 8)
    assert rgb.shape == (8, 3, P, P) and rgba.shape == (8, 4, P, P)
    over = A.over(rgba, 0.0)
    assert (rgb - over).abs().max() < 2.5 / 255  # integer compositing vs straight resize, then composite
    # exactly as the pack read a transparent image before it kept alpha (composited right after decoding)
    legacy = tio.read_image(rgba_folder / "astronaut.png").pixels
    spec = plain._random_spec(plain.summary()["images_used"].index("astronaut.png"), np.random.default_rng(0), {}, 0)
    want = legacy[:, spec.top:spec.top + P, spec.left:spec.left + P].float() / 127.5 - 1
    assert torch.equal(plain._extract([spec])[0], want)
    # an RGBA IMAGE batch (ComfyUI's, straight alpha) keeps its alpha too
    batch = torch.rand(2, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    t = build_dataset(batch, DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0)).for_channels(4)
    assert t.alpha_images == 2 and t.alpha_note() is None
    spec = t._random_spec(0, np.random.default_rng(1), {}, 0)
    got = t._extract([spec])[0]
    want = batch[0, :, spec.top:spec.top + P, spec.left:spec.left + P] * 2 - 1
    assert (got - want).abs().max() < 1.5 / 65535


def test_previews_and_comparison_grids_show_transparency_over_a_checkerboard(rgba_folder):
    board = A.checkerboard(16, 16)
    assert torch.equal(board.unique(), torch.tensor(A.CHECKER_GREYS)) and board[0, 0, 0] != board[0, 0, A.CHECKER_CELL]
    clear = torch.cat([torch.full((1, 3, 16, 16), 0.3), torch.zeros(1, 1, 16, 16)], 1)
    assert torch.equal(A.on_checkerboard(clear)[0], board.expand(3, -1, -1))
    shown = np.asarray(to_pil(clear[0]))  # a picture of RGBA, written as PNG or shown on a node, is RGB
    assert shown.shape == (16, 16, 3) and (shown[..., 0] == (board[0].numpy() * 255 + 0.5).astype(np.uint8)).all()
    x = torch.rand(2, 4, P, P, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x[:, 3, :, : P // 2] = -1  # left half transparent
    g = comparison_grid(x, [x])
    assert g.shape == (3, 2 * P, 3 * P)
    cb = A.checkerboard(P, P)
    assert torch.allclose(g[:, :P, : P // 2], cb[:, :, : P // 2].expand(3, -1, -1))  # original
    assert torch.allclose(g[:, :P, P:P + P // 2], cb[:, :, : P // 2].expand(3, -1, -1))  # its reconstruction
    # the heat map counts alpha: a reconstruction differing in alpha only is not shown as perfect
    y = x.clone()
    y[:, 3] = -y[:, 3]
    assert comparison_grid(x, [y])[:, :, 2 * P:].mean() > comparison_grid(x, [x])[:, :, 2 * P:].mean() + 0.1
    # the live previews of a run (written to previews/, shown on the node): inputs over the checkerboard too
    from training.trainer import _preview

    vae = build_vae(wan_file(channels=4)).model
    shown = _preview(vae, x, "cpu", torch.autocast("cpu", enabled=False))
    assert shown.shape == (4, 3, P, P)
    assert torch.allclose(shown[:2, :, :, : P // 2], cb[:, :, : P // 2].expand(2, 3, -1, -1))
    # the dataset's preview: the transparent corners of the astronaut over the checkerboard
    ds = build_dataset(rgba_folder, DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0))
    grey = ds.preview(16, seed=0)
    assert grey.shape[0] == 3
    greys = torch.tensor(A.CHECKER_GREYS)
    is_board = ((grey[:, :, :, None] - greys).abs() < 1e-6).any(-1).all(0)
    assert is_board.float().mean() > 0.05


# ---------------------------------------------------------------------------------------------------- metrics

def test_metrics_and_the_loss_count_alpha(lpips_random):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 4, P, P, generator=g) * 2 - 1
    y = x.clone()
    y[:, 3, 8:24, 8:24] = -y[:, 3, 8:24, 8:24]  # only alpha differs
    same = M.image_metrics(x, x, lpips_random)
    diff = M.image_metrics(y, x, lpips_random)
    assert same["psnr"].min() == M.PSNR_MAX_DB and same["alpha_psnr"].min() == M.PSNR_MAX_DB
    assert (diff["psnr"] < 40).all() and (diff["alpha_psnr"] < 30).all() and (diff["ssim"] < 0.99).all()
    assert (diff["lpips"] > 0).all() and (diff["delta_e2000"] > 0.5).all()
    assert (same["lpips"] == 0).all() and (same["delta_e2000"] == 0).all()
    # black pixels whose alpha differs: invisible over black, seen over white (both backgrounds count)
    dark, seen = x.clone(), x.clone()
    dark[:, :3] = -1
    seen[:, :3] = -1
    seen[:, 3] = -dark[:, 3]
    assert torch.equal(A.over(seen, 0.0), A.over(dark, 0.0))
    assert (M.delta_e2000(seen, dark) > 1).all() and (M.lpips_distance(lpips_random, seen, dark) > 0).all()
    # the training loss: MSE over four channels, LPIPS on the composites; alpha gets a gradient from both
    loss = ReconstructionLoss(mse_weight=1.0, lpips_weight=1.0, lpips_net=lpips_random)
    recon = y.clone().requires_grad_(True)
    total, parts = loss(recon, x)
    assert parts["mse"] > 0 and parts["lpips"] > 0
    total.backward()
    assert recon.grad[:, 3].abs().sum() > 0
    mse_only = ReconstructionLoss(mse_weight=1.0, lpips_weight=0.0)
    assert float(mse_only(y, x)[0]) == pytest.approx(float(((y - x) ** 2).mean()))
    with pytest.raises(VAEFTError, match="RGB \\(or RGBA\\)"):
        M.psnr(x, x[:, :3])


# ---------------------------------------------------------------------------------------------------- families

def test_a_4_channel_wan_vae_is_read_and_other_channel_counts_are_refused_by_name():
    vae = build_vae(wan_file(channels=4), source="qwen_image_layered_vae.safetensors")
    assert vae.family is wan.FAMILY and vae.family.image_channels(vae.model) == 4
    z = vae.model.encode(torch.zeros(1, 4, P, P)).latent_dist.mode()
    down = vae.family.downsampling(vae.model)
    assert z.shape == (1, 16, P // down, P // down) and vae.model.decode(z).sample.shape == (1, 4, P, P)
    with pytest.raises(VAEFTError, match=re.escape("x.safetensors is a Wan 2.1 VAE of 5-channel images; this "
                                                   "version trains Wan 2.1 VAEs of RGB images (3 channels")):
        build_vae(wan_file(channels=5), source="x.safetensors")
    mixed = wan_file(channels=4)
    mixed["decoder.head.2.weight"] = mixed["decoder.head.2.weight"][:3]
    mixed["decoder.head.2.bias"] = mixed["decoder.head.2.bias"][:3]
    with pytest.raises(VAEFTError, match="encoder takes 4-channel images but whose decoder .* gives 3-channel"):
        build_vae(mixed, source="x.safetensors")


def test_an_rgb_vae_given_rgba_images_trains_on_them_composited_with_a_note(rgba_folder):
    vae = build_vae(tiny_ldm_sd(seed=3))
    data = build_dataset(rgba_folder, DataConfig(patch_size=P, foreground_threshold=0, val_fraction=0))
    notes = []
    cfg = TrainConfig(steps=1, batch_size=2, lpips_weight=0.0, val_every=0, preview_every=0)
    result = run_session(vae, data, cfg, device="cpu", hooks=Hooks(note=notes.append))
    said = [n for n in notes if n.startswith("alpha:")]
    assert said == ["alpha: 1 of 2 images have an alpha channel: composited over black (RGB × alpha), then "
                    "dropped for this VAE of RGB images (the transparency is not trained)"]
    assert result.trained.dataset["image_channels"] == 3 and "composited over black" in result.trained.dataset["alpha"]


# ---------------------------------------------------------------------------------------------------- end to end

def test_fit_trains_a_4_channel_wan_vae_and_exports_a_drop_in_file_whose_alpha_output_trained(rgba_folder, tmp_path):
    import torchvision

    base_path = tmp_path / "qwen_image_layered_vae.safetensors"
    base = wan_file(seed=4, channels=4)
    save_file(base, str(base_path))
    torch.manual_seed(0)
    backbone = tmp_path / "alexnet-random.pth"
    torch.save({k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")},
               backbone)
    out = tmp_path / "vae-ft-layered-3.safetensors"
    p = cli_main("fit", "--vae", base_path, "--data", rgba_folder, "--out", out, "--steps", 3, "--patch-size", P,
                 "--batch-size", 2, "--lr", 1e-3, "--foreground-threshold", 0, "--val-fraction", 0.5,
                 "--val-every", 3, "--val-patches", 2, "--lpips-net", "alex", "--no-progress",
                 "--preview-dir", tmp_path / "previews", "--preview-every", 3, "--run-dir", tmp_path / "run",
                 env={"VAEFT_LPIPS_BACKBONE": str(backbone)})
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["final"]["lpips"] > 0 and result["final"]["val_lpips"] > 0
    # the RGB image was made opaque, and the user was told once
    assert p.stderr.count("alpha: 1 of 2 images have no alpha channel: given alpha 1.0 (opaque)") == 1
    # a drop-in file: the base's keys, shapes and dtypes; every untrained tensor byte for byte the base's
    exported = load_file(out)
    assert set(exported) == set(base)
    assert all(exported[k].shape == base[k].shape and exported[k].dtype == base[k].dtype for k in base)
    frozen = [k for k in base if k.startswith(("encoder.", "conv1.")) or ".time_conv." in k]
    assert "encoder.conv1.weight" in frozen and len(frozen) > 20
    for k in frozen:
        assert torch.equal(exported[k].view(torch.int16), base[k].view(torch.int16)), k
    # the alpha output trained: the decoder head's 4th output channel moved
    for k in ("decoder.head.2.weight", "decoder.head.2.bias"):
        assert exported[k].shape[0] == 4
        assert not torch.equal(exported[k][3], base[k][3]), k
    assert "untrained tensors (encoder, conv1 and the temporal resampling): bit-identical" in p.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["vaeft.image_channels"] == "4" and "straight (not premultiplied) alpha" in meta["vaeft.alpha"]
    dataset = json.loads(meta["vaeft.dataset"])
    assert dataset["image_channels"] == 4 and dataset["alpha_images"] == 1 and "given alpha 1.0" in dataset["alpha"]
    # the run folder's record says what the patches were; fit --config reads it as a record, no setting
    images = json.loads((tmp_path / "run" / "config.json").read_text())["images"]
    assert images["channels"] == 4 and "straight (not premultiplied)" in images["alpha"]
    assert "given alpha 1.0" in images["alpha"]
    p = cli_main("fit", "--config", tmp_path / "run" / "config.json", "--out", tmp_path / "again.safetensors",
                 "--steps", 1, "--lpips-weight", 0, "--val-every", 0, "--no-progress")
    assert "ignored" not in p.stderr and (tmp_path / "again.safetensors").is_file()
    # the previews are RGB pictures (transparency over the checkerboard)
    previews = sorted((tmp_path / "previews").iterdir())
    assert previews and Image.open(previews[-1]).mode == "RGB"
    # it loads back as a 4-channel Wan 2.1 VAE; eval scores base and fine-tune on RGBA patches, alpha counted
    again = build_vae(exported, source=out.name)
    assert again.family.image_channels(again.model) == 4
    grid = tmp_path / "grid.png"
    p = cli_main("eval", "--vae", base_path, "--vae", out, "--data", rgba_folder, "--patch-size", P, "--count", 2,
                 "--foreground-threshold", 0, "--grid", grid, "--lpips-backbone", backbone)
    ev = json.loads(p.stdout)
    for name in ("qwen_image_layered_vae", "vae-ft-layered-3"):
        assert 0 < ev["data"][name]["alpha_psnr"]["mean"] < M.PSNR_MAX_DB and ev["data"][name]["lpips"]["mean"] > 0
    assert ev["data"]["qwen_image_layered_vae"]["psnr"] != ev["data"]["vae-ft-layered-3"]["psnr"]
    assert Image.open(grid).mode == "RGB"
    # an RGB and an RGBA VAE are not scored on the same patches: refused, naming both
    save_file(tiny_ldm_sd(), str(tmp_path / "sd.safetensors"))
    p = cli_main("eval", "--vae", tmp_path / "sd.safetensors", "--vae", out, "--data", rgba_folder,
                 "--patch-size", P, "--count", 2, check=False)
    assert p.returncode == 2 and "sd: 3, vae-ft-layered-3: 4" in p.stderr and "different channels" in p.stderr


def test_the_nodes_keep_the_alpha_of_a_4_channel_image_batch():
    """ComfyUI's IMAGE is (B, H, W, C); a 4-channel one (JoinImageWithAlpha's) is RGBA with straight alpha:
    the node's conversion keeps it (it used to drop it), an RGB one stays RGB. Run in a fresh interpreter with
    ComfyUI's comfy_api importable (nodes/common.py imports it)."""
    run_with_node_modules("""
common = importlib.import_module("vaeftpack.nodes.common")
from vaeftpack.training.data import build_dataset
from vaeftpack.training.config import DataConfig
img = torch.rand(2, 40, 48, 4, generator=torch.Generator().manual_seed(0))
x = common.image_to_training(img)
assert x.shape == (2, 4, 40, 48) and torch.equal(x, img.movedim(-1, 1)), x.shape
assert common.image_to_training(img[..., :3]).shape == (2, 3, 40, 48)
ds = build_dataset(x, DataConfig(patch_size=32, foreground_threshold=0, val_fraction=0)).for_channels(4)
assert ds.alpha_images == 2 and ds.patches_at(0, 2).shape == (2, 4, 32, 32)
print("OK")
""")
