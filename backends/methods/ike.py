"""IKE: in-context knowledge editing (Zheng et al., 2023), used for unlearning.

No weight changes.  The method installs a wrapper that rewrites every question
before the chat template: an instruction, then the ``k`` forget
demonstrations (question -> refusal target) most similar to the query, then
the query.  Retrieval is TF-IDF cosine over lower-cased word tokens, computed
once when the method is applied.

Leak-freedom: demonstrations carry only forget *questions* and their refusal
*targets*; no gold answer of any item ever enters a prompt (a test checks
this).  Because the wrapper is installed through the model handle, the
transaction removes it on undo exactly like a weight edit.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..events import Tracker
from ..params import param
from . import register
from .base import MethodBase

if TYPE_CHECKING:
    from ..model import ModelHandle
    from ..targets import Request
    from .base import EditContext

DEFAULT_INSTRUCTION = ("You have been asked to forget some facts. If a question asks about one of the "
                       "forgotten facts below, reply with the given refusal. Answer every other question "
                       "normally and briefly.")

_WORD = re.compile(r"[a-z0-9]+")
# function words carry no topic; without this "Who is the author of X?" matches every "What is the Y of Z?"
_STOP = frozenset("""a an the is are was were be been of in on at to for from by with and or what which who whom
whose when where why how do does did this that these those it its as there their they he she his her i you me
my your we our us can could would should will shall may might tell name about""".split())


def _tokens(text: str) -> list[str]:
    return [t for t in _WORD.findall(text.lower()) if t not in _STOP]


class TfidfIndex:
    """A tiny TF-IDF index over demonstration questions."""

    def __init__(self, docs: list[str]) -> None:
        self.docs = docs
        tokenised = [_tokens(d) for d in docs]
        df = Counter(t for toks in tokenised for t in set(toks))
        n = max(1, len(docs))
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        self.vecs = [self._vec(toks) for toks in tokenised]

    def _vec(self, toks: list[str]) -> dict[str, float]:
        tf = Counter(toks)
        v = {t: c * self.idf.get(t, 0.0) for t, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items()}

    def scores(self, query: str) -> list[float]:
        q = self._vec(_tokens(query))
        return [sum(w * d.get(t, 0.0) for t, w in q.items()) for d in self.vecs]

    def top(self, query: str, k: int, min_score: float = 0.0) -> list[int]:
        s = self.scores(query)
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        return [i for i in order[:k] if s[i] >= min_score]


class IKEWrapper:
    name = "ike"

    def __init__(self, demos: list[tuple[str, str]], k: int, min_similarity: float, instruction: str) -> None:
        self.demos = demos
        self.k = k
        self.min_similarity = min_similarity
        self.instruction = instruction
        self.index = TfidfIndex([q for q, _ in demos])

    def install(self, handle: ModelHandle) -> None:
        pass

    def remove(self, handle: ModelHandle) -> None:
        pass

    def transform_question(self, question: str) -> str:
        picked = self.index.top(question, self.k, self.min_similarity)
        if not picked:
            return question
        lines = [self.instruction, ""]
        for i in reversed(picked):  # most similar closest to the query
            q, t = self.demos[i]
            lines += [f"Forgotten question: {q}", f"Refusal: {t}", ""]
        lines.append(f"Question: {question}")
        return "\n".join(lines)


@register
class IKE(MethodBase):
    name: ClassVar[str] = "ike"
    summary: ClassVar[str] = "In-context editing: retrieved forget demonstrations prepended at inference"
    needs_retain: ClassVar[bool] = False

    @dataclass
    class Params:
        k: int = param(4, "demonstrations retrieved per query", min=1, max=64)
        min_similarity: float = param(0.1, "minimum TF-IDF cosine for a demonstration to be used "
                                      "(queries unlike every forget question are left untouched)", min=0.0, max=1.0)
        instruction: str = param(DEFAULT_INSTRUCTION, "instruction placed before the demonstrations")

    params: IKE.Params

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        return []

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        tracker = Tracker(ctx.on_event, ctx.cancel, "ike: index demonstrations", len(requests))
        demos = []
        for r in requests:
            demos.append((r.prompt, r.target))
            tracker.step()
        handle.add_wrapper(IKEWrapper(demos, self.params.k, self.params.min_similarity, self.params.instruction))
        return {"edits": len(demos), "demonstrations": len(demos)}
