"""torch.distributed: FSDP2 sharding of the tower on 2 CPU processes (gloo), and
``fusion-tower extract`` under torchrun, each against the single-process result."""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fusion import build_tower
from fusion.cli import main
from fusion.distributed import dist_env, encoder_blocks, fsdp_units

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tower():
    # dino trains, the other encoders are frozen
    return build_tower("tiny", weights="random", seed=0, overrides=["encoders.dino.freeze=false"])


def test_fsdp_units_are_the_encoder_blocks_and_the_projector(tower):
    # the upstream libraries' own block lists, named here explicitly
    upstream = {"clip": tower.encoders["clip"].model.transformer.resblocks,
                "siglip": tower.encoders["siglip"].model.trunk.blocks,
                "sam": tower.encoders["sam"].model.blocks,
                "dino": tower.encoders["dino"].model.blocks}
    for name, blocks in upstream.items():
        assert encoder_blocks(tower.encoders[name]) == list(blocks), name
    units = tower.fsdp_units()
    assert units == fsdp_units(tower)
    expected = [m for name in upstream for m in (*upstream[name], tower.encoders[name])] + [tower.projector]
    assert units == expected
    # every parameter is in exactly one innermost unit, or left to the tower's own unit (the merge)
    owner = {}
    for unit in units:
        for p in unit.parameters():
            owner.setdefault(id(p), unit)
    rest = [n for n, p in tower.named_parameters() if id(p) not in owner]
    assert rest and all(n.startswith("merge.") for n in rest)


def _fsdp_worker(rank, port, tower, pixels, ref_out, ref_grads, frozen):
    from torch.distributed.tensor import DTensor

    from fusion.distributed import shard_tower

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = copy.deepcopy(tower).train()
        shard_tower(model)
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        big = params["encoders.clip.model.transformer.resblocks.0.mlp.c_fc.weight"]
        assert big.to_local().shape[0] == big.shape[0] // WORLD  # really sharded: half the rows here
        assert all(params[n].requires_grad != (n in frozen) for n in params)
        out = model(pixels[rank:rank + 1])
        torch.testing.assert_close(out, ref_out[rank:rank + 1], rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
        # frozen encoders (and unused parameters) get no gradient; the others the average of
        # the unsharded gradients over both ranks' images
        for name, p in params.items():
            if name in ref_grads:
                torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            else:
                assert p.grad is None, name
        with torch.no_grad():  # the other entry points gather their parameters too
            grids = model.encode(pixels[rank:rank + 1])
            torch.testing.assert_close(model.merge_and_project(grids), ref_out[rank:rank + 1],
                                       rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="forks the test process")
def test_fsdp_two_processes_shard_and_match_unsharded(tower):
    tower.train()
    pixels = torch.rand(WORLD, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out = tower(pixels)
    grads = []
    for r in range(WORLD):  # data parallel: each rank's loss on its own image, gradients averaged
        tower.zero_grad(set_to_none=True)
        tower(pixels[r:r + 1]).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    ref_grads = {n: sum(g[n] for g in grads) / WORLD for n in grads[0]}
    tower.zero_grad(set_to_none=True)
    tower.eval()
    frozen = {n for n, p in tower.named_parameters() if not p.requires_grad}
    assert frozen and any(n.startswith("encoders.dino.") for n in ref_grads)
    # fork: the workers inherit the imported libraries and the built tower
    mp.start_processes(_fsdp_worker, args=(_free_port(), tower, pixels, ref_out, ref_grads, frozen),
                       nprocs=WORLD, start_method="fork")


def test_dist_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = dist_env()
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == type(env)(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4"):
        dist_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist_env()


def _features(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    feats, grids = {}, {}
    for shard in manifest["shards"]:
        feats.update(load_file(str(out / shard)))
    for shard in manifest.get("encoder_shards", {}).values():
        grids.update(load_file(str(out / shard)))
    return manifest, feats, grids


@pytest.mark.distributed
def test_torchrun_extract_matches_one_process_and_resumes(tmp_path):
    common = ["extract", "tiny", "--weights", "random", "--images", str(EXAMPLES), "--shard-size", "1",
              "--no-progress", "--cache-encoders"]
    single = tmp_path / "single"
    assert main(common + ["--out", str(single)]) == 0
    # a run of 2 ranks that was killed after rank 1 finished shard 1 (of shards 0-3)
    multi = tmp_path / "multi"
    (multi / "manifest").mkdir(parents=True)
    (multi / "encoders").mkdir()
    for rel in ("shard-00001.safetensors", "encoders/shard-00001.safetensors", "manifest/shard-00001.json"):
        shutil.copy2(single / rel, multi / rel)
    done = (multi / "shard-00001.safetensors").stat().st_mtime_ns
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--master_port", str(_free_port()), "-m", "fusion", *common, "--out", str(multi)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0/2: encoded 2 images into 2 shards, 0 shards already done" in proc.stderr
    assert "rank 1/2: encoded 1 images into 1 shards, 1 shards already done" in proc.stderr
    assert proc.stdout.count("wrote 4 images") == 1  # rank 0 alone writes the manifest
    assert (multi / "shard-00001.safetensors").stat().st_mtime_ns == done  # resumed, not redone
    m_single, f_single, g_single = _features(single)
    m_multi, f_multi, g_multi = _features(multi)
    assert m_multi["shards"] == m_single["shards"] and m_multi["num_images"] == 4
    assert sorted(f_multi) == sorted(f_single) == sorted(p.name for p in EXAMPLES.iterdir())
    assert sorted(g_multi) == sorted(g_single) and len(g_multi) == 4 * 4
    for key in f_single:
        torch.testing.assert_close(f_multi[key], f_single[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in g_single:
        torch.testing.assert_close(g_multi[key], g_single[key], rtol=1e-5, atol=1e-5, msg=key)
