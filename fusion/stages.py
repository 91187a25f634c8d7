"""Staged reasoning on a Hugging Face Llava: LLaVA-CoT's stage-level beam search, with the
image encoded once.

LLaVA-CoT (Xu et al. 2024) answers in tagged stages (``<SUMMARY>``, ``<CAPTION>``,
``<REASONING>``, ``<CONCLUSION>``) and searches stage by stage: sample N candidates for a
stage, let a judge keep one, go on from it. :func:`generate_stages` runs that search so
that the prompt's prefill, and with it the vision tower, runs once per question::

    import fusion.hf as fhf
    result = fhf.generate_stages(model, processor, image, prompt, n=4)        # judge="pairwise"
    result.texts["CONCLUSION"]; result["CAPTION"].candidates[2].score

How (one ``transformers.DynamicCache``, never re-filled from the prompt):

1. The prefill of image + prompt runs once (``model(**processor(images, prompt), cache=...)``);
   that is the only call that receives ``pixel_values``.
2. Per stage the opening tag (and the previous stage's chosen tokens) extend the context
   cache; the N candidates branch from a copy of it (``copy.deepcopy`` +
   ``batch_repeat_interleave(N)``) and are decoded N wide, one token per row and step,
   until each closes the stage's tag (:class:`~fusion.stage_decoding.StopAtTag`), ends
   the sequence or reaches ``max_new_tokens``. A finished candidate leaves the batch
   (``batch_select_indices``), so the rows left always have one length and need no
   attention mask or padding.
3. The judge scores text continuations from a copy of the image + prompt cache (the
   pairwise judge sees the image and the question without encoding the image again).
4. The winner's tokens (plus the closing tag if it never wrote it) extend the context.

Candidates that never close their tag are kept, marked ``closed=False`` (``ended`` says
why), and lose to any candidate that did close it: only closed candidates are judged
when there are any; the others get the score ``-inf``. If none closed, all are judged.

Supported caches: ``DynamicCache`` built from the model's config (full-attention and
sliding-window layers). The N-wide branch holds N copies of the prefix keys and values
(the image tokens included), like ``generate(num_return_sequences=N)`` does.

Sampling is reproducible per candidate (see :mod:`fusion.stage_decoding`): the cached
search samples exactly the tokens of a naive loop that calls ``generate`` with the image
for every candidate (:mod:`fusion.stage_naive`), whatever N.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from transformers import DynamicCache

from .stage_decoding import (Candidate, CandidateStreams, StopAtTag, TokenSampler, banned_token_ids, check_sampling,
                             decode, encode, eos_token_ids, make_candidate, split_choices,
                             suffix_logprob)
from .stage_judges import JudgeContext, resolve_judge


@dataclass(frozen=True)
class Stage:
    """One stage: ``name``, its tags (default ``<NAME>`` and ``</NAME>``) and an optional
    ``max_new_tokens`` for this stage (else the search's)."""

    name: str
    open: Optional[str] = None
    close: Optional[str] = None
    max_new_tokens: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"stages: a stage name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "open", f"<{self.name}>" if self.open is None else self.open)
        object.__setattr__(self, "close", f"</{self.name}>" if self.close is None else self.close)
        if not isinstance(self.close, str) or not self.close:
            raise ValueError(f"stages: stage {self.name!r} needs a non-empty closing tag, got {self.close!r}")
        if self.max_new_tokens is not None:
            _check_count("max_new_tokens", self.max_new_tokens)


LLAVA_COT_STAGES: Tuple[Stage, ...] = tuple(Stage(n) for n in ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION"))


@dataclass
class StageResult:
    """One stage of a search: every candidate (with its judge score), the index of the
    chosen one and, for the pairwise judge, the duels ``(i, j, p_i)`` in candidate indices."""

    stage: Stage
    candidates: List[Candidate]
    chosen: int
    duels: List[Tuple[int, int, float]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.candidates[self.chosen].text


@dataclass
class StageSearch:
    """The result of :func:`generate_stages`: ``stages`` in order, ``token_ids`` (everything
    after the prompt that the model's context holds: tags and chosen texts) and ``text``
    (those tokens decoded). ``result["CAPTION"]`` is a stage; ``texts`` maps names to texts."""

    stages: List[StageResult]
    token_ids: List[int]
    text: str

    @property
    def texts(self) -> Dict[str, str]:
        return {r.stage.name: r.text for r in self.stages}

    def __getitem__(self, name: str) -> StageResult:
        for r in self.stages:
            if r.stage.name == name:
                return r
        raise KeyError(f"no stage {name!r}; stages: {[r.stage.name for r in self.stages]}")


def _check_count(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: got {value!r}; accepted: an integer >= 1")


def resolve_stages(stages: Sequence[Union[str, Stage]]) -> List[Stage]:
    """Stage names or :class:`Stage` objects -> a non-empty list of stages."""
    if isinstance(stages, (str, Stage)) or not isinstance(stages, Sequence) or not stages:
        raise ValueError(f"stages: got {stages!r}; accepted: a non-empty list of stage names or Stage objects")
    out = []
    for s in stages:
        if not isinstance(s, (str, Stage)):
            raise TypeError(f"stages: got an item of type {type(s).__name__}; accepted: str or fusion.stages.Stage")
        out.append(Stage(s) if isinstance(s, str) else s)
    return out


# ----------------------------------------------------------------------------- the search


def run_search(backend, stages: Sequence[Stage], n: int, judge, max_new_tokens: int) -> StageSearch:
    """The stage loop, shared by the cached search and the naive reference: ``backend``
    samples candidates from its context, scores judge continuations and extends its
    context (see :class:`CachedBackend`)."""
    results: List[StageResult] = []
    earlier: List[Tuple[Stage, str]] = []
    tokenizer = backend.tokenizer
    for index, stage in enumerate(stages):
        backend.extend(encode(tokenizer, stage.open))
        candidates = backend.sample(index, stage, n, stage.max_new_tokens or max_new_tokens)
        eligible = [i for i, c in enumerate(candidates) if c.closed] or list(range(len(candidates)))
        context = JudgeContext(stage=stage, earlier=list(earlier), tokenizer=tokenizer,
                               choice_logprobs=backend.choice_logprobs)
        verdict = judge.choose([candidates[i] for i in eligible], context)
        if not 0 <= verdict.winner < len(eligible) or len(verdict.scores) != len(eligible):
            raise ValueError(f"judge: {type(judge).__name__}.choose returned winner {verdict.winner} and "
                             f"{len(verdict.scores)} scores for {len(eligible)} candidates")
        for c in candidates:
            c.score = float("-inf")
        for i, score in zip(eligible, verdict.scores):
            candidates[i].score = float(score)
        chosen = eligible[verdict.winner]
        winner = candidates[chosen]
        backend.extend(winner.token_ids + ([] if winner.closed else encode(tokenizer, stage.close)))
        duels = [(eligible[a], eligible[b], p) for a, b, p in verdict.duels]
        results.append(StageResult(stage=stage, candidates=candidates, chosen=chosen, duels=duels))
        earlier.append((stage, winner.text))
    return StageSearch(stages=results, token_ids=list(backend.context_ids),
                       text=decode(tokenizer, backend.context_ids))


def cache_keyword(model) -> str:
    """The forward argument that takes the key/value cache: ``cache`` (newer transformers
    5.x) or ``past_key_values`` (5.0 onwards; deprecated where ``cache`` exists)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CachedBackend:
    """The model behind the search, on key/value caches: ``prompt_cache`` (image + prompt,
    filled once), ``context`` (prompt + every stage so far; tokens given to :meth:`extend`
    wait in ``pending`` until the next forward needs them)."""

    def __init__(self, model, processor, inputs: Dict[str, torch.Tensor], sampler: TokenSampler, seed: int):
        self.model, self.tokenizer = model, processor.tokenizer
        self.sampler, self.seed = sampler, seed
        self.keyword = cache_keyword(model)
        self.eos = eos_token_ids(model, self.tokenizer)
        self.banned = banned_token_ids(model)
        self.prompt_cache = DynamicCache(config=model.config)
        self.prompt_logits = self._forward(self.prompt_cache, inputs)[:, -1]  # [1, V]
        self.context = self.branch(self.prompt_cache, 1)
        self.context_logits = self.prompt_logits
        self.context_ids: List[int] = []
        self.pending: List[int] = []

    def _forward(self, cache, inputs: Dict[str, torch.Tensor], keep: int = 1) -> torch.Tensor:
        """One forward on ``cache`` (updated in place) -> logits of the last ``keep`` positions ``[R, keep, V]``."""
        out = self.model(**inputs, **{self.keyword: cache}, use_cache=True, logits_to_keep=keep)
        return out.logits.float()

    def run(self, cache, ids: Sequence[int], keep: int = 1) -> torch.Tensor:
        """Feed ``ids`` (one row) on ``cache`` -> logits ``[1, keep, V]``."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        return self._forward(cache, {"input_ids": input_ids}, keep)

    @staticmethod
    def branch(cache, n: int):
        """An independent copy of ``cache`` with every row repeated ``n`` times."""
        copied = copy.deepcopy(cache)
        if n > 1:
            copied.batch_repeat_interleave(n)
        return copied

    def extend(self, ids: Sequence[int]) -> None:
        self.context_ids.extend(ids)
        self.pending.extend(ids)

    def _flush(self) -> torch.Tensor:
        if self.pending:
            self.context_logits = self.run(self.context, self.pending)[:, -1]
            self.pending = []
        return self.context_logits

    def sample(self, stage_index: int, stage: Stage, n: int, max_new_tokens: int) -> List[Candidate]:
        """``n`` candidates decoded in one batch from a copy of the context cache; a candidate
        that finishes leaves the batch (its cache row is dropped)."""
        logits = self._flush().expand(n, -1)  # [rows, V], row r is candidate rows[r]
        cache = self.branch(self.context, n)
        streams = CandidateStreams(self.seed, stage_index, range(n))
        stop = StopAtTag(self.tokenizer, stage.close)
        sampled: List[List[int]] = [[] for _ in range(n)]
        logprobs: List[List[float]] = [[] for _ in range(n)]
        rows = list(range(n))
        for step in range(max_new_tokens):
            tokens = self.sampler.sample(logits, streams.draw(rows), self.banned)  # [rows]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0].tolist()
            for r, i in enumerate(rows):
                sampled[i].append(int(tokens[r]))
                logprobs[i].append(logp[r])
            going = [r for r, i in enumerate(rows) if sampled[i][-1] not in self.eos and not stop.closes(sampled[i])]
            if not going or step == max_new_tokens - 1:
                break
            if len(going) < len(rows):
                cache.batch_select_indices(torch.tensor(going, device=tokens.device))
                rows, tokens = [rows[r] for r in going], tokens[going]
            logits = self._forward(cache, {"input_ids": tokens[:, None]})[:, -1]
        return [make_candidate(self.tokenizer, stop, sampled[i], logprobs[i], self.eos) for i in range(n)]

    def choice_logprobs(self, text: str, choices: Sequence[str]) -> List[float]:
        """Summed log-probability of each choice after image + prompt + ``text``, from a copy of the prompt cache."""
        prefix, suffixes = split_choices(self.tokenizer, text, choices, self.banned)
        cache = self.branch(self.prompt_cache, 1)
        last = self.run(cache, prefix)[0, -1] if prefix else self.prompt_logits[0]
        first = torch.log_softmax(last, dim=-1)
        out = []
        for suffix in suffixes:
            total = float(first[suffix[0]])
            if len(suffix) > 1:
                rest = self.run(self.branch(cache, 1), suffix[:-1], keep=len(suffix) - 1)[0]
                total += suffix_logprob(rest, suffix[1:])
            out.append(total)
        return out


def check_search_args(model, n, max_new_tokens, temperature, top_p) -> None:
    """The shared argument checks of :func:`generate_stages` and the naive reference."""
    _check_count("n", n)
    _check_count("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_p)
    if getattr(model, "training", False):
        raise ValueError("model: in training mode (dropout would make candidates depend on the global RNG); "
                         "call model.eval() first")


def generate_stages(model, processor, images, prompt: str, stages: Sequence[Union[str, Stage]] = LLAVA_COT_STAGES,
                    n: int = 4, judge: Union[str, object] = "pairwise", *, max_new_tokens: int = 256,
                    temperature: float = 0.6, top_p: float = 0.9, seed: int = 0) -> StageSearch:
    """LLaVA-CoT's stage-level beam search with one prefill of image + prompt (see the module docstring).

    - ``model``: a ``LlavaForConditionalGeneration`` (or any model whose forward takes the
      processor's outputs and a cache), in eval mode; ``processor``: its processor (e.g.
      :func:`fusion.hf.llava_processor`); ``images``: what the processor takes (a PIL
      image or a list); ``prompt``: the text with the image token(s), ending where the
      answer starts (e.g. after ``"ASSISTANT:"``).
    - ``stages``: names (tags ``<NAME>``/``</NAME>``) or :class:`Stage` objects; each
      stage's opening tag is written into the context, generation stops at its closing tag.
    - ``n``: candidates per stage, decoded in one batch. ``judge``: ``"pairwise"``
      (LLaVA-CoT's comparison prompt), ``"loglik"`` (mean token log-probability) or an
      object with ``choose(candidates, context)`` (see :mod:`fusion.stage_judges`).
    - ``max_new_tokens`` per stage (a :class:`Stage` may set its own), ``temperature``,
      ``top_p``: sampling (LLaVA-CoT uses 0.6 and 0.9); ``seed``: candidate ``i`` of stage
      ``s`` samples from its own stream seeded by ``(seed, s, i)``.

    Returns a :class:`StageSearch`: per stage every candidate with its score and the
    chosen one; ``texts`` maps stage names to the chosen texts.
    """
    check_search_args(model, n, max_new_tokens, temperature, top_p)
    stages = resolve_stages(stages)
    judge = resolve_judge(judge)
    inputs = processor(images=images, text=prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"prompt: one prompt per search, got a batch of {inputs['input_ids'].shape[0]}")
    with torch.no_grad():
        backend = CachedBackend(model, processor, dict(inputs), TokenSampler(temperature, top_p), seed)
        return run_search(backend, stages, n, judge, max_new_tokens)
