"""The real client: haotian-liu/LLaVA's own code runs against this checkout.

LLaVA pins ``transformers==4.37.2``, which cannot share an environment with fusion.hf's
transformers 5. So this test builds a separate virtual environment, once, under the
user cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``fusion/llava-client/``).
The running environment's packages stay visible behind its own (torch, timm, open_clip and
segment_anything are reused, not reinstalled); it installs LLaVA's pinned ``transformers`` /
``tokenizers`` / ``huggingface_hub`` / ``accelerate``, ``llava-torch`` without its
dependencies (it pins torch 2.1), and this checkout (editable, so the environment always runs the current
code). In that environment's LLaVA it makes the README's one-line swap
(``llava/model/llava_arch.py`` imports ``build_vision_tower`` from ``fusion.llava``) and
then runs ``tests/llava_client/llava_checks.py`` with pytest there.

The environment is keyed by the pins, the Python version, this checkout's path and the
running environment; a later run reuses it (delete the folder to rebuild). It is marked ``llava_client`` and left
out of the default run (CI runs it as its own step); run it with::

    python -m pytest -q -m llava_client tests/test_llava_client.py
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "llava_client" / "llava_checks.py"
LLAVA = "llava-torch==1.2.2.post1"
# LLaVA's pinned transformers and the versions of its companions that work with it
# (transformers 4.37.2 refuses huggingface_hub >= 1; load_pretrained_model needs accelerate).
PINS = ("transformers==4.37.2", "tokenizers==0.15.1", "huggingface_hub>=0.19.3,<1.0", "accelerate==0.21.0")
SWAP = ("from .multimodal_encoder.builder import build_vision_tower",
        "from fusion.llava import build_vision_tower")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusion" / "llava-client"


def _key() -> str:
    text = json.dumps([LLAVA, PINS, SWAP, sys.version_info[:2], str(ROOT), _parent_site_dirs()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def _parent_site_dirs():
    """The site-packages folders of the environment running this test, in import order."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def _build(venv: Path) -> None:
    """Create the environment in ``venv`` (a fresh folder).

    It sees the packages of the environment running this test (torch, timm, open_clip, ...)
    through a ``.pth`` file placed after its own site-packages, so its pins shadow them; this
    works whether that environment is a venv or the system's (``--system-site-packages`` would
    see the base interpreter's packages, not the running venv's)."""
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "zz_fusion_parent_env.pth").write_text("".join(f"{p}\n" for p in _parent_site_dirs()))
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(pip + list(PINS))
    _run(pip + ["--no-deps", LLAVA])
    _run(pip + ["--no-deps", "-e", str(ROOT)])
    arch = site / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    if text.count(SWAP[0]) != 1:
        raise RuntimeError(f"{arch}: expected the line {SWAP[0]!r} once, the README's swap does not apply")
    arch.write_text(text.replace(SWAP[0], SWAP[1]))


def client_python() -> Path:
    """The environment's Python, built on first use (under a lock, renamed into place when complete)."""
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / _key()
    with open(root / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "ready.json").exists():
            partial = root / f"{venv.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(venv, ignore_errors=True)
            _build(partial)
            (partial / "ready.json").write_text(json.dumps({"llava": LLAVA, "pins": PINS, "checkout": str(ROOT)}))
            partial.rename(venv)
    return venv / "bin" / "python"


@pytest.mark.llava_client
def test_llava_codebase_runs_fusion(tmp_path):
    python = client_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(python), "-m", "pytest", "-q", "-x", str(CHECKS), "--basetemp", str(tmp_path / "t")],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"LLaVA's code with fusion failed:\n{report}"
    assert " passed" in result.stdout and "failed" not in result.stdout.splitlines()[-1], report
