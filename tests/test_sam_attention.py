"""SAM's attention without the score matrix (fusion/encoders/sam_attention.py) against
segment_anything itself.

The whole-encoder parity runs segment_anything's own ``ImageEncoderViT`` forward in a
separate Python process that imports torch and segment_anything only (it asserts that no
``fusion`` module is loaded), on the adapter's weights written to a file, and compares
its output with the adapter's (``RelPosSdpaAttention`` swapped in) at <= 1e-5 relative
in fp32: windowed and global blocks, windows that need padding, several input sizes,
and chunk budgets small enough that every global block runs in many chunks.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, add_decomposed_rel_pos

from fusion.config import EncoderConfig
from fusion.encoders.registry import get_encoder_class
from fusion.encoders.sam_attention import (RelPosSdpaAttention, decomposed_rel_pos, install,
                                           rel_pos_attention)

# (image_size, arch): window 3 on a 6x6 grid (no padding), window 4 on 7x7 and 10x10 grids
# (padded windows), two global blocks, a non-square head count, vit_b's 12 heads of 64.
CASES = [
    (96, dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=3, out_chans=32)),
    (112, dict(embed_dim=48, depth=3, num_heads=3, global_attn_indexes=[0, 2], window_size=4, out_chans=16)),
    (160, dict(embed_dim=96, depth=2, num_heads=12, global_attn_indexes=[1], window_size=4, out_chans=24)),
]
# Chunk budgets: the default (one SDPA call per block here) and tiny ones (one query row,
# then a few rows of one head, per call).
BUDGETS = [None, 1, 200]

# Runs in a fresh interpreter: segment_anything's forward, nothing of fusion.
UPSTREAM_SCRIPT = textwrap.dedent("""
    import json, sys
    from functools import partial
    import torch
    from safetensors.torch import load_file, save_file
    from segment_anything.modeling import ImageEncoderViT
    torch.set_num_threads(1)
    cases = json.load(open(sys.argv[1]))
    outputs = {}
    for i, case in enumerate(cases):
        kwargs = dict(case["kwargs"], norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
        model = ImageEncoderViT(**kwargs).eval()
        model.load_state_dict(load_file(case["weights"]), strict=True)
        with torch.no_grad():
            outputs[str(i)] = model(load_file(case["weights"].replace(".weights", ".input"))["x"])
    assert not [m for m in sys.modules if m == "fusion" or m.startswith("fusion.")], "fusion was imported"
    save_file(outputs, sys.argv[2])
""")


def sam_encoder(image_size, arch, seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(name="sam", type="sam", model="vit_b", image_size=image_size, arch=arch, pretrained="random")
    return get_encoder_class("sam")(cfg, True)


def relative_error(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def test_adapter_blocks_run_the_swapped_attention_and_the_upstream_class_is_untouched():
    forward_before = Attention.forward
    enc = sam_encoder(*CASES[1])
    assert all(isinstance(b.attn, RelPosSdpaAttention) for b in enc.model.blocks)
    assert Attention.forward is forward_before and sam_image_encoder.Attention is Attention
    fresh = ImageEncoderViT(img_size=112, **{k: v for k, v in CASES[1][1].items()}, use_rel_pos=True)
    assert all(type(b.attn) is Attention for b in fresh.blocks)  # other instances keep upstream's
    # same parameter names, shapes and order as the upstream module (checkpoints unchanged)
    assert [(k, v.shape) for k, v in enc.model.state_dict().items()] == \
           [(k, v.shape) for k, v in fresh.state_dict().items()]


def test_install_adopts_parameters_and_refuses_other_modules():
    model = ImageEncoderViT(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2,
                            global_attn_indexes=(1,), use_rel_pos=True)
    before = {k: v for k, v in model.named_parameters()}
    assert install(model) == 2
    assert install(model) == 0  # already swapped
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    with pytest.raises(TypeError, match="encoder: expected segment_anything's ImageEncoderViT"):
        install(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="upstream: expected segment_anything's"):
        RelPosSdpaAttention(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("hw", [(5, 5), (4, 7), (14, 14)])
@pytest.mark.parametrize("budget", [1, 37, 10_000, None])
def test_rel_pos_attention_equals_upstream_score_matrix_path(hw, budget):
    """Against segment_anything's own score-matrix computation (scores, add_decomposed_rel_pos,
    softmax, @ v), also for non-square grids and budgets that split rows and heads."""
    H, W = hw
    BH, C = 6, 8
    q, k, v = (torch.randn(BH, H * W, C) for _ in range(3))
    rel_pos_h, rel_pos_w = torch.randn(2 * H - 1, C), torch.randn(2 * W - 1, C)
    scale = C ** -0.5
    attn = add_decomposed_rel_pos((q * scale) @ k.transpose(-2, -1), q, rel_pos_h, rel_pos_w, (H, W), (H, W))
    want = attn.softmax(dim=-1) @ v
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, (H, W), (H, W))
    got = rel_pos_attention(q, k, v, rel_h, rel_w, scale, **({} if budget is None else {"budget": budget}))
    assert relative_error(got, want) <= 1e-6


def test_module_matches_upstream_attention_without_rel_pos_and_in_bf16():
    torch.manual_seed(1)
    plain = Attention(32, num_heads=4, use_rel_pos=False).eval()
    x = torch.randn(2, 5, 6, 32)
    with torch.no_grad():
        want = plain(x)
        assert relative_error(RelPosSdpaAttention(plain)(x), want) <= 1e-6
    rel = Attention(32, num_heads=4, use_rel_pos=True, rel_pos_zero_init=False, input_size=(5, 6)).eval()
    torch.nn.init.normal_(rel.rel_pos_h)
    torch.nn.init.normal_(rel.rel_pos_w)
    with torch.no_grad():
        want = rel(x)
        swapped = RelPosSdpaAttention(rel)
        assert relative_error(swapped(x), want) <= 1e-6
        rel.to(torch.bfloat16)  # the swap shares the parameters: both are bf16 now
        got, want = swapped(x.bfloat16()), rel(x.bfloat16())
    assert got.dtype == torch.bfloat16 and relative_error(got, want) <= 2e-2


def test_whole_encoder_matches_segment_anything_forward_in_a_clean_process(tmp_path):
    cases, ours = [], []
    for i, (size, arch) in enumerate(CASES):
        enc = sam_encoder(size, arch, seed=i)
        for attn in (b.attn for b in enc.model.blocks):  # random rel-pos tables (upstream inits zeros)
            torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
            torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
        x = torch.randn(2, 3, size, size)
        weights = tmp_path / f"case{i}.weights.safetensors"
        save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(weights))
        save_file({"x": x}, str(weights).replace(".weights", ".input"))
        kwargs = {k: v for k, v in enc.cfg.arch.items()}
        cases.append({"weights": str(weights), "kwargs": dict(kwargs, img_size=size, patch_size=16, mlp_ratio=4,
                                                              qkv_bias=True, use_rel_pos=True)})
        with torch.no_grad():
            per_budget = []
            for budget in BUDGETS:
                for attn in (b.attn for b in enc.model.blocks):
                    attn.budget = attn.budget if budget is None else budget
                per_budget.append(enc(x).permute(0, 3, 1, 2))  # adapter: [B, h, w, C] -> upstream's NCHW
        ours.append(per_budget)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM_SCRIPT)
    out = tmp_path / "upstream.safetensors"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cases.json"), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    upstream = load_file(str(out))
    for i, per_budget in enumerate(ours):
        for budget, got in zip(BUDGETS, per_budget):
            err = relative_error(got, upstream[str(i)])
            assert err <= 1e-5, f"case {CASES[i]} budget {budget}: relative error {err:.3g}"
