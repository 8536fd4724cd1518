"""Install this pack's requirements into the running interpreter (ComfyUI-Manager runs this).

torch, torchvision and torchaudio are pinned to the versions already installed, so
pip can never replace the CUDA build ComfyUI runs on.
"""

import importlib.metadata
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTECTED = ("torch", "torchvision", "torchaudio")


def main() -> int:
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
        constraints = f.name
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-r", os.path.join(HERE, "requirements.txt"),
               "-c", constraints]
        print("vae-finetune: " + " ".join(cmd), flush=True)
        return subprocess.call(cmd)
    finally:
        os.unlink(constraints)


if __name__ == "__main__":
    sys.exit(main())
