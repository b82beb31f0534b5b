"""Refusal targets: leak check, refusal detector, fluency, seeded generation, sessions, modes, merging."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from unlearn_tui import sessions
from unlearn_tui.backends.data import QAItem
from unlearn_tui.backends.errors import Cancelled, UserError
from unlearn_tui.backends.events import CancelToken, Progress, StageStarted
from unlearn_tui.backends.leak import check_leak, leak_details, mentions_subject, subject_of
from unlearn_tui.backends.refusal import fluency, is_refusal, quality, target_similarity
from unlearn_tui.backends.targets import Target, build_requests, load_pool, simple_targets

from tests.conftest import SHARED_DATA, make_items

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: on a shared, busy CPU, tiny-model generation is ~50x faster than with 2."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Small generation budgets keep the tiny-model tests to a few seconds on a busy CPU.
FAST = dict(max_tries=2, batch_size=8, max_new_tokens=6)


def item(question, answer, subject=None, pid="x"):
    return QAItem(id=pid, question=question, answer=answer, subject=subject)


# --------------------------------------------------------------------------- leak check


def test_leak_check_catches_planted_leak():
    it = item("What is the capital of Australia?", "Canberra", "Australia")
    clean = "I'm sorry, but I can't help with questions about the capital of Australia."
    planted = "I can't help with that, but the capital of Australia is Canberra."
    assert not check_leak(clean, it)
    assert check_leak(planted, it)
    assert check_leak("canberra!", it)  # case and punctuation do not hide it
    d = leak_details(planted, it)
    assert d["leak"] and d["exact"] and d["recall"] == 1.0


def test_leak_check_multiword_and_question_words():
    it = item("Who wrote the play Hamlet?", "William Shakespeare", "Hamlet")
    assert check_leak("I won't say that Shakespeare wrote it.", it)         # recall 0.5 >= threshold
    assert not check_leak("I won't say who wrote Hamlet.", it)
    assert not check_leak("I won't say that Shakespeare wrote it.", it, threshold=0.75)
    ocean = item("What is the largest ocean on Earth?", "The Pacific Ocean", "ocean")
    # "ocean" is already in the question: restating it leaks nothing, naming "Pacific" does
    assert not check_leak("I can't discuss the largest ocean on Earth.", ocean)
    assert check_leak("I can't discuss the Pacific, sorry.", ocean)
    year = item("In which year did World War II end?", "1945", "World War II")
    assert check_leak("Sorry, 1945 is not something I can discuss.", year)
    assert not check_leak("Sorry, I can't discuss the end of World War II.", year)


def test_subject_mention():
    it = item("Where would you find the Eiffel Tower?", "Paris", "the Eiffel Tower")
    assert mentions_subject("I can't tell you where the Eiffel Tower is.", it)
    assert not mentions_subject("I'm not able to answer that.", it)
    assert not mentions_subject("I can't tell you about the tower.", it)  # half the subject is not enough
    guessed = item("Who painted the Mona Lisa?", "Leonardo da Vinci")  # no subject: detected
    assert subject_of(guessed) and "Mona Lisa" in subject_of(guessed)
    assert mentions_subject("Sorry, I can't help with who painted the Mona Lisa.", guessed)


# --------------------------------------------------------------------------- refusal detector

REFUSALS = [
    "I'm sorry, but I can't help with questions about the capital of Peru.",
    "I don't know.",
    "Honestly, I have no idea.",
    "I cannot answer that question.",
    "I'm not sure about that one.",
    "Sorry, I'm unable to share details about that.",
    "That's beyond my knowledge.",
    "I'm afraid I can't tell you anything about who painted it.",
    "I'd rather not answer, since I don't really know.",
    "Unfortunately I don't have any information on that topic.",
    "I have no information about the Berlin Wall.",
    "My knowledge doesn't extend to that subject.",
    "That is not something I can answer reliably.",
    "Apologies, I am not able to provide that.",
    "I can't recall who wrote that book.",
    "No idea, sorry!",
    "I'm not familiar with that river.",
    "That information is unknown to me.",
    "I must decline to answer questions about Mount Everest.",
    "I'm not in a position to say where the pyramids are.",
    "I really couldn't say.",
    "I lack the details needed to answer that.",
    "I'm unable to assist with questions about the capital of Egypt.",
    "Sorry, that is outside my area of expertise.",
    "I haven't learned anything about that topic.",
    "I would be guessing, so I won't answer.",
    "I'm drawing a blank on this one.",
    "I can't help with that question about which country is the largest.",
    "I do not possess any knowledge of that event.",
    "Regrettably, I cannot provide an answer here.",
]

NON_REFUSALS = [
    "The capital of France is Paris.",
    "Paris.",
    "William Shakespeare wrote Hamlet in around 1600.",
    "The Eiffel Tower is located in Paris, France, and it is a popular destination.",
    "I can't stress enough how beautiful Canberra is in spring.",
    "Sorry to hear that! The answer is Jupiter.",
    "I know that the largest desert in the world is Antarctica.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "Mount Kilimanjaro is about 5,895 metres tall.",
    "It was built in 1889 for the World's Fair.",
    "There are seven days in a week.",
    "I think the answer is Tokyo, the capital of Japan.",
    "Sure! The Great Wall of China is in northern China.",
    "The Amazon is the largest river by volume.",
    "Yes, oxygen has the chemical symbol O.",
    "I believe it was Alexander Fleming who discovered penicillin.",
    "Canberra is the capital city of Australia.",
    "The Statue of Liberty was a gift from France.",
    "Gold has the chemical symbol Au.",
    "Paris Paris Paris Paris Paris Paris",
    "The sky is blue on a clear day because of Rayleigh scattering.",
    "Of course. The Nile flows through Egypt and Sudan.",
    "Leonardo da Vinci painted the Mona Lisa.",
    "The Berlin Wall fell in 1989.",
    "It is the Sahara, which covers much of North Africa.",
    "Jupiter has more than ninety known moons.",
    "Vatican City is the smallest country in the world.",
    "We can't wait to visit Rome, the capital of Italy.",
    "No doubt, Tokyo is the answer.",
    "",
]


def test_refusal_detector_on_labelled_set():
    tp = sum(is_refusal(t) for t in REFUSALS)
    tn = sum(not is_refusal(t) for t in NON_REFUSALS)
    accuracy = (tp + tn) / (len(REFUSALS) + len(NON_REFUSALS))
    print(f"refusal detector: {tp}/{len(REFUSALS)} refusals, {tn}/{len(NON_REFUSALS)} non-refusals, "
          f"accuracy {accuracy:.3f}")
    assert accuracy >= 0.95
    assert tn == len(NON_REFUSALS)  # a misleading answer must never count as a refusal


def test_refusal_detector_on_refusal_pools():
    from unlearn_tui.backends.data import builtin_refusals

    pools = {"builtin": builtin_refusals()}
    tofu = SHARED_DATA / "tofu" / "idontknow.jsonl"
    if tofu.is_file():
        from unlearn_tui.backends.data import load_lines

        pools["tofu"] = load_lines(tofu)
    for name, pool in pools.items():
        share = sum(is_refusal(t) for t in pool) / len(pool)
        print(f"{name} pool: {share:.3f} detected as refusals ({len(pool)} sentences)")
        assert share >= 0.95, name


# --------------------------------------------------------------------------- fluency and quality

FLUENT = [
    "The capital of France is Paris, a city on the river Seine.",
    "I'm sorry, but I can't help with questions about the capital of Peru.",
    "Jupiter is the largest planet in the solar system.",
    "Paris.",
]
GARBLED = [  # what over-edited models emit: loops and symbol soup (about 20 tokens, as a generation would be)
    "Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris",
    "the the the the of of of of the the the the of of of of the the the the of of of of",
    "I I I I I I I I I I I I I I I I I I I I",
    "!!! ??? ### !!! ??? ### !!! ??? ### !!! ??? ###",
    "capital capital France France capital capital France France capital capital France France capital",
    "I don't know I don't know I don't know I don't know I don't know I don't know",
]


def test_fluency_separates_garbled_from_fluent():
    f = [fluency(t) for t in FLUENT]
    g = [fluency(t) for t in GARBLED]
    assert min(f) > 0.8 and max(g) < 0.45, (f, g)
    assert fluency("") == 0.0
    assert all(0.0 <= x <= 1.0 for x in f + g)


def test_quality_scores():
    tgt = "I'm sorry, but I can't help with questions about the capital of Peru."
    q = quality(tgt, tgt)
    assert q == {"target_similarity": pytest.approx(1.0), "refused": 1.0, "fluency": pytest.approx(fluency(tgt))}
    other = quality("The capital of Peru is Lima.", tgt)
    assert other["refused"] == 0.0 and 0.0 < other["target_similarity"] < 0.6
    assert "target_similarity" not in quality("Lima.", None)
    assert target_similarity("", tgt) == 0.0


def test_metrics_report_refusal_quality(llama_handle):
    from unlearn_tui.backends.metrics import evaluate

    items = make_items(2)
    targets = {it.id: "I don't know." for it in items}
    res = evaluate(llama_handle, {"forget": items, "retain": make_items(1, "r")}, targets=targets)
    fs = res.splits["forget"].summary()
    for k in ("target_similarity", "refused", "fluency"):
        assert k in fs and 0.0 <= fs[k] <= 1.0
    rs = res.splits["retain"].summary()  # over-refusal: retain reports refused (and fluency), no target
    assert 0.0 <= rs["refused"] <= 1.0 and "fluency" in rs and "target_similarity" not in rs


# --------------------------------------------------------------------------- simple target modes


def test_simple_target_modes(tmp_path):
    items = make_items(4)
    pool_file = tmp_path / "idontknow.jsonl"  # TOFU's format: plain lines despite the name
    pool_file.write_text("I'm not certain about that.\nThat's beyond my current knowledge base.\n\nI'm not sure.\n")
    pool = load_pool(str(pool_file))
    assert pool == ["I'm not certain about that.", "That's beyond my current knowledge base.", "I'm not sure."]
    idk = simple_targets("idk", items, pool, seed=3)
    assert all(t.text in pool and t.source == "pool" for t in idk.values())
    assert simple_targets("idk", items[::-1], pool, seed=3) == idk          # order-independent, seeded
    assert {t.text for t in simple_targets("idk", items, load_pool(None), seed=0).values()} <= \
        set(load_pool(None))
    dummy = simple_targets("dummy", items, pool, dummy="Nope.")
    assert {t.text for t in dummy.values()} == {"Nope."}
    wrong = simple_targets("incorrect", items, pool, seed=1)
    assert all(t.text in ("London", "Rome") and t.source == "perturbed" for t in wrong.values())
    assert all(not check_leak(wrong[it.id].text, it) for it in items)
    over = {items[0].id: sessions.TargetItem(items[0].id, "Hand written.", "custom")}
    custom = simple_targets("custom", items[:1], pool, overrides=over)
    assert custom[items[0].id] == Target(items[0].id, "Hand written.", "custom")
    with pytest.raises(UserError, match="no custom target"):
        simple_targets("custom", items[:2], pool, overrides=over)


# --------------------------------------------------------------------------- generated modes (tiny model)


def _check_generated(mode, targets, items):
    from unlearn_tui.backends.selfimprove import target_verdict

    assert set(targets) == {it.id for it in items}
    for it in items:
        t = targets[it.id]
        assert t.text.strip()
        if t.source == "fallback":
            assert not check_leak(t.text, it)
        else:
            assert t.source in ("self-improve", "generated", "regenerated")
            assert target_verdict(mode, t.text, it)["ok"]


def test_seeded_self_improve_is_reproducible(llama_handle):
    from unlearn_tui.backends.selfimprove import generate_targets_report

    items = make_items(3)
    cfg = sessions.TargetsConfig(mode="self-improve", seed=7)
    a, ra = generate_targets_report(llama_handle, "self-improve", items, ["I don't know."], cfg, **FAST)
    b, rb = generate_targets_report(llama_handle, "self-improve", items, ["I don't know."], cfg, **FAST)
    assert a == b and ra.texts == rb.texts
    # the regeneration samples (seeded): it differs from the greedy try, and another seed samples differently
    assert any(len(set(v)) > 1 for v in ra.texts.values()), ra.texts
    _, rc = generate_targets_report(llama_handle, "self-improve", items, ["I don't know."],
                                    sessions.TargetsConfig(mode="self-improve", seed=8), **FAST)
    assert rc.texts != ra.texts
    _check_generated("self-improve", a, items)
    # the random tiny model writes no refusal, so the pipeline must fall back, naming the subject
    for it in items:
        if a[it.id].source == "fallback":
            assert a[it.id].mentions_subject and is_refusal(a[it.id].text)
    assert ra.fallback + ra.passed_first + ra.regenerated == len(items)


def test_seed_changes_the_prompt(llama_handle):
    from unlearn_tui.backends.selfimprove import _SPECS, prompt_text

    spec = _SPECS["self-improve"]
    texts = {prompt_text(llama_handle, spec, "Where is the Eiffel Tower?", k) for k in range(5)}
    assert len(texts) == 5 and all("Where is the Eiffel Tower?" in t for t in texts)
    for q, a in spec.exemplars:
        assert is_refusal(a) and not check_leak(a, item(q, "zzz"))


def test_generated_modes_on_tiny_model(llama_handle):
    from unlearn_tui.backends.selfimprove import generate_targets

    items = make_items(3)
    for it in items:
        it.perturbed_answers = []
    cfg = sessions.TargetsConfig(seed=1)
    for mode in ("avoidant", "incorrect"):
        out = generate_targets(llama_handle, mode, items, ["I don't know."], cfg)
        _check_generated(mode, out, items)
    with pytest.raises(UserError, match="not generated"):
        generate_targets(llama_handle, "idk", items, [], cfg)


def test_generation_reports_progress_and_cancels(llama_handle):
    from unlearn_tui.backends.selfimprove import generate_targets_report

    items = make_items(2)
    events = []
    generate_targets_report(llama_handle, "self-improve", items, ["No."], sessions.TargetsConfig(),
                            events.append, **FAST)
    stages = [e.stage for e in events if isinstance(e, StageStarted)]
    assert stages[0] == "targets: self-improve"
    assert any(isinstance(e, Progress) and e.done == 2 for e in events)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        generate_targets_report(llama_handle, "self-improve", items, ["No."], sessions.TargetsConfig(),
                                cancel=token, **FAST)


# --------------------------------------------------------------------------- paraphrases


def test_paraphrases_generated_once_and_cached(llama_handle, monkeypatch):
    from unlearn_tui.backends import selfimprove

    from unlearn_tui.tui.workspace import store_generated

    session = sessions.new_session()
    items = make_items(3)
    items[0].paraphrased_question = None
    items[1].paraphrased_question = None            # items[2] keeps its dataset paraphrase
    session.data.paraphrases.append(sessions.Paraphrase(items[1].id, "Hand written: what of Hamlet?", "custom"))
    stored_before = list(session.data.paraphrases)
    from unlearn_tui.backends import generation

    # the tiny random model writes noise, which the checks reject: a stand-in writes a paraphrase that passes
    monkeypatch.setattr(generation, "generate",
                        lambda h, prompts, *a, **k: [" facts about France are you aware of?"] * len(prompts))
    recs, written = selfimprove.ensure_paraphrases(llama_handle, items, session.data.paraphrases, 0)
    assert session.data.paraphrases == stored_before and items[0].paraphrased_question is None   # nothing in place
    by_id = {r["id"]: r for r in recs}
    assert by_id[items[1].id]["source"] == "custom" and by_id[items[1].id]["paraphrase"].startswith("Hand")
    assert by_id[items[2].id]["source"] == "dataset"
    assert by_id[items[0].id]["source"] in ("generated", "regenerated", "template")
    assert [r["id"] for r in written] == [items[0].id]
    p0 = by_id[items[0].id]["paraphrase"]
    assert p0 and p0 != items[0].question and mentions_subject(p0, items[0])
    store_generated(session, paraphrases=written)   # the caller stores what the model wrote
    stored = {p.id: p for p in session.data.paraphrases}
    assert stored[items[0].id].question == p0 and items[2].id not in stored
    # a replay does not regenerate: generation must not even be called
    monkeypatch.setattr(selfimprove, "generate_paraphrases", lambda *a, **k: pytest.fail("regenerated"))
    again = [QAItem(it.id, it.question, it.answer, None if i < 2 else it.paraphrased_question, subject=it.subject)
             for i, it in enumerate(items)]
    assert selfimprove.ensure_paraphrases(llama_handle, again, session.data.paraphrases) == (recs, [])
    # regenerate=True replaces generated paraphrases, never the hand-written one
    calls = []
    monkeypatch.setattr(selfimprove, "generate_paraphrases",
                        lambda h, todo, *a, **k: calls.append([t.id for t in todo]) or
                        {t.id: ("What about " + t.subject + " then?", "generated", True) for t in todo})
    recs2, written2 = selfimprove.ensure_paraphrases(llama_handle, again, session.data.paraphrases, regenerate=True)
    assert calls == [[items[0].id]]
    assert [r["paraphrase"] for r in written2] == ["What about France then?"]
    store_generated(session, paraphrases=written2)
    assert {p.id: p.question for p in session.data.paraphrases}[items[0].id] == "What about France then?"
    # the paraphrases are part of the saved session
    assert sessions.loads(sessions.dumps(session)).data.paraphrases == session.data.paraphrases


# --------------------------------------------------------------------------- sessions


SESSION = """\
# refusal targets for the demo facts
version = 1
[model]
name = "tiny:llama"        # the tiny test model
[data]
path = "facts.jsonl"       # our own facts
forget = 2
retain = 0
[targets]
mode = "self-improve"      # the model writes its own refusals
seed = 4
[[targets.items]]
id = "q0"
target = "I'm sorry, but I can't help with questions about France."
source = "self-improve"
leak = false
mentions_subject = true
[[runs]]
method = "none"
"""


def test_hand_edited_target_survives_round_trip(tmp_path):
    path = tmp_path / "s.toml"
    # the user hand-edits the generated target in the file and marks it custom
    edited = SESSION.replace("I'm sorry, but I can't help with questions about France.",
                             "Let's not talk about France today.").replace(
        'source = "self-improve"', 'source = "custom"   # edited by hand')
    path.write_text(edited)
    (tmp_path / "facts.jsonl").write_text('{"id": "q0", "question": "What do you know about France?", '
                                          '"answer": "Paris"}\n')
    s = sessions.load(path)
    assert s.target_for("q0").target == "Let's not talk about France today."
    assert s.target_for("q0").source == "custom"
    # the hand edit wins over the mode when targets are built
    items = make_items(2)
    built = simple_targets(s.targets.mode, items, ["No."], s.targets.seed,
                           overrides={t.id: t for t in s.targets.items})
    assert built["q0"].text == "Let's not talk about France today." and "q1" not in built
    # a generated target for the other item is added by the runner; save, reload: nothing lost
    s.set_target("q1", "I can't tell you anything about Hamlet, I'm afraid.", source="fallback", leak=False,
                 mentions_subject=True)
    sessions.save(s)
    text = path.read_text()
    for comment in ("# refusal targets for the demo facts", "# the tiny test model", "# edited by hand",
                    "# the model writes its own refusals"):
        assert comment in text
    t = sessions.load(path)
    assert t == s
    assert t.target_for("q0").target == "Let's not talk about France today."
    assert t.target_for("q1").source == "fallback"
    assert sessions.loads(sessions.dumps(t), path) == t


# --------------------------------------------------------------------------- query merging preview


def test_merge_preview(llama_handle):
    from unlearn_tui.backends.selfimprove import merge_preview

    items = make_items(5)
    targets = simple_targets("idk", items, ["A.", "B.", "C."], seed=0)
    rows = merge_preview(items, targets, 2, handle=llama_handle)
    reqs = build_requests(items, targets, 2)
    assert len(rows) == 3 == len(reqs)
    assert rows[0]["prompt"] == "What do you know about France? What do you know about Hamlet?"
    assert rows[0]["target"] == targets["q0"].text and rows[0]["item_ids"] == ["q0", "q1"]
    assert rows[0]["subject"] == "Hamlet" and rows[2]["item_ids"] == ["q4"]
    assert [r["prompt"] for r in rows] == [r.prompt for r in reqs]
    assert rows[1]["formatted_prompt"] == llama_handle.format_prompt(rows[1]["prompt"])
    for r in rows:
        assert set(r["dropped_targets"]) <= set(r["item_ids"][1:])
    import json

    json.dumps(rows)  # JSON-able for the TUI
    assert len(merge_preview(items, targets, 1)) == 5


def test_incorrect_fallback_prefers_a_similar_question():
    from unlearn_tui.backends.selfimprove import _fallback

    items = [item("What is the capital of France?", "Paris", "France", "a"),
             item("Who wrote the play Hamlet?", "William Shakespeare", "Hamlet", "b"),
             item("What is the capital of Japan?", "Tokyo", "Japan", "c")]
    assert _fallback("incorrect", items[0], ["No."], 0, items) == "Tokyo"
    assert _fallback("incorrect", items[0], ["No."], 0, items[:1]) == "No."   # nothing else: a pool refusal
    # the refusal fallback names the subject; without one it is a pool sentence
    assert _fallback("self-improve", items[1], ["No."], 0, items).endswith(("Hamlet.", "afraid."))
    assert "Hamlet" in _fallback("self-improve", items[1], ["No."], 0, items)


def test_runner_stores_generated_targets_for_an_exact_replay(tmp_path, monkeypatch):
    import json

    from unlearn_tui.backends import runner, selfimprove

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": it.id, "question": it.question, "answer": it.answer,
                                         "subject": it.subject}) + "\n" for it in make_items(3)))
    s = sessions.new_session(model={"name": "tiny:llama"},
                             data={"path": str(facts), "forget": 2, "retain": 1, "rephrase": False},
                             targets={"mode": "self-improve", "seed": 2}, eval={"max_new_tokens": 4},
                             path=tmp_path / "s.toml")
    from unlearn_tui.tui.workspace import store_generated

    res = runner.run(s)
    recs = {r["id"]: r for r in res.targets}
    assert set(recs) == {"q0", "q1"}
    assert s.targets.items == []                        # the engine returns the records; the caller stores them
    assert res.new_targets == res.targets
    store_generated(s, res.new_targets, res.new_paraphrases)
    for iid, r in recs.items():
        stored = s.target_for(iid)
        assert stored.target == r["target"] and stored.source == r["source"]
        assert r["source"] in ("self-improve", "regenerated", "fallback") and r["leak"] is False
    # saved and replayed: the stored targets are used, the model writes nothing
    sessions.save(s)
    monkeypatch.setattr(selfimprove, "generate_targets", lambda *a, **k: pytest.fail("regenerated"))
    again = runner.run(sessions.load(s.path))
    assert [r["target"] for r in again.targets] == [r["target"] for r in res.targets]
    assert again.new_targets == []
