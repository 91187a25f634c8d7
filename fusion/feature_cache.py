"""Read the encoder-grid cache written by ``fusion-tower extract --cache-encoders``.

With frozen encoders, LLaVA-style stage-1 training (only the projector, and the merge
norms, learn) recomputes the same encoder outputs every epoch. Extract them once::

    fusion-tower extract vsre --images data/ --out cache/ --cache-encoders

then train from the cache, never running an encoder::

    cache = FeatureCache("cache/")
    cache.check(tower)                                   # same encoders and grids
    loader = torch.utils.data.DataLoader(cache, batch_size=32, shuffle=True)
    for names, grids in loader:                          # grids: name -> [B, h, w, C]
        tokens = tower.merge_and_project(grids)          # [B, N, D], as tower(pixels)

The result equals ``tower(pixel_values)`` on the same images (the cache holds the
grids in the encoders' output dtype). Not covered: ROI crops (they are encoded per
request) and anything that changes the encoders (another layer, unfrozen encoders).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
from safetensors import safe_open

Grids = Dict[str, torch.Tensor]


class FeatureCache(torch.utils.data.Dataset):
    """The images of an ``extract --cache-encoders`` folder, as a map-style dataset.

    ``cache[i]`` is ``(image_name, {encoder: [h, w, C]})``; a ``DataLoader`` batches it to
    ``(names, {encoder: [B, h, w, C]})``. ``names`` (sorted), ``encoders`` (name ->
    ``(h, w, C)``, in the tower's encoder order), :meth:`grids` and :meth:`tokens` for
    batches by name, :meth:`check` against a tower.
    """

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"directory: {str(self.directory)!r} has no manifest.json; run "
                                    f"`fusion-tower extract ... --cache-encoders --out {self.directory}` to the end")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.manifest = manifest
        encoder_shards = manifest.get("encoder_shards") or {}
        if "encoders" not in manifest or set(encoder_shards) != set(manifest["shards"]):
            raise ValueError(f"directory: {str(self.directory)!r} holds no encoder cache (or only part of one); "
                             f"extract with --cache-encoders")
        self.encoders: Dict[str, Tuple[int, int, int]] = {k: tuple(v) for k, v in manifest["encoders"].items()}
        self._where: Dict[str, Tuple[str, str]] = {}  # image -> (token shard, encoder shard)
        for shard, images in manifest["shards"].items():
            for image in images:
                self._where[image] = (shard, encoder_shards[shard])
        self.names: List[str] = sorted(self._where)
        self._files: Dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Tuple[str, Grids]:
        name = self.names[index]
        return name, self._image_grids(name)

    def _open(self, relative: str):
        handle = self._files.get(relative)
        if handle is None:
            handle = self._files[relative] = safe_open(str(self.directory / relative), framework="pt")
        return handle

    def _image_grids(self, name: str) -> Grids:
        if name not in self._where:
            raise KeyError(f"image {name!r} is not in the cache {str(self.directory)!r} ({len(self.names)} images)")
        handle = self._open(self._where[name][1])
        return {enc: handle.get_tensor(f"{name}/{enc}") for enc in self.encoders}

    def grids(self, names: Sequence[str]) -> Grids:
        """``{encoder: [B, h, w, C]}`` for the images ``names``, in that order."""
        per_image = [self._image_grids(n) for n in names]
        return {enc: torch.stack([g[enc] for g in per_image]) for enc in self.encoders}

    def tokens(self, names: Sequence[str]) -> torch.Tensor:
        """The fused tokens ``[B, N, D]`` the extraction run wrote (float32)."""
        out = []
        for name in names:
            if name not in self._where:
                raise KeyError(f"image {name!r} is not in the cache {str(self.directory)!r}")
            out.append(self._open(self._where[name][0]).get_tensor(name))
        return torch.stack(out)

    def check(self, tower) -> None:
        """``ValueError`` unless ``tower``'s encoders (names, order, grids, widths) are the cached ones."""
        expected = tower.encoder_grid_shapes()
        if list(expected.items()) != list(self.encoders.items()):
            raise ValueError(f"tower: its encoder grids {expected} differ from the cache's {self.encoders} "
                             f"({str(self.directory)!r}); build the tower from the config the cache was "
                             f"extracted with (manifest.json: source {self.manifest.get('source')!r}, "
                             f"overrides {self.manifest.get('overrides')})")

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[Tuple[List[str], Grids]]:
        """One epoch of ``(names, grids)`` batches (shuffled by ``seed``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        order = list(range(len(self.names)))
        if shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            names = [self.names[i] for i in idx]
            yield names, self.grids(names)

    def __getstate__(self):  # open safetensors handles do not cross into DataLoader workers
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


__all__ = ["FeatureCache"]
