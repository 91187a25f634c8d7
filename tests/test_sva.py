"""``fusion.combine: sva``: parity with Cambrian's layer structure, config, and the tower around it.

The oracle is :class:`fusion.sva_reference.CambrianSVA`, written the way Cambrian's
``vision_sampler.py`` computes (windows copied into ``[B*G*G, window, dim]`` rows, position
embedding on the copies, LayerNorm + projections per copy, SDPA with a mask); it shares no
code with fusion.sva or the kernels. Weights are copied across by name.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from fusion import build_tower, list_presets, load_config
from fusion.boxes import grid_boxes
from fusion.cli import main as cli
from fusion.config import SVAConfig
from fusion.sva import SpatialVisionAggregator
from fusion.sva_reference import CambrianSVA, load_from_sva

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
SMALL = ["fusion.combine=sva", "fusion.sva.dim=32", "fusion.sva.heads=4", "fusion.sva.layers=2"]


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


def _pair(grids, chans, G, dim=16, heads=2, layers=2, context="first", norm=True, backend="torch", queries=None):
    torch.manual_seed(0)
    specs = [(f"e{i}", g, c) for i, (g, c) in enumerate(zip(grids, chans))]
    sva = SpatialVisionAggregator(specs, G, SVAConfig(dim, heads, layers, context), norm=norm, backend=backend)
    if queries == 1:  # Cambrian's single query vector in every cell
        with torch.no_grad():
            sva.query[:] = sva.query[0]
    ref = CambrianSVA(grids, chans, G, dim, heads, layers, context == "first", norm, queries=queries or G * G)
    load_from_sva(ref, sva)
    return sva, ref


def _ref_name(sva, name):
    """Our parameter name -> the reference's (the same mapping load_from_sva applies)."""
    index = {n: i for i, n in enumerate(sva.names)}
    p = name.split(".")
    if p[0] == "inputs":
        return ".".join([f"mm_projector_aux_{index[p[1]]}"] + p[2:])
    if p[0] == "query":
        return "vision_query"
    if p[2] == "pos_embed":
        return ".".join(p[:2] + [f"pos_embed_{index[p[3]]}"])
    if p[3] in ("k_proj", "v_proj"):
        return ".".join(p[:3] + [f"{p[3]}_{index[p[4]]}"] + p[5:])
    return name


def check_parity(sva, ref, grids, chans, B=2, tol=1e-5):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, *g, c, generator=gen, requires_grad=True) for g, c in zip(grids, chans)]
    xr = [x.detach().clone().requires_grad_() for x in xs]
    ours, want = sva(xs), ref(xr)
    assert ours.shape == want.shape == (B, sva.grid ** 2, sva.dim)
    assert rel_err(ours, want) <= tol, rel_err(ours, want)
    go = torch.randn(ours.shape, generator=gen)
    (ours * go).sum().backward()
    (want * go).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in sva.named_parameters():
        g_ref = ref_params[_ref_name(sva, name)].grad
        g = p.grad if p.grad.shape == g_ref.shape else p.grad.sum(0, keepdim=True)  # single query: summed
        assert rel_err(g, g_ref) <= tol, (name, rel_err(g, g_ref))
    for a, b in zip(xs, xr):
        assert rel_err(a.grad, b.grad) <= tol
    return ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity_with_cambrian_on_multiple_grids(backend):
    """Grids that are multiples of G: Cambrian's own rearrangement and arithmetic, forward and
    every gradient (parameters and inputs) within 1e-5 relative in fp32."""
    grids, chans = [(4, 4), (8, 8), (12, 12)], [5, 7, 3]
    sva, ref = _pair(grids, chans, 4, backend=backend)
    assert [getattr(ref.layers[0], f"pos_embed_{i}").shape[0] for i in (1, 2)] == [4, 9]  # k*k slots
    assert not hasattr(ref.layers[0], "pos_embed_0")  # 1x1 windows: none (as Cambrian)
    check_parity(sva, ref, grids, chans)


def test_parity_single_cambrian_query():
    grids, chans = [(4, 4), (8, 8)], [5, 7]
    sva, ref = _pair(grids, chans, 4, queries=1)
    assert ref.vision_query.shape == (1, 16)
    check_parity(sva, ref, grids, chans)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unequal_grids_match_the_gathered_reference(backend):
    """The tiny preset's grids 4/5/6/7 onto 4 (overlapping windows, primary-window positions)."""
    grids, chans = [(4, 4), (5, 5), (6, 6), (7, 7)], [6, 5, 3, 4]
    sva, ref = _pair(grids, chans, 4, backend=backend)
    check_parity(sva, ref, grids, chans)


def test_no_context_no_norm_and_27_onto_24():
    grids, chans = [(27, 27), (9, 9)], [4, 3]
    sva, ref = _pair(grids, chans, 24, context="none", norm=False, layers=1)
    assert sva.layers[0].proj_context is None and sva.layers[0].proj_in.in_features == 16
    check_parity(sva, ref, grids, chans, B=1)


def test_windows_matter():
    """A change to one token moves exactly the cells whose window holds it, in the first layer
    (a check that does not rest on the reference's window code)."""
    grids, chans = [(5, 5), (9, 9)], [3, 3]
    sva, _ = _pair(grids, chans, 4, layers=1, context="none")
    xs = [torch.randn(1, *g, c) for g, c in zip(grids, chans)]
    base = sva(xs)
    moved = [x.clone() for x in xs]
    moved[1][0, 4, 4] += 10.0  # SAM-like grid token (4, 4): 9 -> 4 windows [2, 5) and [4, 7) hold row 4
    diff = (sva(moved) - base).abs().amax(-1).view(4, 4) > 1e-6
    pooled = F.adaptive_avg_pool2d(torch.eye(81).view(81, 1, 9, 9), 4).view(81, 4, 4)[4 * 9 + 4] > 0
    assert torch.equal(diff, pooled)


# ----------------------------------------------------------------------------- config


def test_config_defaults_round_trip_and_every_preset(tmp_path):
    for preset in list_presets():
        cfg = load_config(preset, ["fusion.combine=sva"])
        assert cfg.fusion.sva == SVAConfig(dim=1024, heads=16, layers=3, context="first")  # Cambrian-1's
        assert load_config(cfg.to_dict()) == cfg
    cfg = load_config("vsre", ["fusion.combine=sva", "fusion.sva={dim: 256, heads: 8}", "fusion.sva.context=none"])
    assert (cfg.fusion.sva.dim, cfg.fusion.sva.heads, cfg.fusion.sva.layers, cfg.fusion.sva.context) == (256, 8, 3,
                                                                                                         "none")
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(cfg, ["fusion.combine=channel_concat", "fusion.sva=null"]).fusion.sva is None


@pytest.mark.parametrize("overrides,words", [
    (["fusion.sva.heads=5"], ["fusion.sva.heads", "5", "fusion.sva.dim=1024", "multiple of heads"]),
    (["fusion.combine=channel_concat", "fusion.sva.dim=64"], ["fusion.sva", "'channel_concat'", "combine 'sva'"]),
    (["fusion.resample=bilinear"], ["fusion.resample", "'bilinear'", "must be 'area'"]),
    (["fusion.width=64"], ["fusion.width", "64", "fusion.sva.dim"]),
    (["fusion.sva.dims=64"], ["fusion.sva.dims", "did you mean 'dim'"]),
    (["fusion.sva.context=last"], ["fusion.sva.context", "'last'", "['first', 'none']"]),
    (["fusion.sva.layers=0"], ["fusion.sva.layers", "got 0", ">= 1"]),
    (["fusion.combine=sva2"], ["fusion.combine", "'sva2'", "'sva'"]),
])
def test_config_errors_name_the_key(overrides, words):
    base = [] if "fusion.combine=" in " ".join(overrides) else ["fusion.combine=sva"]
    with pytest.raises(ValueError) as info:
        load_config("vsre", base + overrides)
    missing = [w for w in words if w not in str(info.value)]
    assert not missing, f"message lacks {missing}: {info.value}"


# ----------------------------------------------------------------------------- tower


@pytest.fixture(scope="module")
def tower():
    return build_tower("tiny", SMALL, weights="random", seed=0).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))


def test_tower_is_encoders_then_cambrian_sva_then_projector(tower, pixels):
    merge = tower.merge
    assert merge.out_dim == 32 and tower.hidden_size == 64 and tower.num_patches == 16
    specs = merge.specs
    ref = CambrianSVA([s.grid for s in specs], [s.dim for s in specs], 4, 32, 4, 2, queries=16)
    load_from_sva(ref, merge.sva)
    with torch.no_grad():
        out = tower(pixels, return_dict=True)
        want = tower.projector(ref([out.encoder_grids[s.name] for s in specs]))
    assert rel_err(out.tokens, want) <= 1e-5
    assert out.segments == [("fused", 0, 16)]
    torch.testing.assert_close(out.token_boxes, grid_boxes(4, 4))  # the query cells
    assert out.hidden_states[-2].shape == (2, 16, 32)


def test_training_reaches_the_sva_not_the_frozen_encoders(tower, pixels):
    tower.train()
    tower.zero_grad(set_to_none=True)
    try:
        tower(pixels).square().mean().backward()
        assert all(p.grad is None for p in tower.encoders.parameters())
        missing = [n for n, p in tower.merge.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        assert {n.split(".")[0] for n, _ in tower.merge.named_parameters()} == {"sva"}
    finally:
        tower.zero_grad(set_to_none=True)
        tower.eval()


def test_levels_reduce_and_rois_on_the_sva_grid(pixels):
    t = build_tower("tiny", SMALL + ["fusion.levels=[2, 1]"], weights="random", seed=0).eval()
    with torch.no_grad():
        out = t(pixels, return_dict=True)
        grid = t.merge(out.encoder_grids)  # [B, 16, 32]
        nchw = grid.transpose(1, 2).reshape(2, 32, 4, 4)
        pooled = torch.cat([F.adaptive_avg_pool2d(nchw, s).flatten(2).transpose(1, 2) for s in (2, 1)], 1)
        torch.testing.assert_close(out.hidden_states[-2], torch.cat([grid, pooled], 1), rtol=1e-5, atol=1e-6)
    assert t.num_patches == 21 and out.tokens.shape == (2, 21, 64)
    t = build_tower("tiny", SMALL + ["fusion.reduce={keep: 6, metric: sam}"], weights="random", seed=0).eval()
    with torch.no_grad():
        out = t(pixels, return_dict=True)
    assert out.tokens.shape == (2, 6, 64) and out.token_boxes.shape == (2, 6, 4) and out.token_sizes.sum() == 32
    t = build_tower("tiny", SMALL, weights="random", seed=0).eval()
    with Image.open(EXAMPLES / "grid.png") as im, torch.no_grad():  # a whole-image ROI: the global tokens again
        out = t(**t.image_processor(im.convert("RGB"), rois="[0, 0, 1, 1]"), return_dict=True)
    assert out.segments == [("fused", 0, 16), ("roi0", 16, 32)]
    torch.testing.assert_close(out.tokens[:, 16:], out.tokens[:, :16], rtol=1e-4, atol=1e-5)


def test_cache_save_load_and_fsdp_units(tower, pixels, tmp_path):
    with torch.no_grad():
        grids = tower.encode(pixels)
        ref = tower(pixels)
        torch.testing.assert_close(tower.merge_and_project(grids), ref, rtol=0, atol=0)
    tower.save_pretrained(tmp_path / "saved")
    again = type(tower).from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixels), ref, rtol=0, atol=0)
    units = tower.fsdp_units()
    layers = list(tower.merge.sva.layers)
    assert units[-3:] == layers + [tower.projector]


def test_cli_extract_with_sva(tower, tmp_path):
    out = tmp_path / "feats"
    code = cli(["extract", "tiny", *SMALL, "--weights", "random", "--images", str(EXAMPLES / "house.jpg"),
                "--out", str(out), "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == [16, 64]
    feats = load_file(str(out / next(iter(manifest["shards"]))))
    with Image.open(EXAMPLES / "house.jpg") as im, torch.no_grad():
        want = tower(**tower.image_processor(im.convert("RGB")))[0]  # extract passes image_sizes too
    torch.testing.assert_close(feats["house.jpg"], want, rtol=1e-5, atol=1e-5)


def test_llava_and_hf_drop_ins(tower, pixels):
    from fusion.llava import build_vision_tower

    spec = "tiny " + " ".join(SMALL)
    lt = build_vision_tower(SimpleNamespace(mm_vision_tower=spec, mm_vision_select_layer=-1), weights="random")
    assert lt.hidden_size == 32 and lt.num_patches == 16  # LLaVA's mm_projector takes the SVA width
    transformers = pytest.importorskip("transformers")
    import fusion.hf as fhf

    config = transformers.AutoConfig.for_model("fusion_vision", tower="tiny", overrides=SMALL, weights="random",
                                                seed=0)
    model = transformers.AutoModel.from_config(config).eval()
    assert config.hidden_size == 32 and config.num_patches == 16
    no_proj = build_tower("tiny", SMALL + ["projector.type=none", "projector.out_dim=null"], weights="random",
                          seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, no_proj(pixels), rtol=0, atol=0)
    assert isinstance(model, fhf.FusionVisionModel)


# ----------------------------------------------------------------------------- the example


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_sva_from_cache", ROOT / "examples" / "train_sva_from_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_target_and_equal_budgets():
    ex = _example()
    connectors = ex.build_connectors("tiny")
    counts = {k: ex.count(v[2]) for k, v in connectors.items()}
    assert abs(counts["sva"] - counts["concat"]) <= 0.01 * counts["sva"], counts
    # the target, computed by hand for one cell: softmax-weighted window tokens, then the map
    target = ex.AttentionPoolTarget("dino", (7, 7), 48, 4, 64, beta=4.0, seed=1)
    x = torch.randn(2, 7, 7, 48)
    got = target({"dino": x}) * target.scale
    z = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    rows = _aten_runs(7, 4)  # cell (1, 2): rows [1, 4), columns [3, 6)
    toks = torch.stack([z[:, r, c] for r in rows[1] for c in rows[2]], 1)  # [2, 9, 48]
    w = (4.0 * toks @ target.u).softmax(-1)
    want = (w.unsqueeze(-1) * toks).sum(1) @ target.proj
    torch.testing.assert_close(got[:, 1 * 4 + 2], want, rtol=1e-5, atol=1e-5)


def _aten_runs(n_in, n_out):
    w = F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64).unsqueeze(1), n_out).squeeze(1)
    return [torch.nonzero(w[:, i] > 0).flatten().tolist() for i in range(n_out)]


@pytest.mark.slow
def test_example_sva_learns_what_the_fixed_merge_cannot(tmp_path):
    ex = _example()
    images = ex.make_images(tmp_path / "images", 160)
    cache = ex.make_cache(tmp_path / "cache", "tiny", images)
    res = ex.run(cache, steps=400, log=None)
    sva, concat = res["sva"], res["concat"]
    assert sva["held_out"][-1] < 0.8 * concat["held_out"][-1], (sva["held_out"], concat["held_out"])
    assert sum(sva["train"][-50:]) <= sum(concat["train"][-50:])
    assert sva["held_out"][-1] < sva["held_out"][0]  # it learns


def test_llava_with_sva_trains_saves_and_loads(tmp_path):
    """A whole transformers Llava on the SVA tower: its projector takes the SVA width, the
    SVA gets gradients, and save_pretrained / from_pretrained (a meta-device build) give
    the same logits (to GEMM rounding: the loaded weights are fresh buffers)."""
    pytest.importorskip("transformers")
    from transformers import LlavaForConditionalGeneration

    import fusion.hf as fhf
    from test_hf import PROMPT, WORDS, _image, _text_config, _tokenizer

    torch.manual_seed(0)
    vision = fhf.FusionVisionConfig(tower="tiny", overrides=SMALL, weights="random", seed=3)
    model = LlavaForConditionalGeneration(fhf.llava_config(vision, _text_config(),
                                                           image_token_id=WORDS.index("<image>")))
    processor = fhf.llava_processor(_tokenizer(), model.config.vision_config)
    inputs = processor(images=_image("house.jpg"), text=PROMPT, return_tensors="pt")
    assert model.model.multi_modal_projector.linear_1.in_features == 32
    model.train()
    model(**inputs).logits.square().mean().backward()
    sva = model.model.vision_tower.tower.merge.sva
    assert all(p.grad is not None for p in sva.parameters())
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)
    ours = dict(model.model.vision_tower.tower.merge.sva.named_parameters())
    for name, p in loaded.model.vision_tower.tower.merge.sva.named_parameters():
        assert torch.equal(p, ours[name]), name


def test_compiled_sva_merge_matches_eager(tower, pixels):
    """torch.compile(fullgraph=True) traces the SVA merge (the window_attention custom op
    included) without a graph break; forward and gradients equal eager (aot_eager: the
    inductor compile of the whole merge runs with -m slow)."""
    with torch.no_grad():
        grids = tower.encode(pixels)
    check_compiled(tower, grids, "aot_eager")


@pytest.mark.slow
def test_compiled_sva_merge_inductor(tower, pixels):
    with torch.no_grad():
        grids = tower.encode(pixels)
    check_compiled(tower, grids, "inductor")


def check_compiled(tower, grids, backend):
    torch._dynamo.reset()
    tower.train()
    try:
        results = []
        for fn in (tower.merge_and_project, torch.compile(tower.merge_and_project, fullgraph=True, backend=backend)):
            tower.zero_grad(set_to_none=True)
            out = fn(grids)
            out.square().mean().backward()
            results.append((out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()
                                           if p.grad is not None}))
    finally:
        tower.zero_grad(set_to_none=True)
        tower.eval()
    (eager, g_eager), (compiled, g_compiled) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert set(g_eager) == set(g_compiled) and any(n.startswith("merge.sva.layers") for n in g_eager)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_compiled[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_extracts_with_sva_from_the_cli(preset, tmp_path):
    """The full presets (ViT-L, SO400M, SAM ViT-B at random weights: run under
    `flock /tmp/fusion-heavy.lock`) with Cambrian's default SVA, from the command line."""
    out = tmp_path / "feats"
    assert cli(["extract", preset, "fusion.combine=sva", "--weights", "random", "--images",
                str(EXAMPLES / "house.jpg"), "--out", str(out), "--no-progress"]) == 0
    cfg = load_config(preset, ["fusion.combine=sva"])
    manifest = json.loads((out / "manifest.json").read_text())
    width = cfg.projector.out_dim if cfg.projector.type != "none" else cfg.fusion.sva.dim
    assert manifest["tokens"] == [cfg.fusion.grid ** 2, width]
    feats = load_file(str(out / next(iter(manifest["shards"]))))
    assert feats["house.jpg"].shape == (cfg.fusion.grid ** 2, width) and torch.isfinite(feats["house.jpg"]).all()


@pytest.mark.distributed
def test_fsdp_two_processes_with_sva():
    """FSDP2 over the SVA tower (its layers are units) on 2 CPU processes: outputs and averaged
    gradients equal the unsharded tower's (the worker of tests/test_distributed.py)."""
    import torch.multiprocessing as mp

    from test_distributed import WORLD, _free_port, _fsdp_worker

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("forks the test process")
    tower = build_tower("tiny", SMALL + ["encoders.dino.freeze=false"], weights="random", seed=0).train()
    pixels = torch.rand(WORLD, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out = tower(pixels)
    grads = []
    for r in range(WORLD):
        tower.zero_grad(set_to_none=True)
        tower(pixels[r:r + 1]).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    ref_grads = {n: sum(g[n] for g in grads) / WORLD for n in grads[0]}
    assert any(n.startswith("merge.sva.layers.1.") for n in ref_grads)
    tower.zero_grad(set_to_none=True)
    tower.eval()
    frozen = {n for n, p in tower.named_parameters() if not p.requires_grad}
    mp.start_processes(_fsdp_worker, args=(_free_port(), tower, pixels, ref_out, ref_grads, frozen),
                       nprocs=WORLD, start_method="fork")
