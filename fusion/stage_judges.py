"""Judges for the stage search: which of a stage's candidates the search goes on from.

A judge has one method, ``choose(candidates, context) -> Verdict``. ``context`` says
which stage it is, which texts earlier stages chose, and gives the judge the model:
``context.choice_logprobs(text, choices)`` is the log-probability of each ``choice``
string as the continuation of *image + prompt + text*. In the cached search that runs
from the key/value cache of the image + prompt prefill (the image is never encoded
again); in the naive reference it re-encodes everything.

Two judges are built in (``JUDGES``):

- ``"pairwise"`` (:class:`PairwiseJudge`, the default): LLaVA-CoT's comparison. The model
  is shown two candidates for the stage, with what a good text for that stage does, and
  asked which is better; the first candidate is the champion and meets every other
  candidate in turn, the preferred one of each duel staying on. The verdict is read from
  the model's next-token probabilities of the two answers (``" 1"``, ``" 2"``) after the
  judge prompt, not from sampled text: one forward per duel, deterministic, and graded
  (the probability of the preferred answer).
- ``"loglik"`` (:class:`LogLikelihoodJudge`): no extra model call; a candidate's score
  is the mean log-probability the model gave its own tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .stage_decoding import Candidate

# What a better text does at each LLaVA-CoT stage, after the paper's description of its
# stage-level judge (Xu et al. 2024), in our words. Stages not listed get _ANY_STAGE.
STAGE_CRITERIA: Dict[str, str] = {
    "SUMMARY": "A better summary sets out the plan for answering the question: the overall approach, "
               "without working through the reasoning or writing formulas yet.",
    "CAPTION": "A better caption describes what in the image matters for the question, thoroughly and "
               "correctly, with concrete details rather than general remarks.",
    "REASONING": "Better reasoning goes step by step from the question and the image description to the "
                 "answer, and makes no logical or arithmetic mistakes.",
    "CONCLUSION": "A better conclusion gives a clear final answer that follows from the reasoning before it, "
                  "and does not refuse to answer.",
}
_ANY_STAGE = "A better text does what the {stage} stage of the answer asks for, with fewer mistakes."

# The judge prompt. It follows image + prompt (the question) in the model's context, so
# the judge sees both through the cached prefix. It ends where the answer's number goes;
# PAIRWISE_CHOICES are the two continuations compared.
PAIRWISE_TEMPLATE = (
    "\nNow act as a judge. Below are two candidate texts for the {stage} stage of the answer to the "
    "question about the image above. {criterion}\n"
    "{earlier}"
    "Response 1: {first}\n"
    "Response 2: {second}\n"
    "Which response is better? Answer with its number only.\n"
    "The better one is response"
)
PAIRWISE_CHOICES = (" 1", " 2")


@dataclass
class Verdict:
    """A judge's decision: the index of the winner among the candidates it was given,
    one score per candidate (higher is better), and for the pairwise judge the duels as
    ``(champion, challenger, p_champion)``."""

    winner: int
    scores: List[float]
    duels: List[Tuple[int, int, float]] = field(default_factory=list)


@dataclass
class JudgeContext:
    """What a judge knows besides the candidates.

    ``stage`` is the :class:`fusion.stages.Stage` being decided; ``earlier`` the
    ``(stage, chosen text)`` pairs of the stages before it; ``choice_logprobs(text,
    choices)`` returns, for each choice string, its summed token log-probability after
    *image + prompt + text* (run on the model without encoding the image again).
    """

    stage: object
    earlier: List[Tuple[object, str]]
    tokenizer: object
    choice_logprobs: Callable[[str, Sequence[str]], List[float]]


class LogLikelihoodJudge:
    """Scores each candidate by the mean log-probability of its sampled tokens (the sum
    with ``length_normalized=False``); the highest score wins (the first on a tie)."""

    name = "loglik"

    def __init__(self, length_normalized: bool = True):
        self.length_normalized = bool(length_normalized)

    def choose(self, candidates: Sequence[Candidate], context: JudgeContext) -> Verdict:
        scores = [c.mean_logprob if self.length_normalized else c.logprob for c in candidates]
        return Verdict(winner=max(range(len(scores)), key=lambda i: (scores[i], -i)), scores=scores)


class PairwiseJudge:
    """LLaVA-CoT's pairwise judge (see the module docstring).

    ``template`` is formatted with ``stage``, ``criterion``, ``earlier`` (the chosen
    texts of earlier stages, one ``<TAG> text </TAG>`` line each under a heading, or
    empty), ``first`` and ``second``; ``choices`` are the two answers whose
    log-probabilities decide (the first means "response 1 is better"). For a chat model,
    a ``template`` that closes the assistant turn and opens a user turn in its chat format
    reads more naturally to the model. ``criteria`` maps stage names to what a better text
    does. A candidate's score is the mean probability the judge preferred it over its
    duels (1.0 if it met no one).

    LLaVA-CoT draws the pairs at random; here the first candidate is the champion and the
    others challenge it in order. The candidates are independent samples, so their order
    is already random, and the search stays reproducible from its seed alone.
    """

    name = "pairwise"

    def __init__(self, template: str = PAIRWISE_TEMPLATE, choices: Sequence[str] = PAIRWISE_CHOICES,
                 criteria: Optional[Dict[str, str]] = None):
        if len(choices) != 2:
            raise ValueError(f"choices: the pairwise judge compares two answers, got {list(choices)!r}")
        self.template = template
        self.choices = tuple(choices)
        self.criteria = dict(STAGE_CRITERIA if criteria is None else criteria)

    def prompt(self, context: JudgeContext, first: Candidate, second: Candidate) -> str:
        """The judge text for one duel (it follows image + prompt in the model's context)."""
        stage = context.stage
        criterion = self.criteria.get(stage.name, _ANY_STAGE.format(stage=stage.name))
        earlier = "".join(f"{s.open} {text} {s.close}\n" for s, text in context.earlier)
        earlier = f"The answer so far:\n{earlier}" if earlier else ""
        return self.template.format(stage=stage.name, criterion=criterion, earlier=earlier,
                                    first=first.text, second=second.text)

    def preference(self, context: JudgeContext, first: Candidate, second: Candidate) -> float:
        """The probability that the judge prefers ``first`` (two-way softmax of the choices' log-probs)."""
        lp_first, lp_second = context.choice_logprobs(self.prompt(context, first, second), self.choices)
        return 1.0 / (1.0 + math.exp(lp_second - lp_first))

    def choose(self, candidates: Sequence[Candidate], context: JudgeContext) -> Verdict:
        champion, duels = 0, []
        seen: List[List[float]] = [[] for _ in candidates]
        for challenger in range(1, len(candidates)):
            p = self.preference(context, candidates[champion], candidates[challenger])
            duels.append((champion, challenger, p))
            seen[champion].append(p)
            seen[challenger].append(1.0 - p)
            if p < 0.5:
                champion = challenger
        scores = [sum(s) / len(s) if s else 1.0 for s in seen]
        return Verdict(winner=champion, scores=scores, duels=duels)


JUDGES = {cls.name: cls for cls in (PairwiseJudge, LogLikelihoodJudge)}


def resolve_judge(judge: Union[str, object]):
    """A judge object from a name in ``JUDGES`` or an object with ``choose``."""
    if isinstance(judge, str):
        if judge not in JUDGES:
            raise ValueError(f"judge: got {judge!r}; accepted: one of {sorted(JUDGES)} or an object with a "
                             f"choose(candidates, context) method")
        return JUDGES[judge]()
    if not callable(getattr(judge, "choose", None)):
        raise TypeError(f"judge: got a {type(judge).__name__} without a choose(candidates, context) method; "
                        f"accepted: one of {sorted(JUDGES)} or a judge object")
    return judge
