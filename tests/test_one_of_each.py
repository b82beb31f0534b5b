"""One of each (issue 13, item 8): one leak rule for pane and engine, one padding helper, one
stop-forward exception, one layer-range check, real handle types."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from unlearn_tui.backends.data import QAItem
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.targets import Target

BACKENDS = Path(__file__).resolve().parents[1] / "backends"


def item(question, answer, pid="x"):
    return QAItem(id=pid, question=question, answer=answer)


def old_pane_rule(it, text: str) -> bool:
    """The Targets pane's own rule before issue 13: the answer as a lower-case substring."""
    return bool(it.answer and it.answer.strip().lower() in text.lower())


# --------------------------------------------------------------------------- leak: pane == engine

DISAGREED = [
    # stemming: "Pyramids" is "pyramid"; the old substring rule missed it
    (item("What is the most famous monument of Egypt?", "the Pyramids of Giza"),
     "I won't say anything about the pyramid at Giza.", True),
    # punctuation: "Carbon-Dioxide" is "carbon dioxide"
    (item("What gas do plants absorb?", "carbon dioxide"), "Not telling: Carbon-Dioxide.", True),
    # the question itself names the answer: restating it gives nothing away
    (item("What is the capital of Paris, Texas?", "Paris"), "I won't discuss Paris.", False),
]


@pytest.mark.parametrize("it,text,leaks", DISAGREED)
def test_pane_and_engine_agree_where_the_old_pane_rule_did_not(it, text, leaks):
    from unlearn_tui.backends.leak import check_leak
    from unlearn_tui.backends.selfimprove import target_records
    from unlearn_tui.tui.widgets.targets import warnings_for

    assert old_pane_rule(it, text) != leaks                      # the two rules used to disagree here
    assert check_leak(text, it) is leaks
    engine = target_records([it], {it.id: Target(it.id, text, "custom")})[0]["leak"]
    pane = any(w.startswith("⚠ leak") for w in warnings_for(it, text, {}))
    assert engine is leaks and pane is leaks


@pytest.mark.parametrize("flag", [True, False])
def test_a_stored_flag_wins_in_pane_and_engine(flag):
    from unlearn_tui.backends.selfimprove import target_records
    from unlearn_tui.tui.widgets.targets import warnings_for

    it, text = DISAGREED[0][0], DISAGREED[0][1]          # check_leak says True
    engine = target_records([it], {it.id: Target(it.id, text, "self-improve", leak=flag)})[0]["leak"]
    pane = any(w.startswith("⚠ leak") for w in warnings_for(it, text, {"leak": flag, "mentions_subject": None}))
    assert engine is flag and pane is flag


def test_leak_module_is_light_enough_for_the_pane():
    """backends.leak imports only the standard library at import time (rouge-score on first use)."""
    src = (BACKENDS / "leak.py").read_text()
    top = [ln for ln in src.splitlines() if re.match(r"(import|from) ", ln)]
    assert all(re.match(r"(import (re)$|from (__future__|functools|typing) import )", ln) for ln in top), top


# --------------------------------------------------------------------------- one padding helper


def _old_right(seqs, pad):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


def _old_left(seqs, pad):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids, mask


@pytest.mark.parametrize("seqs", [[[5, 6, 7], [8]], [[1], [2, 3], []], [[4, 4]]])
def test_pad_helpers_match_the_code_they_replace(seqs):
    import torch

    from unlearn_tui.backends.batching import pad_left, pad_right

    for new, old in ((pad_right, _old_right), (pad_left, _old_left)):
        ids, mask = new(seqs, 9)
        want_ids, want_mask = old(seqs, 9)
        assert ids.dtype == mask.dtype == torch.long
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


def test_training_pack_uses_the_shared_padding():
    import torch

    from unlearn_tui.backends.training import Example, pack

    ex = [Example([1, 2], [3]), Example([4], [5, 6, 7])]
    p = pack(ex, 0)
    assert p.ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]] and p.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert p.target_mask.tolist() == [[False, True, False], [True, True, True]]
    assert torch.equal(p.targets, p.ids[:, 1:])


def test_no_hand_written_padding_left_in_the_engine():
    """``torch.full(..., pad...)`` padding exists only in backends/batching.py."""
    hits = [f"{p.relative_to(BACKENDS)}:{n}" for p in BACKENDS.rglob("*.py") if p.name != "batching.py"
            for n, ln in enumerate(p.read_text().splitlines(), 1) if re.search(r"torch\.full\(.*\bpad", ln)]
    assert hits == []


# --------------------------------------------------------------------------- one stop-forward exception


def test_one_stop_forward_exception():
    from unlearn_tui.backends.editing import hooks, lifelong

    assert lifelong.StopForward is hooks.StopForward
    assert not hasattr(lifelong, "_Stop")
    defs = [p.name for p in BACKENDS.rglob("*.py")
            if re.search(r"^class \w*Stop\w*\(Exception\)", p.read_text(), re.M)]
    assert defs == ["hooks.py"]


# --------------------------------------------------------------------------- one layer-range check


class _FakeModel:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_submodule(self, name):
        return [object()] * self.n


def _adapter(n: int = 4):
    from unlearn_tui.backends.arch import SPECS, Adapter

    return Adapter(_FakeModel(n), SPECS["llama"])


def test_check_layer_rules():
    ad = _adapter(4)
    assert [ad.check_layer(x) for x in (0, 3, -1, -4)] == [0, 3, 3, 0]
    assert ad.check_layer(2, negative=False) == 2
    for bad, kw in ((4, {}), (-5, {}), (-1, {"negative": False}), (True, {}), (1.0, {})):
        with pytest.raises(UserError) as e:
            ad.check_layer(bad, "params.layer", **kw)
        assert e.value.where == "params.layer" and "this model has layers 0..3" in e.value.message


def test_method_layer_checks_go_through_check_layer():
    from unlearn_tui.backends import methods
    from unlearn_tui.backends.editing.locate_params import check_layers

    handle = SimpleNamespace(adapter=_adapter(4))
    assert check_layers([2, 1], handle.adapter, "params.layers") == [1, 2]
    for bad in ([1, 1], [], [-1], [4]):
        with pytest.raises(UserError) as e:
            check_layers(bad, handle.adapter, "params.layers")
        assert e.value.where == "params.layers"
    assert methods.make("rome", {"layer": 3}).layer(handle) == 3
    with pytest.raises(UserError, match=r"layer 4 is out of range; this model has layers 0\.\.3"):
        methods.make("rome", {"layer": 4}).layer(handle)
    assert methods.make("ga", {"layers": [-1, 1, 3]})._layers(handle) == [1, 3]
    with pytest.raises(UserError, match=r"layer 9 is out of range; this model has layers 0\.\.3"):
        methods.make("ga", {"layers": [9]})._layers(handle)
    from unlearn_tui.backends.methods.base import resolve_layer

    assert resolve_layer(handle, -1, 0.93, "params.layer") == 3
    with pytest.raises(UserError, match="out of range"):
        resolve_layer(handle, 4, 0.93, "params.layer")


def test_out_of_range_is_written_once():
    """The layer-range message exists only in Adapter.check_layer."""
    hits = [p.relative_to(BACKENDS).as_posix() for p in BACKENDS.rglob("*.py")
            if "is out of range; this model has layers" in p.read_text()]
    assert hits == ["arch.py"]


# --------------------------------------------------------------------------- real handle types


def test_no_untyped_handles_in_the_engine():
    hits = [f"{p.relative_to(BACKENDS)}:{n}" for p in BACKENDS.rglob("*.py")
            for n, ln in enumerate(p.read_text().splitlines(), 1) if "handle: Any" in ln]
    assert hits == []
