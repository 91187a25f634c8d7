"""LLaVA-CoT's stage search on a tiny random fusion Llava (fusion.stages, fusion.hf.generate_stages).

The proofs: the vision tower runs once per image for the whole search (any N, any number
of stages, judge calls included), and the search equals the naive loop that calls
transformers' own ``generate`` with the image for every candidate and re-encodes the
image for every judge call (same per-candidate sampling, same judge). The sampler, the
stop criterion and the judges are also checked against hand-computed values.
"""
import contextlib
import csv
import importlib.util
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (LlamaConfig, LlavaForConditionalGeneration, MistralConfig,  # noqa: E402
                          PreTrainedTokenizerFast)

import fusion.hf as fhf  # noqa: E402
from fusion.stage_decoding import (CandidateStreams, StopAtTag, TokenSampler, encode, make_candidate,  # noqa: E402
                                   split_choices)
from fusion.stage_judges import JudgeContext, LogLikelihoodJudge, PairwiseJudge, Verdict  # noqa: E402
from fusion.stage_naive import generate_stages_naive  # noqa: E402
from fusion.stages import LLAVA_COT_STAGES, Candidate, Stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TAGS = [t for s in LLAVA_COT_STAGES for t in (s.open, s.close)]
WORDS = "<unk> <pad> <s> </s> <image> USER ASSISTANT : what is in the picture ? a house cat red 1 2".split() + TAGS
PROMPT = "USER : <image> what is in the picture ? ASSISTANT :"
IMAGE_ID = WORDS.index("<image>")


def _tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the stage tags are words of the vocabulary
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def _llava(text_config_class=LlamaConfig, **text_kwargs):
    """The tiny tower + a 2-layer text model. Its output layer is redrawn with std 0.5 so
    that next-token distributions are far from uniform: candidates differ, some close
    their tag and some do not, and no judge decision is a near-tie."""
    torch.manual_seed(0)
    text = text_config_class(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                             pad_token_id=1, bos_token_id=2, eos_token_id=3, **text_kwargs)
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random", seed=3)
    model = LlavaForConditionalGeneration(fhf.llava_config(vision, text, image_token_id=IMAGE_ID)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model, fhf.llava_processor(_tokenizer(), model.config.vision_config)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (restored after): these models are tiny, and extra threads only
    contend on small, shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llava():
    return _llava()


@pytest.fixture(scope="module")
def image():
    with Image.open(ROOT / "examples" / "images" / "house.jpg") as im:
        return im.convert("RGB")


@contextlib.contextmanager
def tower_calls(model):
    """Records the number of images of every forward of the vision tower."""
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    try:
        yield calls
    finally:
        handle.remove()


SEARCH = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=5)


# ----------------------------------------------------------------------------- decoding pieces


def test_sampler_inverse_cdf_by_hand():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    logits = probs.log()
    full = TokenSampler(temperature=1.0, top_p=1.0)
    # CDF in token-id order: 0.1 0.3 0.6 1.0
    for u, want in [(0.05, 0), (0.15, 1), (0.45, 2), (0.95, 3)]:
        assert full.sample(logits, torch.tensor([u])).item() == want
    # top_p 0.7 keeps 0.4 and 0.3 (mass before 0.3 is 0.4 < 0.7, before 0.2 it is 0.7): CDF 0 0 .3 .7
    nucleus = TokenSampler(temperature=1.0, top_p=0.7)
    assert [nucleus.sample(logits, torch.tensor([u])).item() for u in (0.01, 0.42, 0.43, 0.99)] == [2, 2, 3, 3]
    # temperature 0.5 squares the probabilities: .01 .04 .09 .16 over .30 -> CDF 1/30 5/30 14/30 1
    cold = TokenSampler(temperature=0.5, top_p=1.0)
    assert [cold.sample(logits, torch.tensor([u])).item() for u in (0.03, 0.04, 0.16, 0.17, 0.46, 0.47)] == \
        [0, 1, 1, 2, 2, 3]
    # a banned token is never drawn: its interval is gone (CDF .1 .1 .4 .8 of 0.8)
    assert [full.sample(logits, torch.tensor([u]), banned=[1]).item() for u in (0.12, 0.13, 0.49, 0.51)] == \
        [0, 2, 2, 3]
    # on a fine grid of uniforms every token is drawn in proportion to its probability
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    drawn = full.sample(logits.expand(1000, -1), grid)
    torch.testing.assert_close(torch.bincount(drawn, minlength=4).double() / 1000, probs[0].double(), rtol=0, atol=1e-3)


def test_streams_belong_to_one_candidate():
    together = CandidateStreams(seed=7, stage_index=2, candidates=range(4))
    alone = CandidateStreams(seed=7, stage_index=2, candidates=[2])
    rows = torch.stack([together.draw() for _ in range(5)])  # [step, candidate]
    assert torch.equal(rows[:, 2], torch.cat([alone.draw() for _ in range(5)]))
    other_stage = torch.cat([CandidateStreams(7, 3, [2]).draw() for _ in range(1)])
    assert len(set(rows[0].tolist())) == 4 and other_stage.item() != rows[0, 2].item()


def test_stop_at_tag_when_the_tokenizer_spells_it_in_pieces():
    pieces = "<unk> a b </ SUMMARY > <".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()  # lossless: "</" "SUMMARY" ">" decodes to "</SUMMARY>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = {w: i for i, w in enumerate(pieces)}
    row = lambda *words: [ids[w] for w in words]  # noqa: E731
    stop = StopAtTag(tokenizer, "</SUMMARY>", start=2)
    batch = torch.tensor([row("a", "a", "b", "</", "SUMMARY", ">"),     # closes in three pieces
                          row("a", "a", "b", "</", "SUMMARY", "<"),     # not yet
                          row("</", "SUMMARY", ">", "a", "b", "b")])    # only in the prompt (before start)
    assert stop(batch, None).tolist() == [True, False, False]
    closed = make_candidate(tokenizer, StopAtTag(tokenizer, "</SUMMARY>"), row("a", "b", "</", "SUMMARY", ">"),
                            [-1.0] * 5, eos_ids=[ids["<unk>"]])
    assert (closed.text, closed.closed, closed.ended, closed.logprob, closed.num_sampled) == ("ab", True, "tag", -5, 5)
    ended = make_candidate(tokenizer, stop, row("a", "b", "<unk>"), [-1.0, -2.0, -0.5], eos_ids=[ids["<unk>"]])
    assert (ended.token_ids, ended.closed, ended.ended, ended.mean_logprob) == (row("a", "b"), False, "eos", -3.5 / 3)


def test_split_choices():
    tokenizer = _tokenizer()
    prefix, suffixes = split_choices(tokenizer, "what is a house", [" 1", " 2"])
    assert prefix == encode(tokenizer, "what is a house")
    assert suffixes == [[WORDS.index("1")], [WORDS.index("2")]]
    # the image placeholder is dropped from judge text (it has no image behind it)
    prefix, _ = split_choices(tokenizer, "a <image> house", [" 1", " 2"], banned=[IMAGE_ID])
    assert prefix == [WORDS.index("a"), WORDS.index("house")]
    with pytest.raises(ValueError, match="choices"):
        split_choices(tokenizer, "a", [" 1", " 1"])
    with pytest.raises(ValueError, match="same ids"):
        split_choices(tokenizer, "a", [" zebra", " lion"])  # both <unk>


# ----------------------------------------------------------------------------- judges


def _candidate(text, logprob, n, closed=True):
    return Candidate(text=text, token_ids=[], closed=closed, ended="tag" if closed else "length",
                     logprob=logprob, num_sampled=n)


def test_loglik_judge_by_hand():
    cands = [_candidate("a", -6.0, 3), _candidate("b", -5.0, 1), _candidate("c", -4.0, 4)]  # means -2 -5 -1
    assert LogLikelihoodJudge().choose(cands, None).winner == 2
    assert LogLikelihoodJudge().choose(cands, None).scores == [-2.0, -5.0, -1.0]
    assert LogLikelihoodJudge(length_normalized=False).choose(cands, None).winner == 2
    assert LogLikelihoodJudge(length_normalized=False).choose(cands[:2], None).winner == 1


def test_pairwise_judge_knockout_by_hand():
    """A fake model that prefers the response with the longer text; the champion meets each challenger."""
    prompts = []

    def choice_logprobs(text, choices):
        prompts.append(text)
        first = text.split("Response 1: ")[1].split("\n")[0]
        second = text.split("Response 2: ")[1].split("\n")[0]
        return [float(len(first)), float(len(second))]

    stage = Stage("CAPTION")
    context = JudgeContext(stage=stage, earlier=[(Stage("SUMMARY"), "plan it")], tokenizer=None,
                           choice_logprobs=choice_logprobs)
    cands = [_candidate("xx", 0, 1), _candidate("xxxx", 0, 1), _candidate("x", 0, 1), _candidate("xxx", 0, 1)]
    verdict = PairwiseJudge().choose(cands, context)
    p = lambda a, b: 1 / (1 + math.exp(b - a))  # noqa: E731  P(first) from the two log-probs
    assert verdict.winner == 1
    assert [(a, b) for a, b, _ in verdict.duels] == [(0, 1), (1, 2), (1, 3)]
    assert [d[2] for d in verdict.duels] == pytest.approx([p(2, 4), p(4, 1), p(4, 3)])
    assert verdict.scores == pytest.approx([p(2, 4), (1 - p(2, 4) + p(4, 1) + p(4, 3)) / 3, 1 - p(4, 1),
                                            1 - p(4, 3)])
    assert "CAPTION" in prompts[0] and "thoroughly" in prompts[0]          # the stage's criterion
    assert "<SUMMARY> plan it </SUMMARY>" in prompts[0]                     # earlier stages as context
    assert prompts[0].endswith("The better one is response")
    assert PairwiseJudge().choose(cands[:1], context) == Verdict(winner=0, scores=[1.0])


# ----------------------------------------------------------------------------- the search on a Llava


@pytest.mark.parametrize("n,stages,judge", [(1, ["SUMMARY"], "pairwise"), (3, LLAVA_COT_STAGES, "pairwise"),
                                            (6, ["CAPTION", "CONCLUSION"], "loglik")])
def test_tower_runs_once_whatever_n_and_stages(llava, image, n, stages, judge):
    model, processor = llava
    with tower_calls(model) as calls:
        result = fhf.generate_stages(model, processor, image, PROMPT, stages=stages, n=n, judge=judge, **SEARCH)
    assert calls == [1]  # one forward, one image: judge calls included
    assert [len(r.candidates) for r in result.stages] == [n] * len(stages)
    if judge == "pairwise" and n > 1:  # the judge did run the model (from the cached prefix)
        assert any(r.duels for r in result.stages)


def test_tower_runs_once_for_two_images(llava, image):
    model, processor = llava
    with Image.open(ROOT / "examples" / "images" / "grid.png") as im:
        second = im.convert("RGB")
    prompt = "USER : <image> <image> what is in the picture ? ASSISTANT :"
    with tower_calls(model) as calls:
        fhf.generate_stages(model, processor, [image, second], prompt, stages=["SUMMARY", "CAPTION"], n=3, **SEARCH)
    assert calls == [2]  # both images in one forward, once


@pytest.mark.parametrize("judge", ["pairwise", "loglik"])
def test_cached_search_equals_naive_loop(llava, image, judge):
    model, processor = llava
    n = 4
    with tower_calls(model) as cached_calls:
        cached = fhf.generate_stages(model, processor, image, PROMPT, n=n, judge=judge, **SEARCH)
    with tower_calls(model) as naive_calls:
        naive = generate_stages_naive(model, processor, image, PROMPT, n=n, judge=judge, **SEARCH)
    duels = sum(len(r.duels) for r in naive.stages)
    assert cached_calls == [1] and len(naive_calls) == 4 * n + duels  # a generate per candidate, a forward per duel
    assert cached.token_ids == naive.token_ids and cached.text == naive.text and cached.texts == naive.texts
    for ours, ref in zip(cached.stages, naive.stages):
        assert ours.chosen == ref.chosen
        for a, b in zip(ours.candidates, ref.candidates):
            assert (a.token_ids, a.text, a.closed, a.ended) == (b.token_ids, b.text, b.closed, b.ended)
            assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-4)
            assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-5)  # -inf == -inf too
        assert [(i, j) for i, j, _ in ours.duels] == [(i, j) for i, j, _ in ref.duels]
        assert [p for *_, p in ours.duels] == pytest.approx([p for *_, p in ref.duels], abs=1e-5)
    # the equality means something: candidates differ, the judge does not always keep the first,
    # and both closed and unclosed candidates occur (the unclosed ones lose to the closed ones)
    candidates = [c for r in cached.stages for c in r.candidates]
    assert all(len({tuple(c.token_ids) for c in r.candidates}) > 1 for r in cached.stages)
    assert any(r.chosen != 0 for r in cached.stages)
    assert {c.ended for c in candidates} >= {"tag", "eos"} and any(not c.closed for c in candidates)
    for r in cached.stages:
        if any(c.closed for c in r.candidates):
            assert r.candidates[r.chosen].closed
            assert all(c.score == float("-inf") for c in r.candidates if not c.closed)
    if judge == "pairwise":
        assert duels > 0 and all(abs(p - 0.5) > 1e-3 for r in cached.stages for *_, p in r.duels)


def test_a_stage_that_never_closes_is_scored_not_fatal(llava, image):
    """A closing tag the model cannot produce in 4 tokens: every candidate ends unclosed,
    all are judged, and the winner gets the closing tag appended before the next stage."""
    model, processor = llava
    never = Stage("SUMMARY", close="house house house house house", max_new_tokens=4)
    stages = [never, "CAPTION"]
    with tower_calls(model) as calls:
        result = fhf.generate_stages(model, processor, image, PROMPT, stages=stages, n=4, **SEARCH)
    first = result.stages[0]
    assert calls == [1]
    assert not any(c.closed for c in first.candidates) and len(first.duels) == 3
    assert all(math.isfinite(c.score) for c in first.candidates)
    tokenizer = processor.tokenizer
    winner = first.candidates[first.chosen]
    expected = encode(tokenizer, "<SUMMARY>") + winner.token_ids + encode(tokenizer, never.close) + \
        encode(tokenizer, "<CAPTION>")
    assert result.token_ids[:len(expected)] == expected
    assert result.stages[1].stage.name == "CAPTION" and len(result.stages[1].candidates) == 4


def test_sliding_window_cache_equals_naive(image):
    """A Mistral text model with a 6-token sliding window (shorter than the prompt): the
    DynamicCache built from its config holds sliding-window layers; same result as naive."""
    model, processor = _llava(MistralConfig, sliding_window=6)
    kwargs = dict(stages=["SUMMARY", "CAPTION"], n=3, **SEARCH)
    with tower_calls(model) as calls:
        cached = fhf.generate_stages(model, processor, image, PROMPT, **kwargs)
    naive = generate_stages_naive(model, processor, image, PROMPT, **kwargs)
    assert calls == [1]
    assert cached.token_ids == naive.token_ids
    assert [[c.token_ids for c in r.candidates] for r in cached.stages] == \
        [[c.token_ids for c in r.candidates] for r in naive.stages]


def test_bad_arguments(llava, image):
    model, processor = llava
    search = lambda **kw: fhf.generate_stages(model, processor, image, PROMPT, **kw)  # noqa: E731
    for kwargs, match in [({"n": 0}, "n: got 0"), ({"n": 2.0}, "n: got 2.0"), ({"temperature": 0}, "temperature"),
                          ({"top_p": 1.5}, "top_p: got 1.5"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"judge": "best"}, r"judge: got 'best'.*loglik.*pairwise"), ({"stages": []}, "stages"),
                          ({"stages": "SUMMARY"}, "stages")]:
        with pytest.raises(ValueError, match=match):
            search(**kwargs)
    with pytest.raises(ValueError, match="stage 'X' needs a non-empty closing tag"):
        Stage("X", close="")
    with pytest.raises(TypeError, match="judge: got a object without a choose"):
        search(judge=object())
    with pytest.raises(TypeError, match="stages: got an item of type int"):
        search(stages=[3])
    model.train()
    try:
        with pytest.raises(ValueError, match="model: in training mode"):
            search()
    finally:
        model.eval()


# ----------------------------------------------------------------------------- the example


def _example():
    spec = importlib.util.spec_from_file_location("llava_cot_example", ROOT / "examples" / "llava_cot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_model_dir_loads_a_saved_fusion_llava(tmp_path):
    example = _example()

    def run(*argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            example.main(["--n", "3", "--max-new-tokens", "8", *argv])
        return out.getvalue().splitlines()

    fresh = run("--save-tiny", str(tmp_path))
    loaded = run("--model-dir", str(tmp_path))
    stage_lines = lambda lines: [l for l in lines if l.startswith(("<", "  ", "answer"))]  # noqa: E731,E741
    assert [l for l in fresh if l.startswith("<")] == [s.open for s in LLAVA_COT_STAGES]
    assert sum(l.startswith("  *") for l in fresh) == len(LLAVA_COT_STAGES)  # one chosen candidate per stage
    assert stage_lines(loaded) == stage_lines(fresh)  # save_pretrained -> from_pretrained: the same search
    assert fresh[-1] == loaded[-1] == "vision tower forward calls: 1 (1 image(s) encoded)"


def test_benchmark_counts_and_files(tmp_path):
    """One small run of benchmarks/bench_stage_search.py: it checks the two searches agree
    before timing; here the counts it writes are checked (timings are not asserted)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_stage_search.py"), "--n", "3",
                           "--repeats", "1", "--max-new-tokens", "6", "--threads", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)  # run as a user runs it, never imported
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "bench_stage_search.csv") as f:
        rows = {r["search"]: r for r in csv.DictReader(f)}
    assert rows["cached"]["tower_calls"] == rows["cached"]["images_encoded"] == "1"
    stages = len(LLAVA_COT_STAGES)
    assert int(rows["naive"]["tower_calls"]) == stages * 3 + int(rows["naive"]["duels"])  # stages x n generates + duels
    assert rows["naive"]["duels"] == rows["cached"]["duels"]
    assert "| 3 | cached |" in (tmp_path / "bench_stage_search.md").read_text()
