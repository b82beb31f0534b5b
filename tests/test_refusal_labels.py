"""The refusal detector against hand-labelled real generations (tests/data/refusal_labels.jsonl).

The rows are greedy generations of SmolLM2-135M-Instruct after ROME / MEMIT
edits at 80 forget, and every generation of an AlphaEdit and a WISE run in the
paper's factual setting (40 forget; see tests/data/README.md for the sources
and the labelling rule).  The
set is split deterministically by a hash of the text into a dev half (used to
tune the patterns in backends/refusal.py) and a held-out half (not used).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from unlearn_tui.backends.refusal import is_refusal

LABELS = Path(__file__).parent / "data" / "refusal_labels.jsonl"


def _rows() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]


def half(text: str) -> str:
    """``"dev"`` or ``"held-out"``: first byte of the text's SHA-256, even or odd."""
    return "dev" if hashlib.sha256(text.encode("utf-8")).digest()[0] % 2 == 0 else "held-out"


def precision_recall(rows: list[dict]) -> tuple[float, float]:
    pred = [is_refusal(r["text"]) for r in rows]
    tp = sum(1 for r, p in zip(rows, pred) if p and r["refusal"])
    fp = sum(1 for r, p in zip(rows, pred) if p and not r["refusal"])
    fn = sum(1 for r, p in zip(rows, pred) if not p and r["refusal"])
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def test_labelled_set_shape():
    rows = _rows()
    assert len(rows) >= 200
    assert all(set(r) >= {"text", "refusal", "run", "split", "item"} and isinstance(r["refusal"], bool) for r in rows)
    assert len({r["run"].split("-")[0] for r in rows}) >= 2          # methods
    assert {r["split"] for r in rows} == {"forget", "rephrase", "retain"}
    assert any(r["refusal"] for r in rows) and any(not r["refusal"] for r in rows)


def test_detector_precision_recall_on_real_generations():
    rows = _rows()
    for name in ("dev", "held-out"):
        part = [r for r in rows if half(r["text"]) == name]
        p, r = precision_recall(part)
        print(f"refusal detector, {name} half ({len(part)} rows): precision {p:.3f}, recall {r:.3f}")
    p, r = precision_recall(rows)
    print(f"refusal detector, all ({len(rows)} rows): precision {p:.3f}, recall {r:.3f}")
    assert p >= 0.95 and r >= 0.95
    # the paper-scale runs on their own (AlphaEdit and WISE, factual setting, every generation)
    paper = [r for r in rows if r["run"].endswith("-factual40")]
    assert len(paper) == 270 and {r["run"] for r in paper} == {"alphaedit-factual40", "wise-factual40"}
    p, r = precision_recall(paper)
    print(f"refusal detector, paper-scale runs ({len(paper)} rows): precision {p:.3f}, recall {r:.3f}")
    assert p >= 0.95 and r >= 0.95
