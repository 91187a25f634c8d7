"""torch.compile(fullgraph=True): the whole tower, and a Hugging Face Llava holding it, trace
into one graph (no graph break, so no host sync for the finite-pixel check) and match eager.

``fullgraph=True`` makes any graph break an error. The default suite runs Dynamo's capture
with the ``eager`` backend (the captured graph runs as is: seconds on a CPU); the same
checks with Inductor, which generates and compiles C++ (minutes on a small CPU), run with
``-m slow``.
"""
import pytest
import torch

from fusion import build_tower
from fusion.tower import NONFINITE_PIXELS

BACKENDS = ["eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def tower():
    return build_tower("tiny", weights="random", seed=0).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))


def recording_backend(graphs):
    """A Dynamo backend that keeps each captured FX graph and runs it as is."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_tower_is_one_graph_with_the_pixel_check_inside(tower, pixels):
    """The captured graph holds the finite check as an assertion (no data-dependent branch)."""
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(tower, fullgraph=True, backend=recording_backend(graphs))
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels), tower(pixels), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch._assert_async in targets and torch.isfinite in targets
    bad = pixels.clone()
    bad[0, 0, 0, 0] = float("inf")
    with torch.no_grad(), pytest.raises(RuntimeError, match=NONFINITE_PIXELS):
        compiled(bad)


@pytest.mark.slow
def test_inductor_tower_matches_eager_and_still_refuses_nan(tower, pixels):
    torch._dynamo.reset()
    compiled = torch.compile(tower, fullgraph=True)
    bad = pixels.clone()
    bad[1, 2, 3, 4] = float("nan")
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels), tower(pixels), rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="pixel_values: contains NaN or infinite values"):
            compiled(bad)
        with pytest.raises(ValueError, match=NONFINITE_PIXELS):  # eager: the ValueError of the bad-input table
            tower(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_llava_with_the_tower_compiles_in_one_graph(backend):
    pytest.importorskip("transformers")
    from test_hf import PROMPT, WORDS, _image, _text_config, _tokenizer
    from transformers import LlavaForConditionalGeneration

    import fusion.hf as fhf

    torch.manual_seed(0)
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random", seed=3)
    config = fhf.llava_config(vision, _text_config(), image_token_id=WORDS.index("<image>"))
    model = LlavaForConditionalGeneration(config).eval()
    processor = fhf.llava_processor(_tokenizer(), model.config.vision_config)
    inputs = processor(images=[_image("house.jpg"), _image("grid.png")], text=[PROMPT, PROMPT],
                       return_tensors="pt")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        eager = model(**inputs).logits
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
