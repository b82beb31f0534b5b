"""Fine-tune first ([finetune], issue 15 item 2) on tiny random models: it teaches the facts, its cache is
reused by a second replay (no training), any change misses it, cancel restores the weights, bad values are
one-line file:line errors, the table round-trips, and "retain" trains a retain-only model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.test_bad_input import error_line, line_of, replay
from tests.test_cli import FACTS, write_facts
from unlearn_tui import sessions
from unlearn_tui.backends import finetune_first, tiny
from unlearn_tui.backends.data import QAItem, load_items
from unlearn_tui.backends.errors import Cancelled, UserError
from unlearn_tui.backends.events import CancelToken, Log, Progress, StageStarted
from unlearn_tui.backends.generation import answer_stats
from unlearn_tui.backends.model import state_hash
from unlearn_tui.backends.runner import Workbench, known_cache_file, run
from unlearn_tui.backends.spec import FinetuneConfig

# settings a tiny random model memorises the six FACTS with in well under a second (about 20-55 epochs of one
# step; measured on llama, gpt2 and qwen2 at lr 3e-3..1e-2)
FAST = {"lr": 1e-2, "epochs": 80, "until_rouge1": 0.95}
FAST_TOML = "lr = 0.01\nepochs = 80\nuntil_rouge1 = 0.95\n"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test starts with an empty fine-tune cache (the suite's cache folder is shared across tests)."""
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "cache"))


def facts() -> list[QAItem]:
    return [QAItem(f"f{i}", q, a, subject=s) for i, (q, a, s) in enumerate(FACTS)]


def make_session(tmp_path, finetune=None, forget=3, retain=3):
    write_facts(tmp_path / "facts.jsonl")
    s = sessions.new_session(model={"name": "tiny:llama"},
                             data={"path": "facts.jsonl", "forget": forget, "retain": retain, "rephrase": False},
                             eval={"max_new_tokens": 8, "batch_size": 8}, runs=[{"method": "none"}],
                             finetune=finetune)
    s.path = tmp_path / "s.toml"
    return s


def trained_steps(events) -> list[Progress]:
    """Optimisation steps of the fine-tune (a Progress of its stage that carries a loss)."""
    return [e for e in events if isinstance(e, Progress) and e.stage == finetune_first.STAGE and e.loss is not None]


def answer_logprob(handle, items) -> float:
    """Mean per-token log-probability of the gold answers after their questions."""
    stats = answer_stats(handle, [(handle.prompt_ids(it.question), handle.encode_answer(it.answer)) for it in items])
    return sum(s.mean_logprob for s in stats) / len(stats)


def replay_once(session, events=None):
    ev = [] if events is None else events
    wb = Workbench(session, ev.append)
    wb.load_data()
    return wb, wb.run_all(), ev


# ----------------------------------------------------------------- training
@pytest.mark.parametrize("arch,tuning", [("llama", "full"), ("gpt2", "full"), ("qwen2", "full"), ("llama", "lora")])
def test_training_teaches_the_facts(arch, tuning):
    h = tiny.handle(arch)
    items = facts()
    cfg = FinetuneConfig(**FAST, tuning=tuning)
    exs = finetune_first.examples(h, items)
    r1_before = finetune_first.check_rouge1(h, items, exs)
    lp_before = answer_logprob(h, items)
    base_fp = h.fingerprint
    events: list = []
    info = finetune_first.apply(h, items, cfg, on_event=events.append)
    assert r1_before < 0.3
    assert info.reached and info.rouge1 >= 0.95 and not info.cached and info.items == len(items)
    assert finetune_first.check_rouge1(h, items, exs) == pytest.approx(info.rouge1)
    # teacher-forced too (LoRA stops as soon as greedy decoding is right, with less probability moved)
    assert answer_logprob(h, items) > lp_before + (3.0 if tuning == "full" else 0.3)
    # progress: one stage, steps with done/total and an ETA, one history row per epoch
    steps = trained_steps(events)
    assert len(steps) == info.steps and steps[-1].done == info.steps and steps[0].total >= info.steps
    assert steps[0].eta_s is not None
    assert [e for e in events if isinstance(e, StageStarted)][0].stage == "finetune"
    assert [r["epoch"] for r in info.history] == list(range(1, info.epochs + 1))
    # the fine-tuned model has its own fingerprint (caches keyed by it follow)
    assert h.fingerprint == info.fingerprint == finetune_first.derived_fingerprint(base_fp, info.key) != base_fp
    assert h.finetune is info
    weights, meta = finetune_first.cache_files(base_fp, info.key)
    assert weights.is_file() and json.loads(meta.read_text())["rouge1"] == info.rouge1


def test_a_bar_not_reached_is_a_warning_not_an_error():
    h = tiny.handle("llama")
    events: list = []
    info = finetune_first.apply(h, facts(), FinetuneConfig(epochs=2, lr=1e-4, until_rouge1=1.0),
                                on_event=events.append)
    assert not info.reached and info.epochs == 2 and info.rouge1 is not None
    assert any(isinstance(e, Log) and e.level == "warning" and "did not reach" in e.message for e in events)
    assert h.finetune is info   # the model is still the (partly) fine-tuned one


# ----------------------------------------------------------------- the cache
def test_second_replay_reuses_the_cached_fine_tune(tmp_path):
    s = make_session(tmp_path, FAST)
    wb1, res1, ev1 = replay_once(s)
    first = res1.to_json()["finetune"]
    assert first["cached"] is False and first["reached"] is True and first["rouge1"] >= 0.95
    assert first["epochs"] >= 1 and first["seconds"] > 0 and trained_steps(ev1)
    # the baseline is measured on the fine-tuned model: it knows the facts now
    assert res1.baseline.splits["forget"].rouge1 >= 0.9 and res1.baseline.splits["retain"].rouge1 >= 0.9
    wb2, res2, ev2 = replay_once(s)
    second = res2.to_json()["finetune"]
    assert trained_steps(ev2) == []    # no training the second time
    assert second["cached"] is True and second["key"] == first["key"]
    assert second["rouge1"] == first["rouge1"] and second["epochs"] == first["epochs"]
    assert state_hash(wb2.handle.model) == state_hash(wb1.handle.model)    # bit for bit
    assert wb2.handle.fingerprint == wb1.handle.fingerprint
    assert res2.to_json()["baseline"] == res1.to_json()["baseline"]
    # the stage is still shown (as one step), before the baseline
    stages = [e.stage for e in ev2 if isinstance(e, StageStarted)]
    assert stages.index("finetune") < stages.index("evaluate forget")


def test_replay_json_carries_the_finetune_block_and_none_without_it(tmp_path):
    out = run(make_session(tmp_path, FAST)).to_json()
    assert {"cached", "rouge1", "epochs", "seconds", "reached"} <= set(out["finetune"])
    assert "finetune" not in run(make_session(tmp_path)).to_json()


def test_changing_a_setting_the_data_or_the_model_misses_the_cache(tmp_path):
    h = tiny.handle("llama")
    items = facts()
    cfg = FinetuneConfig(**FAST)
    key = finetune_first.cache_key(h, finetune_first.examples(h, finetune_first.training_items(items)), cfg)

    def key_of(c=cfg, its=items, handle=h):   # what apply() keys: the items as they train (ordered by id)
        return finetune_first.cache_key(handle, finetune_first.examples(handle, finetune_first.training_items(its)),
                                        c)

    changed = [replace(cfg, lr=3e-3), replace(cfg, epochs=81), replace(cfg, until_rouge1=0.9),
               replace(cfg, seed=1), replace(cfg, batch_size=2), replace(cfg, tuning="lora"),
               replace(cfg, scope="mlp")]
    keys = {key_of(c) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    assert key_of(replace(cfg, data="retain")) == key          # the data is keyed by its content
    assert key_of(its=list(reversed(items))) == key            # ... however it was ordered
    assert key_of(its=items[1:]) != key
    assert key_of(its=[replace(items[0], answer="Lyon"), *items[1:]]) != key
    assert key_of(handle=tiny.handle("llama", seed=1)) != key  # another base model
    # the cache really is missed: a changed answer trains again
    finetune_first.apply(h, items, cfg)
    events: list = []
    info = finetune_first.apply(tiny.handle("llama"), [replace(items[0], answer="Lyon"), *items[1:]], cfg,
                                on_event=events.append)
    assert not info.cached and trained_steps(events)
    again = finetune_first.apply(tiny.handle("llama"), items, cfg)
    assert again.cached


def test_a_broken_cache_entry_is_trained_again(tmp_path):
    items, cfg = facts(), FinetuneConfig(**FAST)
    h = tiny.handle("llama")
    base = h.fingerprint
    info = finetune_first.apply(h, items, cfg)
    weights, _ = finetune_first.cache_files(base, info.key)
    weights.write_bytes(b"not safetensors")
    events: list = []
    again = finetune_first.apply(tiny.handle("llama"), items, cfg, on_event=events.append)
    assert not again.cached and trained_steps(events)
    assert any(isinstance(e, Log) and e.level == "warning" and "unreadable" in e.message for e in events)
    assert finetune_first.apply(tiny.handle("llama"), items, cfg).cached   # rewritten


# ----------------------------------------------------------------- cancel and rollback
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_cancel_mid_training_restores_the_weights_bit_for_bit(tuning):
    h = tiny.handle("llama")
    before, fp = state_hash(h.model), h.fingerprint
    cancel = CancelToken()

    def on_event(e):
        if isinstance(e, Progress) and e.stage == finetune_first.STAGE and e.done == 3:
            cancel.cancel()

    cfg = FinetuneConfig(**FAST, tuning=tuning)
    with pytest.raises(Cancelled):
        finetune_first.apply(h, facts(), cfg, on_event=on_event, cancel=cancel)
    assert state_hash(h.model) == before and h.fingerprint == fp
    assert getattr(h, "finetune", None) is None and not any("lora" in n for n, _ in h.model.named_parameters())
    key = finetune_first.cache_key(h, finetune_first.examples(h, facts()), cfg)
    assert not any(p.exists() for p in finetune_first.cache_files(fp, key))


RESUMABLE = {"lr": 1e-2, "epochs": 6, "until_rouge1": 0.0, "batch_size": 2}   # 3 steps per epoch on FACTS, 18 in all


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_an_interrupted_fine_tune_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, tuning):
    items, cfg = facts(), FinetuneConfig(**RESUMABLE, tuning=tuning)
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "straight"))
    h = tiny.handle("llama")
    straight = finetune_first.apply(h, items, cfg)
    want = state_hash(h.model)
    assert straight.steps == 18 and straight.epochs == 6

    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "interrupted"))
    h = tiny.handle("llama")
    before, base = state_hash(h.model), h.fingerprint
    cancel = CancelToken()

    def on_event(e):   # cancel in the middle of epoch 5
        if isinstance(e, Progress) and e.stage == finetune_first.STAGE and e.done == 13:
            cancel.cancel()

    with pytest.raises(Cancelled):
        finetune_first.apply(h, items, cfg, on_event=on_event, cancel=cancel)
    assert state_hash(h.model) == before                       # rolled back as before
    path_key = finetune_first.cache_key(h, finetune_first.examples(h, finetune_first.training_items(items)), cfg,
                                        trajectory=True)
    tensors, note = finetune_first.partial_files(base, path_key)
    assert tensors.is_file() and json.loads(note.read_text())["epoch"] == 4   # the last finished epoch is kept
    assert not finetune_first.cache_files(base, straight.key)[1].exists()

    h = tiny.handle("llama")
    events: list = []
    info = finetune_first.apply(h, items, cfg, on_event=events.append)
    assert state_hash(h.model) == want                         # the same weights as without the interruption
    assert info.steps == 18 and info.epochs == 6 and info.history == straight.history and not info.cached
    assert len(trained_steps(events)) == 6                     # only epochs 5 and 6 trained now
    resumed = [e for e in events if isinstance(e, Progress) and e.stage == finetune_first.STAGE]
    assert resumed[0].done == 12 and "resumed after epoch 4/6" in resumed[0].detail and resumed[0].eta_s is None
    assert trained_steps(events)[0].eta_s is not None
    assert any(isinstance(e, Log) and "resuming" in e.message for e in events)
    assert not tensors.exists() and not note.exists()          # done: the partial files are gone
    meta = json.loads(finetune_first.cache_files(base, info.key)[1].read_text())
    assert meta["resumed_from"] == 4 and meta["steps"] == 18
    assert finetune_first.apply(tiny.handle("llama"), items, cfg).cached


def test_a_bar_not_reached_continues_when_the_epoch_cap_is_raised(tmp_path, monkeypatch):
    """A fine-tune that ended below the bar keeps its last epoch; the same settings with a higher cap go on from
    there (another cache entry, the weights of a run with that cap from the start); reaching the bar clears it."""
    items = facts()
    slow = {"lr": 3e-3, "until_rouge1": 1.0, "batch_size": 2}   # does not reach 1.0 in 2 epochs
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "straight"))
    h = tiny.handle("llama")
    straight = finetune_first.apply(h, items, FinetuneConfig(**slow, epochs=4))
    want = state_hash(h.model)

    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "raised"))
    h = tiny.handle("llama")
    base = h.fingerprint
    short = finetune_first.apply(h, items, FinetuneConfig(**slow, epochs=2))
    assert not short.reached and short.epochs == 2
    path_key = finetune_first.cache_key(h, finetune_first.examples(h, finetune_first.training_items(items)),
                                        FinetuneConfig(**slow, epochs=2), base, trajectory=True)
    _, note = finetune_first.partial_files(base, path_key)
    assert json.loads(note.read_text())["epoch"] == 2             # kept although the run finished
    h = tiny.handle("llama")
    events: list = []
    more = finetune_first.apply(h, items, FinetuneConfig(**slow, epochs=4), on_event=events.append)
    assert not more.cached and more.key != short.key and more.epochs == straight.epochs
    assert len(trained_steps(events)) == straight.steps - short.steps     # only the epochs past the old cap
    assert state_hash(h.model) == want and more.history == straight.history
    # a lower cap than the kept epoch cannot use it: trains from the start
    events = []
    finetune_first.apply(tiny.handle("llama"), items, FinetuneConfig(**slow, epochs=1), on_event=events.append)
    assert len(trained_steps(events)) == 3
    # reaching the bar removes the kept epoch
    done = finetune_first.apply(tiny.handle("llama"), items, FinetuneConfig(**FAST))
    assert done.reached
    fast_key = finetune_first.cache_key(h, finetune_first.examples(h, finetune_first.training_items(items)),
                                        FinetuneConfig(**FAST), base, trajectory=True)
    assert not any(p.exists() for p in finetune_first.partial_files(base, fast_key))


def test_a_partial_fine_tune_that_does_not_hold_together_trains_from_the_start(tmp_path):
    items, cfg = facts(), FinetuneConfig(**RESUMABLE)
    h = tiny.handle("llama")
    base = h.fingerprint
    cancel = CancelToken()

    def on_event(e):
        if isinstance(e, Progress) and e.stage == finetune_first.STAGE and e.done == 7:
            cancel.cancel()

    with pytest.raises(Cancelled):
        finetune_first.apply(h, items, cfg, on_event=on_event, cancel=cancel)
    key = finetune_first.cache_key(h, finetune_first.examples(h, finetune_first.training_items(items)), cfg,
                                   trajectory=True)
    _, note = finetune_first.partial_files(base, key)
    kept = json.loads(note.read_text())
    note.write_text(json.dumps({**kept, "epoch": 1}))          # the note no longer names the tensors' epoch
    events: list = []
    info = finetune_first.apply(tiny.handle("llama"), items, cfg, on_event=events.append)
    assert len(trained_steps(events)) == 18 and info.steps == 18
    assert any(isinstance(e, Log) and e.level == "warning" and "training from the start" in e.message
               for e in events)


def test_cancel_in_a_replay_is_reported_rolled_back(tmp_path):
    s = make_session(tmp_path, FAST)
    cancel, events = CancelToken(), []

    def on_event(e):
        events.append(e)
        if isinstance(e, Progress) and e.stage == finetune_first.STAGE and e.done == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run(s, on_event, cancel)
    assert events[-1].rolled_back


# ----------------------------------------------------------------- the Workbench
def test_startup_fine_tunes_before_the_known_scores(tmp_path):
    s = make_session(tmp_path, FAST)
    events: list = []
    wb = Workbench(s, events.append)
    known = wb.startup(known_limit=6)
    stages = [e.stage for e in events if isinstance(e, StageStarted)]
    assert stages.index("finetune") < stages.index("evaluate known")
    assert wb.finetune_info is not None and wb.finetune_info.items == 6
    assert sum(known.values()) / len(known) >= 0.9
    # the known-scores cache is keyed to the fine-tuned model, not the base one
    base = tiny.handle("llama")
    items = load_items(tmp_path / "facts.jsonl")
    assert known_cache_file(wb.handle, items, wb.settings) != known_cache_file(base, items, wb.settings)


def test_the_apps_workbench_fine_tunes_at_startup_and_again_when_the_selection_changes(tmp_path):
    pytest.importorskip("textual")
    from unlearn_tui.tui.worker import _guarded_workbench

    s = make_session(tmp_path, FAST)
    events: list = []
    wb = _guarded_workbench(s, CancelToken(), None, None)   # its load_model returns a loaded model early
    wb.on_event = events.append
    wb.adopt(s, (), [], [])                  # the start-up job runs before the data is in
    wb.startup(known_limit=6)
    first = wb.finetune_info
    assert first is not None and first.items == 6 and len(trained_steps(events)) == first.steps
    items = load_items(tmp_path / "facts.jsonl")
    ids = [it.id for it in items]
    wb.adopt(s, items, ids[:3], ids[3:])     # the app's next job: the same selection, by id
    res = wb.run_all()
    assert res.finetune["key"] == first.key and len(trained_steps(events)) == first.steps   # not trained again
    wb.adopt(s, items, ids[:2], ids[2:5])    # the user changed the selection
    res = wb.run_all()
    assert res.finetune["items"] == 5 and res.finetune["key"] != first.key and not res.finetune["cached"]
    assert wb.handle.fingerprint == res.finetune["fingerprint"]


def test_a_given_handle_comes_back_as_it_was_and_a_new_selection_fine_tunes_again(tmp_path):
    h = tiny.handle("llama")
    before, fp = state_hash(h.model), h.fingerprint
    res = run(make_session(tmp_path, FAST), handle=h)
    assert res.finetune["reached"] and state_hash(h.model) == before and h.fingerprint == fp

    s = make_session(tmp_path, dict(FAST, data="retain"))
    wb = Workbench(s, handle=h)
    wb.load_data()
    wb.load_model()
    first = wb.finetune_info
    assert first.items == 3 and wb.load_model() is h and wb.finetune_info is first   # nothing changed: kept
    wb.set_selection(["f0"], ["f1", "f2", "f3", "f4"])
    wb.load_model()
    second = wb.finetune_info
    assert second.items == 4 and second.key != first.key and h.fingerprint == second.fingerprint
    wb.release_finetune()
    assert state_hash(h.model) == before and h.fingerprint == fp and h.finetune is None


def test_removing_finetune_brings_the_base_model_back(tmp_path):
    s = make_session(tmp_path, FAST)
    wb = Workbench(s)
    wb.load_data()
    wb.load_model()
    assert wb.finetune_info is not None
    s.finetune = None
    h = wb.load_model()
    assert wb.finetune_info is None and getattr(h, "finetune", None) is None
    assert state_hash(h.model) == state_hash(tiny.handle("llama").model)


# ----------------------------------------------------------------- retain-only
def test_retain_only_trains_on_the_retain_items_under_its_own_key(tmp_path):
    both = Workbench(make_session(tmp_path, FAST))
    both.load_data()
    both.load_model()
    only = Workbench(make_session(tmp_path, dict(FAST, data="retain")))
    only.load_data()
    only.load_model()
    a, b = both.finetune_info, only.finetune_info
    assert (a.items, b.items) == (6, 3) and a.key != b.key and a.fingerprint != b.fingerprint
    assert not b.cached and b.reached
    retain = only.retain
    assert finetune_first.check_rouge1(only.handle, retain, finetune_first.examples(only.handle, retain)) >= 0.95


def test_finetuned_model_leaves_the_base_alone_and_reuses_the_cache():
    base = tiny.handle("llama")
    before, fp = state_hash(base.model), base.fingerprint
    cfg = FinetuneConfig(**FAST, data="retain")
    retain = facts()[3:]
    twin, info = finetune_first.finetuned_model(base, retain, cfg)
    assert state_hash(base.model) == before and base.fingerprint == fp and getattr(base, "finetune", None) is None
    assert twin.model is not base.model and twin.fingerprint == info.fingerprint != fp and info.reached
    twin2, info2 = finetune_first.finetuned_model(base, retain, cfg)
    assert info2.cached and state_hash(twin2.model) == state_hash(twin.model)
    with pytest.raises(UserError, match="already fine-tuned"):
        finetune_first.finetuned_model(twin, retain, cfg)


def test_all_trains_on_every_item_of_the_pistol_sample(tmp_path, shared_data):
    path = shared_data / "pistol" / "sample_data_1.json"
    s = sessions.loads(f'version = 1\n[model]\nname = "tiny:llama"\n[data]\npath = "{path}"\nformat = "pistol"\n'
                       f'forget = 20\nretain = 0\n[finetune]\ndata = "all"\n', tmp_path / "s.toml")
    wb = Workbench(s)
    wb.load_data()
    assert len(wb.finetune_items(s.finetune)) == 400 == len(wb.items)
    s.finetune = replace(s.finetune, data=str(path))
    assert len(wb.finetune_items(s.finetune)) == 400


# ----------------------------------------------------------------- the session file
MINIMAL = """version = 1
[model]
name = "tiny:llama"
[data]
path = "facts.jsonl"
forget = 3
retain = 3

# teach the model the facts first
[finetune]
until_rouge1 = 0.95   # the issue's minimal form
"""


def test_minimal_table_loads_with_the_defaults_and_round_trips(tmp_path):
    write_facts(tmp_path / "facts.jsonl")
    p = tmp_path / "s.toml"
    p.write_text(MINIMAL)
    s = sessions.load(p)
    assert s.finetune == FinetuneConfig(until_rouge1=0.95)
    assert s.finetune.data == "forget+retain" and s.finetune.tuning == "full" and s.finetune.lr is None
    assert sessions.dumps(s) == MINIMAL                              # unchanged: byte for byte
    s.finetune.lr, s.finetune.tuning = 3e-4, "lora"
    sessions.save(s)
    text = p.read_text()
    assert "# teach the model the facts first" in text and "# the issue's minimal form" in text
    assert sessions.load(p) == s
    s.finetune = None                                                 # removed
    sessions.save(s)
    assert "[finetune]" not in p.read_text() and sessions.load(p).finetune is None
    s.finetune = FinetuneConfig(data="retain", epochs=5)              # added to a file without one
    sessions.save(s)
    assert sessions.load(p) == s


def test_new_session_with_finetune_round_trips(tmp_path):
    s = sessions.new_session(model={"name": "tiny:llama"}, finetune={"data": "retain", "lr": 1e-3, "seed": 7})
    text = sessions.dumps(s)
    assert "[finetune]" in text and "# forget+retain | retain | all" in text
    assert sessions.loads(text) == s
    assert "[finetune]" not in sessions.dumps(sessions.new_session())
    sessions.validate(s)


@pytest.mark.parametrize("line,key,shown", [
    ("until_rouge1 = 1.5", "until_rouge1", "expected a number >= 0 and <= 1, got 1.5"),
    ("until_rouge1 = true", "until_rouge1", "got true"),
    ('lr = "fast"', "lr", 'or "auto", got "fast"'),
    ("lr = 0", "lr", "expected a number > 0"),
    ("lr = nan", "lr", "got nan"),
    ("epochs = 0", "epochs", "expected an integer between 1 and 10000, got 0"),
    ("epochs = 2.5", "epochs", "expected an integer"),
    ('tuning = "lorra"', "tuning", 'expected one of full, lora; got "lorra" (did you mean "lora"?)'),
    ('scope = "layers"', "scope", "expected one of all, blocks, mlp"),
    ("batch_size = 0", "batch_size", "expected an integer between 1 and 1024"),
    ("lora_rank = -1", "lora_rank", "expected an integer between 1 and 1024"),
    ('data = "retian"', "data", '(did you mean "retain"?)'),
    ('data = "missing.json"', "data", 'data file "missing.json" not found'),
    ('data = "builtin:nope"', "data", "unknown built-in data set"),
    ("learning_rate = 1e-4", None, 'unknown key "learning_rate"'),
])
def test_bad_finetune_values_are_one_line_with_file_and_line(tmp_path, capsys, line, key, shown):
    text = 'version = 1\n[model]\nname = "tiny:llama"\n[finetune]\n# fine-tune first\n' + line + "\n[[runs]]\nmethod = \"none\"\n"
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(UserError) as info:
        sessions.load(p)
    msg = str(info.value)
    assert "\n" not in msg and shown in msg
    assert msg.startswith(f"{p}:{line_of(text, line)}: finetune" + (f".{key}:" if key else ":")), msg
    rc, _, err = replay(capsys, str(p))
    assert rc == 2
    error_line(err, f"{p}:{line_of(text, line)}", shown)


def test_finetune_must_be_a_table(tmp_path):
    with pytest.raises(UserError, match="finetune: expected a table"):
        sessions.loads("version = 1\nfinetune = 3\n", tmp_path / "s.toml")


def test_an_empty_training_set_is_a_user_error(tmp_path):
    s = make_session(tmp_path, dict(FAST, data="retain"), retain=0)
    with pytest.raises(UserError) as info:
        run(s)
    assert info.value.where == "finetune.data" and "selects no items" in str(info.value)
