"""Fine-tune a diffusion model's VAE on your own images: the families in ``training.families.FAMILIES``
(kl-f8, Flux.2, Wan 2.1 when this was written; ``python -m training --help`` lists them).

A pure PyTorch library (no ComfyUI import) shared by the ComfyUI nodes, the CLI
(``python -m training ...``) and multi-GPU runs (``torchrun ... -m training fit``).
"""

from __future__ import annotations

import os
import re

PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def project_metadata(path: str = PYPROJECT) -> dict:
    """pyproject.toml as a dict ({} without one): the one place the version and the minimum ComfyUI
    version are declared. Python 3.10 has no tomllib; its fallback reads the simple ``key = "string"``
    lines of each table, which is all this file's version fields are."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    try:
        import tomllib  # Python 3.11+; older ones read the few fields needed by hand
    except ImportError:
        return _string_fields(raw.decode("utf-8"))
    return tomllib.loads(raw.decode("utf-8"))


def _string_fields(text: str) -> dict:
    """{table: {key: value}} for the ``key = "value"`` lines of a TOML file (tables nested by dots)."""
    out: dict = {}
    table = out
    for line in text.splitlines():
        line = line.strip()
        head = re.fullmatch(r"\[([A-Za-z0-9_.-]+)\]", line)
        if head:
            table = out
            for part in head.group(1).split("."):
                table = table.setdefault(part, {})
            continue
        kv = re.fullmatch(r'(?:"([^"]+)"|([A-Za-z0-9_-]+))\s*=\s*"([^"]*)"\s*(#.*)?', line)
        if kv:
            table[kv.group(1) or kv.group(2)] = kv.group(3)
    return out


__version__ = project_metadata().get("project", {}).get("version", "0+unknown")
