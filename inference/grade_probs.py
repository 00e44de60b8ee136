"""Per-grade probabilities read from the severity tokens of a schema-constrained answer.

The answer schema writes each level finding as ``{"level":…,"finding":…,"severity":"<value>",…}`` (the
properties in that order, no whitespace), so at the token that starts a severity value the model chooses
between ``none``, ``mild``, ``moderate`` and ``severe``.  Its distribution there, restricted to the first
token of each alternative and renormalised over the alternatives the grammar allows, gives the grade
probabilities; ``normal_mild`` is p(none) + p(mild).  A value can start with several tokens (``mild``,
``mi``, ``"mild``): its best-scored allowed one stands for it.

Robustness rule: a finding gets probabilities only where the position is found unambiguously and the
token the model wrote there starts exactly the value it wrote (a model that writes ``moderate`` as ``m`` +
``oderate`` when ``mild`` is tokenized ``m`` + ``ild`` gets none for that finding).  ``no_abnormality`` (its
severity is fixed) and a (level, finding, side) the answer lists twice with different content get none;
the side is kept only for the sided condition, foraminal stenosis (as validation scores it).  Never a guess.

Two readers share this rule: :class:`SeverityProbe` inside the transformers backend's logits processor
(unconstrained logits, the model's own tokenizer), and :func:`from_logprobs` on an OpenAI-compatible
server's ``logprobs`` (``top_logprobs``: the best-scored token of each alternative stands for it; an
alternative not among them counts as 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from inference.findings import FindingType, GradeProbabilities, Laterality

__all__ = ["SEVERITY_KEY", "SEVERITY_VALUES", "SeverityProbe", "build_probabilities", "from_logprobs"]

#: The key before each severity value in the constrained (whitespace-free) answer.
SEVERITY_KEY: Final = '"severity":'
#: The values the schema allows for ``severity``.
SEVERITY_VALUES: Final = ("none", "mild", "moderate", "severe")


def _tail(text: str) -> tuple[int, str] | None:
    """(index of the last severity key, the text after it), or ``None`` when there is none."""
    at = text.rfind(SEVERITY_KEY)
    if at < 0:
        return None
    return text.count(SEVERITY_KEY) - 1, text[at + len(SEVERITY_KEY):]


@dataclass(frozen=True)
class _Decision:
    item: int
    position: int
    starts: dict[int, str]
    probs: dict[str, float]


class SeverityProbe:
    """Record the severity choices during constrained decoding (transformers backend, batch size 1).

    The logits processor calls :meth:`step` once per generated token, before masking, with the answer
    tokens consumed so far, the unconstrained scores and the grammar's allowed-token mask.  Right after
    ``"severity":`` (and after its opening quote) every allowed token that starts exactly one value is a
    first token of that value, and a token two values share (``m``) is the first token of the value whose
    own tokenization starts with it; each value's best-scored first token stands for it (so under greedy
    decoding the value written is the most probable one).

    Parameters
    ----------
    tokenizer
        The model's tokenizer (``decode`` of single tokens).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.text = ""
        self.decisions: list[_Decision] = []
        self._pieces: dict[int, str] = {}
        self._first: dict[str, int | None] = {}

    def _first_token(self, text: str) -> int | None:
        if text not in self._first:
            ids = self._tok.encode(text, add_special_tokens=False)
            self._first[text] = int(ids[0]) if ids else None
        return self._first[text]

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = str(self._tok.decode([token], skip_special_tokens=False))
        return self._pieces[token]

    def step(self, new_tokens: Sequence[int], position: int, scores: Any, allowed: npt.NDArray[np.bool_]) -> None:
        """Take the tokens generated since the last call; record the next token's choice if it may start
        a severity value.

        Parameters
        ----------
        new_tokens
            Answer tokens since the last call.
        position
            Index (in the answer's tokens) of the token about to be chosen.
        scores
            Unconstrained scores of the next token (1-D, vocabulary size; torch or numpy).
        allowed
            The grammar's mask of allowed next tokens (may be shorter than ``scores``).
        """
        for t in new_tokens:
            self.text += self._piece(int(t))
        recent = self.text[-(len(SEVERITY_KEY) + 2):]
        if SEVERITY_KEY not in recent:
            return
        tail = recent[recent.rfind(SEVERITY_KEY) + len(SEVERITY_KEY):]
        if tail not in ("", '"'):
            return
        item = self.text.count(SEVERITY_KEY) - 1
        row = scores.detach().float().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores, float)
        starts: dict[int, str] = {}
        best: dict[str, float] = {}
        # a token that starts two values ("m": mild, moderate) is the first token of the one whose own
        # tokenization starts with it (mild = m + ild; moderate is one token)
        canonical = {self._first_token(('"' + v)[len(tail):]): v for v in SEVERITY_VALUES}
        if len(canonical) != len(SEVERITY_VALUES):
            canonical = {}
        for token in np.flatnonzero(allowed).tolist():
            values = _consistent(tail, self._piece(int(token)))
            if token >= row.shape[0] or not values:
                continue
            v = next(iter(values)) if len(values) == 1 else canonical.get(int(token))
            if v is not None and v in values:
                starts[int(token)] = v
                logit = float(row[token])
                if math.isfinite(logit) and logit > best.get(v, -math.inf):
                    best[v] = logit
        if not best:
            return
        top = max(best.values())
        weights = {v: math.exp(x - top) for v, x in best.items()}
        total = sum(weights.values())
        probs = {v: weights.get(v, 0.0) / total for v in SEVERITY_VALUES}
        self.decisions.append(_Decision(item, position, starts, probs))

    def grade_probabilities(self, answer: str, tokens: Sequence[int]) -> tuple[GradeProbabilities, ...]:
        """The probabilities of the answer's level findings (see the module's robustness rule).

        Parameters
        ----------
        answer
            The complete answer text (JSON).
        tokens
            The answer's tokens, as generated.
        """
        levels = _levels(answer)
        if levels is None:
            return ()
        per_item: dict[int, dict[str, float]] = {}
        settled: set[int] = set()
        for d in self.decisions:
            if d.item in settled or d.item >= len(levels) or d.position >= len(tokens):
                continue
            chosen = d.starts.get(int(tokens[d.position]))
            if chosen is None:
                continue  # the token written here starts no value or several (the opening quote): go on
            settled.add(d.item)
            if chosen == levels[d.item].get("severity"):
                per_item[d.item] = d.probs
        return build_probabilities(levels, per_item)


def _levels(answer: str) -> list[dict[str, Any]] | None:
    try:
        raw = json.loads(answer)
    except ValueError:
        return None
    levels = raw.get("levels") if isinstance(raw, dict) else None
    if not isinstance(levels, list) or not all(isinstance(x, dict) for x in levels):
        return None
    if answer.count(SEVERITY_KEY) != len(levels):
        return None  # the positions do not map one-to-one onto the findings
    return levels


def _key(item: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(level, finding, side): the side only for the sided condition (foraminal stenosis), as
    :class:`~inference.findings.GradeProbabilities` has it."""
    finding = str(item.get("finding"))
    side = item.get("laterality") if finding == FindingType.FORAMINAL_STENOSIS.value else None
    return (str(item.get("level")), finding, side if isinstance(side, str) else None)


def build_probabilities(
    levels: Sequence[Mapping[str, Any]], per_item: Mapping[int, Mapping[str, float]]
) -> tuple[GradeProbabilities, ...]:
    """Grade probabilities of the raw answer's level findings (index → p per severity value).

    A (level, finding, side) written twice with different content gets none (a word-for-word repeat:
    the first reading); ``no_abnormality`` gets none.
    """
    written: dict[tuple[str, str, str | None], set[str]] = {}
    for item in levels:
        written.setdefault(_key(item), set()).add(json.dumps(item, sort_keys=True))
    out: list[GradeProbabilities] = []
    done: set[tuple[str, str, str | None]] = set()
    for k, probs in sorted(per_item.items()):
        item = levels[k]
        key = _key(item)
        # a repeat word for word is one finding (the answer parser keeps one): its first reading counts;
        # two different findings under one key (two grades of one condition at one level) are ambiguous
        if key in done or len(written[key]) != 1 or key[1] == FindingType.NO_ABNORMALITY.value:
            continue
        done.add(key)
        total = sum(probs.get(v, 0.0) for v in SEVERITY_VALUES)
        if not total > 0 or not math.isfinite(total):
            continue
        p = {v: probs.get(v, 0.0) / total for v in SEVERITY_VALUES}
        try:
            out.append(GradeProbabilities(
                level=key[0], finding=FindingType(key[1]),
                laterality=Laterality(key[2]) if key[2] is not None else None,
                normal_mild=p["none"] + p["mild"], moderate=p["moderate"], severe=p["severe"],
            ))
        except ValueError:
            continue  # a level or finding the answer parser would refuse as well: no probabilities
    return tuple(out)


def _consistent(tail: str, token: str) -> set[str]:
    """The severity values a token can start, given the text ``tail`` after the severity key."""
    out = set()
    for v in SEVERITY_VALUES:
        rest = ('"' + v + '"')[len(tail):]
        if token and (rest.startswith(token) or token.startswith(rest)):
            out.add(v)
    return out


def from_logprobs(answer: str, content: Sequence[Mapping[str, Any]]) -> tuple[GradeProbabilities, ...]:
    """Grade probabilities from an OpenAI-compatible ``choices[0].logprobs.content`` list.

    At each severity value, the decision is the first token that starts exactly one value, right after
    ``"severity":`` or its opening quote; its ``top_logprobs`` give each value the probability of its
    best-scored token (0 where none is listed), renormalised.  Anything else (no logprobs, a decision
    token after a shared prefix such as ``m``, tokens that do not spell the answer) gives none.

    Parameters
    ----------
    answer
        The answer text.
    content
        The per-token entries: ``token``, ``logprob``, ``top_logprobs`` (``token``, ``logprob``).
    """
    levels = _levels(answer)
    if levels is None or not content:
        return ()
    text = ""
    per_item: dict[int, dict[str, float]] = {}
    decided: set[int] = set()
    for entry in content:
        token = entry.get("token")
        if not isinstance(token, str):
            return ()
        found = _tail(text)
        if found is not None and found[0] not in decided:
            item, tail = found
            if tail in ("", '"'):
                chosen = _consistent(tail, token)
                if len(chosen) == 1:
                    decided.add(item)
                    best: dict[str, float] = {}
                    for alt in entry.get("top_logprobs") or ():
                        alt_token, lp = alt.get("token"), alt.get("logprob")
                        if not isinstance(alt_token, str) or not isinstance(lp, (int, float)):
                            continue
                        values = _consistent(tail, alt_token)
                        if len(values) == 1:
                            v = next(iter(values))
                            best[v] = max(best.get(v, 0.0), math.exp(float(lp)))
                    (v_chosen,) = chosen
                    if v_chosen in best and levels[item].get("severity") == v_chosen:
                        per_item[item] = best
            else:
                decided.add(item)  # the value started with a token shared by two values: no decision
        text += token
    if text != answer:
        return ()
    return build_probabilities(levels, per_item)
