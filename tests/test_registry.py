"""The pack as the Comfy Registry and ComfyUI see it: one version, the minimum ComfyUI and the message an
older one gets, the registry metadata and the publish workflow — without ComfyUI."""

import os
import subprocess
import sys
import textwrap

from conftest import ROOT
from training import __version__, _string_fields, project_metadata


def test_the_version_is_declared_once_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert __version__ == project_metadata()["project"]["version"] == _string_fields(text)["project"]["version"]
    assert __version__ != "0+unknown"
    # Python 3.10's fallback reads the same fields as tomllib
    meta = project_metadata()
    fallback = _string_fields(text)
    assert fallback["tool"]["comfy"]["requires-comfyui"] == meta["tool"]["comfy"]["requires-comfyui"]
    assert fallback["project"]["urls"] == meta["project"]["urls"]
    with open(os.path.join(ROOT, "training", "__init__.py")) as f:
        assert '__version__ = "' not in f.read()  # no second, literal copy
    from training import metadata

    assert metadata.__version__ == __version__  # what every exported file's vaeft.version says


def _load_pack(comfyui_version: str | None, v3: bool, prelude: str = "") -> subprocess.CompletedProcess:
    """Import this folder the way ComfyUI loads a custom node, with stand-ins for ComfyUI's modules
    (``prelude``: Python run first, to break a requirement)."""
    code = textwrap.dedent(f"""
        import importlib.util, logging, sys, types
        {prelude}
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
        sys.modules["folder_paths"] = types.ModuleType("folder_paths")
        if {comfyui_version!r} is not None:
            sys.modules["comfyui_version"] = types.SimpleNamespace(__version__={comfyui_version!r})
        if {v3!r}:
            latest = types.ModuleType("comfy_api.latest")
            latest.ComfyExtension, latest.io = object, types.SimpleNamespace(ComfyNode=object)
            sys.modules["comfy_api"] = types.ModuleType("comfy_api")
            sys.modules["comfy_api.latest"] = latest
        path = {os.path.join(ROOT, "__init__.py")!r}
        spec = importlib.util.spec_from_file_location("custom_nodes.pack", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        print("MAPPINGS", getattr(module, "NODE_CLASS_MAPPINGS", None), "ENTRYPOINT", hasattr(module, "comfy_entrypoint"))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_too_old_comfyui_gets_one_clear_error_and_no_nodes():
    need = project_metadata()["tool"]["comfy"]["requires-comfyui"].lstrip(">=")
    out = _load_pack("0.3.47", v3=False)
    assert out.returncode == 0, out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, out.stdout
    assert f"needs ComfyUI {need} or newer" in errors[0] and "this is ComfyUI 0.3.47" in errors[0]
    assert "MAPPINGS {} ENTRYPOINT False" in out.stdout
    # a version string that says new enough but no V3 API: still refused, and said why
    out = _load_pack(need, v3=False)
    assert "without it" in out.stdout and "MAPPINGS {} ENTRYPOINT False" in out.stdout
    # V3 API but an older version number: refused too
    assert "MAPPINGS {} ENTRYPOINT False" in _load_pack("0.3.47", v3=True).stdout


def test_new_enough_comfyui_loads_the_extension_without_a_message():
    out = _load_pack("0.3.64", v3=True)
    assert out.returncode == 0, out.stderr
    assert "ERROR" not in out.stdout and "MAPPINGS None ENTRYPOINT True" in out.stdout


def test_a_missing_or_old_requirement_gets_one_clear_error_and_no_nodes():
    """The Manager can report success although pip failed: the pack says so at load time, naming the
    package and the command, instead of failing mid-run when diffusers or lpips is first used."""
    out = _load_pack("0.3.64", v3=True, prelude='sys.modules["lpips"] = None')  # not importable
    assert out.returncode == 0, out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, out.stdout
    assert "lpips>=0.1.4 (does not import" in errors[0] and '-m pip install "lpips>=0.1.4"' in errors[0]
    assert "diffusers" not in errors[0] and "MAPPINGS {} ENTRYPOINT False" in out.stdout
    old = ("import importlib.metadata as m; v = m.version; "
           "m.version = lambda n: '0.29.2' if n == 'diffusers' else v(n)")
    out = _load_pack("0.3.64", v3=True, prelude=old)
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "diffusers>=0.30 (0.29.2 is installed)" in errors[0], out.stdout
    assert "MAPPINGS {} ENTRYPOINT False" in out.stdout


def _pyproject() -> dict:
    import pytest

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml's lists needs Python 3.11's tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_registry_metadata_is_what_comfy_cli_accepts():
    """The fields comfy-cli's publish reads, with the values its validators accept (comfy_cli/registry/
    config_parser.py: OS classifiers by prefix, accelerators from a fixed list, X.Y.Z versions)."""
    import re

    from PIL import Image

    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9._-]*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert comfy["PublisherId"] and comfy["DisplayName"]
    os_classifiers = [c[len("Operating System :: "):] for c in project["classifiers"]
                      if c.startswith("Operating System :: ")]
    assert os_classifiers and all(c.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for c in os_classifiers)
    gpus = [c[len("Environment :: "):] for c in project["classifiers"] if c.startswith("Environment ::")]
    assert gpus and set(gpus) <= {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                                  "GPU :: Apple Metal"}
    assert os.path.isfile(os.path.join(ROOT, project["license"]["file"]))
    # the icon the registry shows: a PNG in the repository, at most 800 x 400
    assert comfy["Icon"].endswith("/assets/icon.png")
    with Image.open(os.path.join(ROOT, "assets", "icon.png")) as icon:
        assert icon.format == "PNG" and icon.width <= 800 and icon.height <= 400
    with open(os.path.join(ROOT, ".github", "workflows", "publish.yml")) as f:
        workflow = f.read()
    assert "Comfy-Org/publish-node-action" in workflow and "secrets.REGISTRY_ACCESS_TOKEN" in workflow
    assert 'grep -n "FILL-IN" pyproject.toml' in workflow  # refuses to publish placeholder addresses


def test_repository_address_is_filled_in():
    """Reported (skipped, with the reason) until the owner replaces the placeholder addresses."""
    import pytest

    data = _pyproject()
    urls = data["project"]["urls"]
    assert urls["Repository"].startswith("https://")
    placeholders = [k for k, v in [*urls.items(), ("Icon", data["tool"]["comfy"]["Icon"])] if "FILL-IN" in v]
    if placeholders:
        pytest.skip(f"pyproject.toml: {', '.join(placeholders)} still name FILL-IN-OWNER: the owner must put the "
                    "repository's real address there before publishing (the publish workflow refuses until then)")
