"""Offline stand-ins for the places checkpoints come from, for the weight tests.

- :func:`isolated_caches`: empty Hugging Face hub and PyTorch hub caches under ``tmp_path``
  (optionally offline), so no test reads or writes the machine's real caches.
- :func:`put_in_hub_cache`: a file placed where ``huggingface_hub`` looks for a cached repo
  file (``models--org--name/refs/main`` + ``snapshots/<commit>/<file>``), i.e. what a
  download on another machine leaves behind.
- :class:`LocalHub`: a local HTTP server that answers like the Hugging Face hub
  (``/<repo>/resolve/main/<file>`` with the ``X-Repo-Commit`` / ``ETag`` headers
  ``huggingface_hub`` reads) and like a plain download site (any other path), counting
  the files it serves.
- :func:`unpruned`: adapters keep the whole upstream model (final norms, heads), to compare
  everything a checkpoint holds with the upstream's own loaders.
- ``fusion_test_siglip``: a tiny timm ViT with SigLIP's structure (no CLS token, MAP head),
  registered in timm's model registry so open_clip can build it by name.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from pathlib import Path
from typing import Dict, Union

import huggingface_hub.constants as hf_constants
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@register_model
def fusion_test_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP's ViT structure (no CLS token, MAP pooling, plain GELU like timm's SigLIP-384) at test size."""
    args = dict(patch_size=16, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, class_token=False, global_pool="map")
    return build_model_with_cfg(VisionTransformer, "vit_base_patch16_siglip_224", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs))


@contextlib.contextmanager
def unpruned():
    """Within the block, the CLIP/SigLIP and DINOv2 adapters skip ``prune_unused`` (the tower
    itself drops the blocks, norms and heads it never runs, after loading)."""
    import pytest

    import fusion.encoders.clip as clip_module
    import fusion.encoders.dinov2 as dinov2_module

    with pytest.MonkeyPatch.context() as patch:
        for module in (clip_module, dinov2_module):
            patch.setattr(module, "prune_unused", lambda model, prune: {})
        yield


def isolated_caches(monkeypatch, tmp_path: Path, offline: bool = True) -> Dict[str, Path]:
    """Point the Hugging Face hub cache and PyTorch's hub cache at empty folders under ``tmp_path``."""
    hf_cache, torch_home = tmp_path / "hf-cache", tmp_path / "torch-home"
    hf_cache.mkdir()
    torch_home.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return {"hf": hf_cache, "torch_checkpoints": torch_home / "hub" / "checkpoints"}


def put_in_hub_cache(cache: Path, repo: str, filename: str, data: Union[bytes, Path]) -> Path:
    """Place ``data`` as ``repo``'s ``filename`` (revision main) in the hub cache ``cache``."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.read_bytes() if isinstance(data, Path) else data)
    return path


class LocalHub:
    """A local HTTP server: ``files`` maps URL paths (``/org/name/resolve/main/file``, or
    ``/downloads/x.pth``) to bytes; ``served`` counts the GET requests answered with a file."""

    def __init__(self):
        self.files: Dict[str, bytes] = {}
        self.served = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _head(self):
                data = hub.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                return data

            def do_HEAD(self):
                self._head()

            def do_GET(self):
                data = self._head()
                if data is not None:
                    self.wfile.write(data)
                    hub.served += 1

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_hub_file(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"/{repo}/resolve/main/{filename}"] = data

    def add_url(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url + path

    def serve_as_hub(self, monkeypatch) -> None:
        """Make ``huggingface_hub`` (and so open_clip and timm) download from this server."""
        monkeypatch.setattr(hf_constants, "ENDPOINT", self.url)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
