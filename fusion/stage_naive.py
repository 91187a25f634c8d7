"""The naive stage search: the same search as :func:`fusion.stages.generate_stages`, with
every model call starting from scratch, image included.

Each candidate is one ``model.generate(input_ids=prompt + context, pixel_values=...)``
(batch 1, transformers' own decoding loop and cache), and each judge score is one plain
forward of image + prompt + judge text. So the vision tower runs ``stages x (n + judge
calls)`` times, as in LLaVA-CoT's own inference script. The sampling is the same
(:class:`~fusion.stage_decoding.TokenSampler` on candidate ``i``'s own stream, forced
through a logits processor that leaves ``generate`` only the sampled token), the stop
is the same :class:`~fusion.stage_decoding.StopAtTag`, the judge is the same object.

It exists as the reference the cached search is tested against (equal outputs, one tower
call instead of many) and as the baseline of ``benchmarks/bench_stage_search.py``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from .stage_decoding import (Candidate, CandidateStreams, StopAtTag, TokenSampler, banned_token_ids, eos_token_ids,
                             make_candidate, pad_token_id, split_choices, suffix_logprob)
from .stage_judges import resolve_judge
from .stages import LLAVA_COT_STAGES, Stage, StageSearch, check_search_args, resolve_stages, run_search


class ForcedSample(LogitsProcessor):
    """Samples this step's token with ``sampler`` from ``stream`` and leaves ``generate``
    only that token (every other score ``-inf``), so greedy decoding takes it. Records the
    token's log-probability under the unmodified scores in ``logprobs``."""

    def __init__(self, sampler: TokenSampler, stream: CandidateStreams, banned: Sequence[int] = ()):
        self.sampler, self.stream, self.banned = sampler, stream, banned
        self.logprobs: List[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.sampler.sample(scores, self.stream.draw(), self.banned)  # [1]
        self.logprobs.append(float(torch.log_softmax(scores.float(), dim=-1)[0, token[0]]))
        forced = torch.full_like(scores, float("-inf"))
        forced[0, token[0]] = 0.0
        return forced


class NaiveBackend:
    """The backend interface of :func:`fusion.stages.run_search`, recomputing everything."""

    def __init__(self, model, processor, inputs: Dict[str, torch.Tensor], sampler: TokenSampler, seed: int):
        self.model, self.tokenizer = model, processor.tokenizer
        self.inputs, self.sampler, self.seed = inputs, sampler, seed
        self.prompt_ids: List[int] = inputs["input_ids"][0].tolist()
        self.eos = eos_token_ids(model, self.tokenizer)
        self.pad = pad_token_id(model, self.tokenizer, self.eos)
        self.banned = banned_token_ids(model)
        self.context_ids: List[int] = []

    def _with_ids(self, ids: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The processor's inputs (pixels and all) with ``input_ids`` replaced by ``ids``."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        return {**self.inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def extend(self, ids: Sequence[int]) -> None:
        self.context_ids.extend(ids)

    def sample(self, stage_index: int, stage: Stage, n: int, max_new_tokens: int) -> List[Candidate]:
        start = len(self.prompt_ids) + len(self.context_ids)
        out = []
        for i in range(n):
            forced = ForcedSample(self.sampler, CandidateStreams(self.seed, stage_index, [i]), self.banned)
            stop = StopAtTag(self.tokenizer, stage.close, start=start)
            generated = self.model.generate(
                **self._with_ids(self.prompt_ids + self.context_ids), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, logits_processor=LogitsProcessorList([forced]),
                stopping_criteria=StoppingCriteriaList([stop]), eos_token_id=self.eos or None,
                pad_token_id=self.pad)
            sampled = generated[0, start:].tolist()
            out.append(make_candidate(self.tokenizer, StopAtTag(self.tokenizer, stage.close), sampled,
                                      forced.logprobs, self.eos))
        return out

    def choice_logprobs(self, text: str, choices: Sequence[str]) -> List[float]:
        """One forward of image + prompt + judge text (+ the choice, when it is longer than a token) per choice."""
        prefix, suffixes = split_choices(self.tokenizer, text, choices, self.banned)
        logits_for: Dict[tuple, torch.Tensor] = {}
        out = []
        for suffix in suffixes:
            ids = tuple(self.prompt_ids + prefix + suffix[:-1])
            if ids not in logits_for:  # single-token choices share one forward
                logits_for[ids] = self.model(**self._with_ids(ids)).logits[0].float()
            out.append(suffix_logprob(logits_for[ids][-len(suffix):], suffix))
        return out


def generate_stages_naive(model, processor, images, prompt: str,
                          stages: Sequence[Union[str, Stage]] = LLAVA_COT_STAGES, n: int = 4,
                          judge: Union[str, object] = "pairwise", *, max_new_tokens: int = 256,
                          temperature: float = 0.6, top_p: float = 0.9, seed: int = 0) -> StageSearch:
    """:func:`fusion.stages.generate_stages` without any reuse (same arguments, same result)."""
    check_search_args(model, n, max_new_tokens, temperature, top_p)
    stages = resolve_stages(stages)
    judge = resolve_judge(judge)
    inputs = processor(images=images, text=prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        backend = NaiveBackend(model, processor, dict(inputs), TokenSampler(temperature, top_p), seed)
        return run_search(backend, stages, n, judge, max_new_tokens)
