import pytest
import torch

from training.errors import VAEFTError
from training.losses import BACKBONE_FILES, ENV_BACKBONE, ReconstructionLoss, load_lpips


def test_lpips_term_carries_gradient(lpips_random):
    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).requires_grad_(True)
    loss, parts = ReconstructionLoss(mse_weight=0.0, lpips_weight=1.0, lpips_net=lpips_random)(recon, target)
    loss.backward()
    assert set(parts) == {"lpips", "total"}
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_random.parameters())


def test_loss_composition(lpips_random):
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = target + 0.1
    loss, parts = ReconstructionLoss(1.0, 0.5, 0.1, lpips_random)(recon, target)
    expected = parts["mse"] + 0.5 * parts["l1"] + 0.1 * parts["lpips"]
    assert torch.allclose(loss, expected)
    assert torch.allclose(parts["mse"], torch.tensor(0.01), atol=1e-6)
    assert torch.allclose(parts["l1"], torch.tensor(0.1), atol=1e-6)


def test_lpips_weight_needs_network():
    with pytest.raises(VAEFTError, match="LPIPS network"):
        ReconstructionLoss(lpips_weight=0.1, lpips_net=None)


def test_missing_backbone_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_BACKBONE, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VAEFTError) as e:
        load_lpips("vgg")
    msg = str(e.value)
    assert BACKBONE_FILES["vgg"] in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "lpips_weight = 0" in msg


def _features_file(tmp_path, net):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    path = tmp_path / BACKBONE_FILES[net]
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)
    return path, model.features


def test_backbone_loaded_from_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_BACKBONE, raising=False)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    path, features = _features_file(hub / "checkpoints", "alex")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    net = load_lpips("alex")
    assert torch.equal(net.net.slice1[0].weight, features[0].weight)
    assert torch.equal(net.net.state_dict()["slice5.10.weight"], features[10].weight)


def test_backbone_from_env_and_bad_file(tmp_path, monkeypatch):
    path, features = _features_file(tmp_path, "alex")
    monkeypatch.setenv(ENV_BACKBONE, str(path))
    assert torch.equal(load_lpips("alex").net.state_dict()["slice2.3.weight"], features[3].weight)
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(VAEFTError, match="not a torchvision backbone"):
        load_lpips("alex", backbone_path=str(bad))
    with pytest.raises(VAEFTError, match="does not exist"):
        load_lpips("alex", backbone_path=str(tmp_path / "nope.pth"))


def test_env_backbone_for_one_network_does_not_block_the_other(tmp_path, monkeypatch):
    """VAEFT_LPIPS_BACKBONE set to the AlexNet file (evaluation); training's VGG comes from the cache."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    alex_path, alex = _features_file(tmp_path, "alex")
    monkeypatch.setenv(ENV_BACKBONE, str(alex_path))
    with pytest.raises(VAEFTError, match=r"vgg16-397923af.pth.*not a torchvision backbone for this LPIPS"):
        load_lpips("vgg")  # nothing fits VGG yet: the message says why the env file was passed over
    _, vgg = _features_file(hub / "checkpoints", "vgg")
    assert torch.equal(load_lpips("vgg").net.state_dict()["slice1.0.weight"], vgg[0].weight)
    assert torch.equal(load_lpips("alex").net.state_dict()["slice2.3.weight"], alex[3].weight)
