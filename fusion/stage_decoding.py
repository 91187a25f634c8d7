"""Decoding pieces shared by the cached stage search and its naive reference.

- :class:`CandidateStreams`: candidate ``i`` of stage ``s`` draws its random numbers from
  its own generator, seeded from ``(seed, s, i)``. The token it samples at step ``t``
  therefore depends only on its own logits and its own stream: not on how many
  candidates share the batch, on their order, or on the global RNG. A search that runs
  N candidates in one batch from a cached prefix and a loop that generates them one at
  a time from scratch sample the same tokens.
- :class:`TokenSampler`: temperature + top-p sampling by inverse CDF, one uniform per
  row and step (the vocabulary in token-id order, so no sort order decides the token).
- :class:`StopAtTag`: a ``transformers.StoppingCriteria`` that stops a row once its
  generated text contains the stage's closing tag, however the tokenizer splits it.
- :func:`make_candidate`: sampled tokens -> :class:`Candidate` (text between the tags,
  whether the tag was closed, log-likelihood).
- :func:`split_choices`: tokenises ``text + choice`` for several choices and splits off
  the shared prefix, so each choice is scored with the tokens the tokenizer really uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from transformers import StoppingCriteria


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError naming ``temperature`` / ``top_p`` unless 0 < temperature and 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature: got {temperature!r}; accepted: a finite number > 0 (n=1 and a low "
                         f"temperature come closest to greedy decoding)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: got {top_p!r}; accepted: a number in (0, 1] (1 keeps the whole vocabulary)")


def candidate_seed(seed: int, stage_index: int, candidate: int) -> int:
    """A 63-bit seed for candidate ``candidate`` of stage ``stage_index`` (numpy's SeedSequence
    mixes the three numbers, so neighbouring candidates get unrelated streams)."""
    state = np.random.SeedSequence([int(seed), int(stage_index), int(candidate)]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


class CandidateStreams:
    """One CPU ``torch.Generator`` per candidate of one stage; :meth:`draw` gives each one uniform."""

    def __init__(self, seed: int, stage_index: int, candidates: Sequence[int]):
        self.generators = {}
        for i in candidates:
            g = torch.Generator(device="cpu")
            g.manual_seed(candidate_seed(seed, stage_index, i))
            self.generators[i] = g

    def draw(self, candidates: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``[R]`` float64 uniforms in [0, 1), the next one from each candidate's own stream
        (``candidates``: those still decoding; default all, in the order given at construction)."""
        chosen = self.generators if candidates is None else candidates
        return torch.cat([torch.rand(1, generator=self.generators[i], dtype=torch.float64) for i in chosen])


class TokenSampler:
    """Temperature + top-p (nucleus) sampling by inverse CDF.

    ``probs = softmax(logits / temperature)`` in float64; top-p keeps the most probable
    tokens whose cumulative probability reaches ``top_p`` (the token that crosses it
    included); the kept mass is laid out in token-id order and the token whose CDF
    interval holds ``u * total`` is taken. A difference in the logits at the level of
    float rounding changes the token only when ``u`` falls within that rounding of an
    interval boundary.
    """

    def __init__(self, temperature: float = 0.6, top_p: float = 0.9):
        check_sampling(temperature, top_p)
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [R, V]`` -> the kept, unnormalised probabilities ``[R, V]`` float64."""
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p >= 1.0:
            return probs
        ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep_sorted = (ordered.cumsum(-1) - ordered) < self.top_p  # mass before each token < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return probs * keep

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor, banned: Sequence[int] = ()) -> torch.Tensor:
        """``logits [R, V]``, ``uniforms [R]`` in [0, 1) -> token ids ``[R]`` (int64). ``banned``
        ids are never sampled (a Llava's image placeholder token: it has no image behind it)."""
        if banned:
            logits = logits.clone()
            logits[:, list(banned)] = float("-inf")
        cdf = self.probs(logits).cumsum(-1)  # [R, V]
        target = uniforms.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1]
        token = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
        return token.clamp_(max=logits.shape[-1] - 1)


class StopAtTag(StoppingCriteria):
    """Stops each row once the text generated after position ``start`` contains ``tag``.

    The check decodes only the last ``len(tag)`` generated tokens of a row (every token
    that overlaps the tag holds at least one of its characters, and the tag is looked
    for at every step), so it costs the same at step 10 and at step 1000. Works whether
    the tokenizer has the tag as one token or spells it in pieces.
    """

    def __init__(self, tokenizer, tag: str, start: int = 0):
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"close: the closing tag must be a non-empty string, got {tag!r}")
        self.tokenizer = tokenizer
        self.tag = tag
        self.start = int(start)

    def closes(self, generated: Sequence[int]) -> bool:
        """True if the generated ids (after ``start``) end with text that contains the tag."""
        tail = list(generated)[-len(self.tag):]
        return self.tag in decode(self.tokenizer, tail)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        """``input_ids [B, L]`` -> ``[B]`` bool: the row's generated text contains the tag."""
        generated = input_ids[:, self.start:].tolist()
        return torch.tensor([self.closes(row) for row in generated], dtype=torch.bool, device=input_ids.device)


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The tokenizer's text for ``ids``, special tokens kept (stage tags may be special tokens)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` without BOS/EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Candidate:
    """One sampled continuation of a stage.

    - ``text``: the stage text between the opening and the closing tag, stripped.
    - ``token_ids``: the tokens the model sampled, up to the one that completed the closing
      tag; an end-of-sequence token is not included.
    - ``closed``: the closing tag was generated. ``ended``: ``"tag"``, ``"eos"`` (the model
      ended the sequence before closing the tag) or ``"length"`` (``max_new_tokens`` ran out).
    - ``logprob``: sum of ``log p(token)`` over every sampled token (EOS included) under the
      model's own distribution (temperature 1, no top-p); ``num_sampled`` tokens.
    - ``score``: the judge's score (see the judges); ``-inf`` for a candidate that did not
      close its tag while another candidate did (it is never judged).
    """

    text: str
    token_ids: List[int]
    closed: bool
    ended: str
    logprob: float
    num_sampled: int
    score: float = float("nan")

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.num_sampled, 1)


def make_candidate(tokenizer, stop: StopAtTag, sampled: Sequence[int], logprobs: Sequence[float],
                   eos_ids: Sequence[int]) -> Candidate:
    """A :class:`Candidate` from the sampled ids and their log-probabilities (same length)."""
    sampled = [int(t) for t in sampled]
    if len(sampled) != len(logprobs):
        raise ValueError(f"logprobs: {len(logprobs)} values for {len(sampled)} sampled tokens")
    ended = "length"
    tokens = sampled
    if sampled and sampled[-1] in set(eos_ids):
        ended, tokens = "eos", sampled[:-1]
    elif sampled and stop.closes(sampled):
        ended = "tag"
    text = decode(tokenizer, tokens)
    if ended == "tag":
        text = text[:text.find(stop.tag)] if stop.tag in text else text
    return Candidate(text=text.strip(), token_ids=tokens, closed=ended == "tag", ended=ended,
                     logprob=float(sum(logprobs)), num_sampled=len(sampled))


def split_choices(tokenizer, text: str, choices: Sequence[str],
                  banned: Sequence[int] = ()) -> Tuple[List[int], List[List[int]]]:
    """Token ids of ``text + choice`` for each choice, split into the shared prefix and each
    choice's own suffix (at least one token each). ``banned`` ids (the image placeholder,
    which candidate text could spell) are dropped.

    Tokenising ``text + choice`` as one string gives each choice the tokens it really has
    after that text (a leading space may merge into it, or stay on the prefix side).
    """
    if len(choices) < 2 or len(set(choices)) != len(choices):
        raise ValueError(f"choices: need two or more distinct strings, got {list(choices)!r}")
    full = [[t for t in encode(tokenizer, text + c) if t not in banned] for c in choices]
    if len({tuple(f) for f in full}) != len(full):
        raise ValueError(f"choices: {list(choices)!r} tokenise to the same ids after the judge text; "
                         f"use choices the tokenizer tells apart")
    common = 0
    shortest = min(len(f) for f in full)
    while common < shortest - 1 and all(f[common] == full[0][common] for f in full):
        common += 1
    return full[0][:common], [f[common:] for f in full]


def suffix_logprob(logits: torch.Tensor, suffix: Sequence[int]) -> float:
    """``logits [len(suffix), V]`` (the rows that predict each suffix token) -> sum of log p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.as_tensor(list(suffix), device=logits.device)[:, None]
    return float(logp.gather(-1, index).sum())


def eos_token_ids(model, tokenizer) -> List[int]:
    """The ids that end a sequence: the model's generation config, else the tokenizer's."""
    eos: Optional[object] = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def banned_token_ids(model) -> List[int]:
    """Ids the search never samples nor feeds as text: a Llava's image placeholder token."""
    config = getattr(model, "config", None)
    image = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    return [] if image is None else [int(image)]


def pad_token_id(model, tokenizer, eos: Sequence[int]) -> int:
    """The padding id the naive reference hands to ``generate`` (which wants one; batch 1 never pads)."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad)
