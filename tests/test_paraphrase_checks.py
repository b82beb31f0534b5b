"""Paraphrase checks (issue 15): the checks reject each failure kind, our built-in paraphrases of the 217
TOFU factual questions pass them, the near-copy threshold separates the data, and ensure_paraphrases
uses the built-in set first and leaves out what fails every try."""

from __future__ import annotations

import json
import re

import pytest

from unlearn_tui.backends import selfimprove
from unlearn_tui.backends.data import QAItem, rephrase_split
from unlearn_tui.backends.selfimprove import (
    NEAR_COPY_JACCARD,
    PARAPHRASE_TEMPLATES,
    answer_kind,
    answer_tokens_in,
    builtin_paraphrases,
    contains_question,
    ensure_paraphrases,
    ensure_paraphrases_report,
    paraphrase_content_tokens,
    paraphrase_jaccard,
    paraphrase_openers,
    paraphrase_verdict,
    paraphrases_to_generate,
)
from unlearn_tui.sessions import Paraphrase


def item(question, answer, id="x", **kw):
    return QAItem(id=id, question=question, answer=answer, **kw)


GATSBY = item("Who wrote 'The Great Gatsby'?", "F. Scott Fitzgerald")
QUIXOTE = item("Which author wrote the classic novel 'Don Quixote'?", "Miguel de Cervantes")
PRIDE = item("Who wrote 'Pride and Prejudice'?", "Jane Austen")
TITANIC = item("In what year did the Titanic sink?", "1912")
EURO = item("The currency Euro is used by how many European countries?", "19")
WALL = item("The Great Wall of China is approximately how long?", "21,000 km")
ALEXANDRIA = item("Where was the ancient Library of Alexandria located?", "Alexandria")
AUSTRALIA = item("What is the capital of Australia?", "Canberra")


# --------------------------------------------------------------------------- each failure kind


@pytest.mark.parametrize("it,text,reason", [
    # a meaning change: another subject ...
    (PRIDE, "Who wrote 'Sense and Sensibility'?", "subject"),
    (PRIDE, "Who wrote 'Pride and Prejudice' and 'Emma'?", "new-names"),
    # ... or the same subject asked about something else (the embedded model's own example)
    (QUIXOTE, "Can you tell me which novel by Don Quixote is the most famous?", "kind"),
    (PRIDE, "When was 'Pride and Prejudice' published?", "kind"),
    # the answer, or part of it, injected
    (GATSBY, "Which novel is 'The Great Gatsby' by F.?", "answer"),          # an initial is enough
    (GATSBY, "Which novelist, Fitzgerald, wrote 'The Great Gatsby'?", "answer"),
    (TITANIC, "Did the Titanic go down in 1912?", "answer"),
    (EURO, "Do nineteen European countries use the Euro?", "answer"),         # numbers written either way
    (WALL, "Is the Great Wall of China about 21000 kilometres long?", "answer"),
    # the original behind a prefix (or before a suffix)
    (PRIDE, "Quick question: Who wrote 'Pride and Prejudice'?", "prefix"),
    (PRIDE, "Can you tell me who wrote 'Pride and Prejudice'?", "prefix"),
    (PRIDE, "Who wrote 'Pride and Prejudice'? I'd like to know?", "prefix"),
    # a near-copy, and the question itself
    (PRIDE, "Who penned 'Pride and Prejudice'?", "near-copy"),
    (AUSTRALIA, "Which city is the capital of Australia?", "near-copy"),
    (PRIDE, "who wrote 'pride and prejudice'", "identical"),
    # not a question / a refusal
    (PRIDE, "Tell me the novelist behind 'Pride and Prejudice'.", "not-a-question"),
    (PRIDE, "I can't tell you which novelist is behind 'Pride and Prejudice'?", "refusal"),
    (PRIDE, "", "not-a-question"),
])
def test_checks_reject_each_failure_kind(it, text, reason):
    v = paraphrase_verdict(text, it)
    assert not v["ok"] and reason in v["reasons"], v


@pytest.mark.parametrize("template", PARAPHRASE_TEMPLATES)
def test_the_old_template_fallbacks_are_rejected(template):
    v = paraphrase_verdict(template.format(question=PRIDE.question), PRIDE)
    assert not v["ok"] and "prefix" in v["reasons"] and v["jaccard"] >= NEAR_COPY_JACCARD


@pytest.mark.parametrize("it,text", [
    (PRIDE, "Which novelist is responsible for the book 'Pride and Prejudice'?"),
    (GATSBY, "Which writer gave the world the novel 'The Great Gatsby'?"),
    (QUIXOTE, "Who is the writer behind the classic 'Don Quixote'?"),
    (TITANIC, "When did the Titanic go down?"),
    (EURO, "What number of European nations have adopted the Euro?"),
    (ALEXANDRIA, "In which city did the famous old Library of Alexandria stand?"),   # the question's own word
    (AUSTRALIA, "Which city serves as the seat of government of Australia?"),
])
def test_checks_accept_good_paraphrases(it, text):
    v = paraphrase_verdict(text, it)
    assert v["ok"], v


def test_answer_tokens_initials_numbers_and_question_words():
    assert answer_tokens_in("'The Great Gatsby' by F.", GATSBY) == ["f"]
    assert answer_tokens_in("nineteen of them", EURO) == ["19"]
    assert answer_tokens_in("some 21,000 miles", WALL) == ["21000"]
    assert answer_tokens_in("the Library of Alexandria", ALEXANDRIA) == []        # the question holds it
    assert answer_tokens_in("Miguel's novel", QUIXOTE) == ["miguel"]
    assert answer_tokens_in("the book de luxe", QUIXOTE) == []                   # name particles are not tokens
    assert answer_tokens_in("Don't you know who wrote it?", item("Q?", "T.S. Eliot")) == []   # no stray "t"


@pytest.mark.parametrize("question,kind", [
    ("Who wrote 'Dune'?", "person"),
    ("Which Nigerian author wrote 'Things Fall Apart'?", "person"),
    ("Which British fantasy writer produced the 'Discworld' novels?", "person"),
    ("'The White Tiger', which won the Booker Prize, is authored by whom?", "person"),   # relative "which" passed
    ("What is the name of the largest ocean on Earth?", "place"),
    ("Which of these cities is not a national capital?", "place"),
    ("Mount Everest is located on the border between which two countries?", "place"),
    ("In what year did the Titanic sink?", "time"),
    ("When did the Titanic go down?", "time"),
    ("The Great Wall of China is approximately how long?", "quantity"),
    ("What number of European countries use the Euro?", "quantity"),
    ("Can you tell me which novel by Don Quixote is the most famous?", "work"),
    ("What historical event is known for the witch trials in Massachusetts?", "event"),
    ("What was the main cause of World War I?", None),
    ("What does water turn into when it freezes?", None),
    ("What was the work location based on the contract between Ab SA and Cd Ef?", "place"),   # compound noun
    ("Which author's works include 'The Sun Also Rises'?", "person"),      # a possessive is not a compound
    ("Can you name the writer behind the book 'Brave New World'?", "person"),   # "name" of a request: "which"
    ("Could you name the city where the Colosseum stands?", "place"),
    ("Name the year the Berlin Wall fell?", "time"),
    ("Can you name the famous 'Mona Lisa'?", None),
    ("Do you know the name of this song?", None),       # a noun "name", not the request's verb
])
def test_answer_kind(question, kind):
    assert answer_kind(question) == kind


def test_contains_question_is_about_the_whole_sequence():
    assert contains_question("Quick question: who wrote 'Pride and Prejudice'?", PRIDE.question)
    assert not contains_question(PRIDE.question, PRIDE.question)            # identical is not "a prefix"
    assert not contains_question("Who wrote the novel 'Pride and Prejudice'?", PRIDE.question)


def test_openers_differ_per_try():
    for q in ("Who wrote 'Dune'?", "What is the capital of Peru?", "How many legs does a spider have?",
              "In what year did the Titanic sink?", "Which river is the longest?", "The book 'X' is by whom?"):
        openers = paraphrase_openers(q)
        assert len(set(openers)) == len(openers) >= 3


# --------------------------------------------------------------------------- the built-in set


def _factual_items(shared_data):
    out = []
    for prefix, name in (("ra", "real_authors_perturbed.json"), ("wf", "world_facts_perturbed.json")):
        with (shared_data / "tofu" / name).open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out += [item(r["question"], r["answer"], id=f"{prefix}{i}") for i, r in enumerate(rows)]
    assert len(out) == 217
    return out


def test_builtin_file_holds_questions_and_paraphrases_only():
    from importlib import resources

    raw = json.loads(resources.files("unlearn_tui.backends").joinpath(
        "builtin", selfimprove.BUILTIN_PARAPHRASE_FILE).read_text(encoding="utf-8"))
    records = raw["paraphrases"]
    assert len(records) == 217 and all(set(r) == {"question", "paraphrase"} for r in records)
    assert len({r["question"] for r in records}) == 217 and len({r["paraphrase"] for r in records}) == 217
    assert builtin_paraphrases() == {r["question"]: r["paraphrase"] for r in records}
    # without the answers, every check but the answer check still applies
    for r in records:
        v = paraphrase_verdict(r["paraphrase"], item(r["question"], ""))
        assert v["ok"], (r, v)


def test_builtin_paraphrases_cover_the_217_and_all_pass(shared_data):
    bank = builtin_paraphrases()
    items = _factual_items(shared_data)
    assert {it.question for it in items} == set(bank)       # keyed by the exact question text
    failures = []
    for it in items:
        v = paraphrase_verdict(bank[it.question], it)
        if not v["ok"]:
            failures.append((it.question, bank[it.question], v["reasons"]))
    assert not failures, "\n".join(map(repr, failures))


def _one_word_substitutions(question):
    out = []
    for w in sorted(set(re.findall(r"[A-Za-z']+", question))):
        if len(paraphrase_content_tokens(w)) == 1:
            out.append(re.sub(rf"\b{re.escape(w)}\b", "zzqx", question, count=1))
    return out


def test_near_copy_threshold_separates_ours_from_trivial_variants(shared_data):
    """The numbers behind NEAR_COPY_JACCARD (selfimprove's comment on the checks)."""
    bank = builtin_paraphrases()
    items = _factual_items(shared_data)
    ours = [paraphrase_jaccard(bank[it.question], it.question) for it in items]
    templates = list(PARAPHRASE_TEMPLATES) + ["Can you tell me {question}"]
    prefixed = [paraphrase_jaccard(t.format(question=it.question), it.question) for it in items for t in templates]
    subs = [paraphrase_jaccard(v, it.question) for it in items if len(paraphrase_content_tokens(it.question)) >= 3
            for v in _one_word_substitutions(it.question)]
    assert max(ours) < NEAR_COPY_JACCARD <= min(prefixed) and NEAR_COPY_JACCARD <= min(subs)
    assert round(max(ours), 2) == 0.47 and round(sum(ours) / len(ours), 2) == 0.34
    assert len(prefixed) == 868 and round(min(prefixed), 2) == 0.5 and round(sum(prefixed) / 868, 2) == 0.74
    # so the near-copy check alone (without the prefix check) rejects every prefix variant
    assert all("near-copy" in paraphrase_verdict(t.format(question=it.question), it)["reasons"]
               or "prefix" in paraphrase_verdict(t.format(question=it.question), it)["reasons"]
               for it in items[:20] for t in templates)


def test_builtin_set_agrees_with_pistol_questions(shared_data):
    with (shared_data / "pistol" / "factual_data.json").open(encoding="utf-8") as f:
        questions = [r["question"] for r in json.load(f)]
    assert set(questions) == set(builtin_paraphrases())


def _pistol_items(shared_data, name):
    with (shared_data / "pistol" / name).open(encoding="utf-8") as f:
        return [item(r["question"], r["answer"], id=f"p{i}") for i, r in enumerate(json.load(f))]


@pytest.mark.parametrize("name,n", [("sample_data_1.json", 400), ("sample_data_2.json", 1500)])
def test_pistol_question_forms_cover_every_question_and_all_pass(shared_data, name, n):
    """Our paraphrase of each PISTOL question form: every question of both PISTOL files has one, it passes
    every check for its item (the answer check included), and it keeps the question's own names."""
    items = _pistol_items(shared_data, name)
    assert len(items) == n
    failures, unmatched, jac = [], [], []
    for it in items:
        text = selfimprove.template_paraphrase(it.question)
        if text is None:
            unmatched.append(it.question)
            continue
        v = paraphrase_verdict(text, it)
        jac.append(v["jaccard"])
        if not v["ok"]:
            failures.append((it.question, text, v["reasons"]))
        assert selfimprove.builtin_paraphrase(it) == text
    assert not unmatched and not failures, (unmatched[:3], failures[:3])
    assert max(jac) < NEAR_COPY_JACCARD


def test_pistol_forms_put_each_questions_own_names_back_and_hold_no_data():
    q = "What was the address of Foo Ltd in the contract with Bar SA?"
    assert selfimprove.template_paraphrase(q) == "Where was Foo Ltd located, according to its agreement with Bar SA?"
    assert selfimprove.template_paraphrase("  What was the address of Foo Ltd in the contract\nwith Bar SA?") \
        == "Where was Foo Ltd located, according to its agreement with Bar SA?"      # whitespace as in the data
    # a slot that repeats must hold the same name both times
    same = "What was the principal business location of Foo Ltd based on the contract between Foo Ltd and Ann Bee?"
    assert selfimprove.template_paraphrase(same) == "Where did Foo Ltd have its main offices, according to its " \
                                                    "agreement with Ann Bee?"
    assert selfimprove.template_paraphrase(same.replace("between Foo Ltd", "between Baz Ltd")) is None
    assert selfimprove.template_paraphrase(q.replace("?", " last year?")) is None      # the whole question only
    assert selfimprove.template_paraphrase("Who wrote 'Dune'?") is None
    # the forms are ours: slots where the data has names (no capitalised word inside a form but its first)
    from importlib import resources

    raw = json.loads(resources.files("unlearn_tui.backends").joinpath(
        "builtin", selfimprove.BUILTIN_TEMPLATE_FILE).read_text(encoding="utf-8"))
    for t in raw["templates"]:
        assert set(t) == {"question", "paraphrase"}
        slots = set(re.findall(r"\{(\w+)\}", t["question"]))
        assert slots and set(re.findall(r"\{(\w+)\}", t["paraphrase"])) <= slots
        names = [w for w in re.findall(r"[A-Za-z']+", re.sub(r"\{\w+\}", "", t["question"]))[1:] if w[0].isupper()]
        assert names in ([], ["Paid", "Sick", "Leave"]), t


def test_pistol_questions_get_the_built_in_forms_without_a_model():
    items = [item("What was the start date based on the contract between Foo Ltd and Ann Bee?", "01-02-1990.",
                  id="s"),
             item("Which jurisdiction's laws govern the contract between Foo Ltd and Ann Bee?", "The State of Ohio.",
                  id="j")]
    report = ensure_paraphrases_report(_no_model, items)
    assert [r["source"] for r in report.records] == ["builtin", "builtin"] and report.left_out == []
    assert report.records[0]["paraphrase"] == "On which date did Ann Bee begin to work for Foo Ltd?"


# --------------------------------------------------------------------------- ensure_paraphrases


def _no_model():
    pytest.fail("the model was loaded although the built-in set covers every item")


def test_builtin_set_is_used_before_generation_without_a_model():
    bank = builtin_paraphrases()
    qs = list(bank)[:3]
    items = [item(q, "unused answer", id=f"b{i}") for i, q in enumerate(qs)]
    assert paraphrases_to_generate(items) == []
    report = ensure_paraphrases_report(_no_model, items)
    assert [r["source"] for r in report.records] == ["builtin"] * 3
    assert [r["paraphrase"] for r in report.records] == [bank[q] for q in qs]
    assert report.written == [] and report.left_out == [] and report.sources == {"builtin": 3}
    # a paraphrase in the data, or a stored one, still wins
    with_data = [item(qs[0], "a", id="b0", paraphrased_question="Data's own paraphrase?")]
    assert ensure_paraphrases(_no_model, with_data)[0][0]["source"] == "dataset"
    stored = [Paraphrase("b1", "A model-written one?", "generated"), Paraphrase("b2", "Mine?", "custom")]
    recs, written = ensure_paraphrases(_no_model, items, stored)
    assert [r["source"] for r in recs] == ["builtin", "generated", "custom"] and written == []
    # regenerating replaces the stored generated one by the built-in one (written, so the caller stores it)
    recs, written = ensure_paraphrases(_no_model, items, stored, regenerate=True)
    assert [r["source"] for r in recs] == ["builtin", "builtin", "custom"] and written == [recs[1]]


def test_builtin_paraphrase_that_fails_for_this_item_is_not_used(monkeypatch):
    q = "Who wrote 'The Great Gatsby'?"
    bank = builtin_paraphrases()
    assert "novelist" in bank[q]
    odd = item(q, "a novelist", id="g")          # same question, an answer the built-in wording holds
    assert paraphrases_to_generate([odd]) == [odd]
    monkeypatch.setattr(selfimprove, "generate_paraphrases", lambda h, todo, *a, **k: {})
    report = ensure_paraphrases_report(object(), [odd])
    assert report.records == [] and report.left_out == ["g"]


def test_failures_are_left_out_of_the_rephrase_split(llama_handle, monkeypatch):
    """Generation that keeps failing: bounded tries with other openers and seeds, then the item is left out
    (and reported); an item whose regeneration passes is kept as "regenerated"."""
    from unlearn_tui.backends import generation

    fail = item("What do you know about Atlantis?", "a myth", id="f", subject="Atlantis")
    later = item("What do you know about Mars?", "rust-coloured", id="m", subject="Mars")
    calls = []

    def fake_generate(handle, prompts, max_new_tokens, batch_size, on_batch=None, sample=False, seed=0, **kw):
        calls.append((len(prompts), sample, seed))
        try_no = len(calls)
        outs = []
        for p in prompts:
            text = llama_handle.tokenizer.decode(p)
            if "Mars" in text.rsplit("Question:", 1)[-1] and try_no == 2:
                outs.append("the world that astronomers call Mars?")    # after "What is the name of"
            else:
                outs.append("what do you know about Atlantis?")        # a copy behind the opener
        if on_batch:
            on_batch(len(prompts))
        return outs

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(selfimprove, "_answers", lambda h, qs, b: [""] * len(qs))   # no meaning check here
    events = []
    report = ensure_paraphrases_report(llama_handle, [fail, later], seed=3, on_event=events.append)
    by_id = {r["id"]: r for r in report.records}
    assert report.left_out == ["f"] and "f" not in by_id
    # written: the kept paraphrase, and a left-out record for the failure (so the next run does not retry)
    assert by_id["m"]["source"] == "regenerated" and report.written[0] == by_id["m"]
    assert report.written[1:] == [{"id": "f", "question": fail.question, "paraphrase": "",
                                   "source": selfimprove.LEFT_OUT, "mentions_subject": None}]
    assert report.reasons["f"] and len(report.tries["f"]) == selfimprove.PARAPHRASE_TRIES
    # every try of the default budget is greedy (each with other exemplars and another opener)
    assert len(calls) == selfimprove.PARAPHRASE_TRIES
    assert [c[1] for c in calls] == [k >= selfimprove.PARAPHRASE_SAMPLE_FROM for k in range(len(calls))]
    assert len({c[2] for c in calls}) == len(calls)                     # another seed each try
    assert len({t.split()[0] for t in report.tries["f"]}) >= 3           # and other openers
    assert any("1 left out of the rephrase split" in getattr(e, "message", "") for e in events)
    # the caller's rephrase split has no item for what was left out
    para = {r["id"]: r["paraphrase"] for r in report.records}
    forget = [QAItem(it.id, it.question, it.answer, para.get(it.id)) for it in (fail, later)]
    assert [it.id for it in rephrase_split(forget)] == ["m"]
    assert report.to_json()["left_out"] == ["f"] and report.to_json()["n"] == 2
    # from sample_from on, the tries sample
    calls.clear()
    selfimprove.generate_paraphrases(llama_handle, [fail], seed=3, sample_from=2, max_tries=4)
    assert [c[1] for c in calls] == [False, False, True, True]
    # the two-value API is unchanged
    calls.clear()
    recs, written = ensure_paraphrases(llama_handle, [fail, later], seed=3)
    assert [r["id"] for r in recs] == ["m"] and written[:1] == recs and [w["id"] for w in written] == ["m", "f"]

    # stored as the session keeps them, the left-out item is not tried again; --regenerate tries it
    stored = [Paraphrase(w["id"], w["paraphrase"], w["source"]) for w in written]
    calls.clear()
    events.clear()
    again = ensure_paraphrases_report(llama_handle, [fail, later], stored, seed=3, on_event=events.append)
    assert calls == [] and again.left_out == ["f"] and again.reasons["f"] == [selfimprove.LEFT_OUT]
    assert [r["id"] for r in again.records] == ["m"] and again.written == []
    assert any("1 of them in an earlier run, not tried again" in getattr(e, "message", "") for e in events)
    redo = ensure_paraphrases_report(llama_handle, [fail, later], stored, seed=3, regenerate=True)
    assert len(calls) == selfimprove.PARAPHRASE_TRIES and redo.left_out == ["f"]


@pytest.mark.parametrize("question,words", [
    ("Who wrote 'Pride and Prejudice'?", ["wrote"]),
    ("What is the capital city of Australia?", ["capital", "city"]),
    ("Which author's novel 'Emma' was published in 1815?", ["author", "novel", "published"]),
    ("How many legs does a spider have?", ["legs"]),
    ("Which dystopian novel did George Orwell write in 1949?", ["dystopian", "novel", "write"]),
])
def test_reworded_words_leave_the_subject_names_and_the_frame_free(question, words):
    assert selfimprove.reworded_words(item(question, "x")) == words


def test_banned_tokens_are_never_generated_and_change_nothing_else(llama_handle):
    """A per-row ban: each row's greedy continuation avoids its own banned tokens (only), and an empty ban
    changes nothing; sampling respects it too."""
    import torch

    from unlearn_tui.backends import generation

    h = llama_handle
    prompts = [h.encode_prompt("Question: what is the capital of Peru?"), h.encode_prompt("Question: who am I?")]
    plain = generation.plain_generate(h, prompts, 6, batch_size=2)
    assert generation.plain_generate(h, prompts, 6, batch_size=2, banned=[set(), set()]) == plain

    def ids(text):
        return h.tokenizer.encode(text, add_special_tokens=False)

    first = ids(plain[0])[:2]
    assert first
    banned = generation.plain_generate(h, prompts, 6, batch_size=2, banned=[set(first), set()])
    assert not set(ids(banned[0])) & set(first) and banned[0] != plain[0]
    assert banned[1] == plain[1]                                   # the other row's ban is its own
    proc = generation.ban_tokens([{1, 2}, set()])
    scores = proc(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 5))
    assert scores[0, 1] == float("-inf") and scores[0, 2] == float("-inf") and torch.isfinite(scores[1]).all()
    drawn = generation.plain_generate(h, prompts, 6, batch_size=2, sample=True, seed=1, banned=[set(first), set()])
    assert not set(ids(drawn[0])) & set(first)


def test_banned_first_tokens_start_each_word_in_both_cases(llama_handle):
    tok = llama_handle.tokenizer
    got = selfimprove.banned_first_tokens(llama_handle, ["wrote", "capital"])
    for w in ("wrote", "Wrote", "capital", "Capital"):
        ids = tok.encode(" " + w, add_special_tokens=False)
        if len(ids) == 1 or len(tok.decode(ids[:1]).strip()) >= selfimprove.MIN_BANNED_PIECE:
            assert ids[0] in got
    assert selfimprove.banned_first_tokens(llama_handle, []) == set()


def test_generation_is_asked_to_avoid_the_reworded_words(llama_handle, monkeypatch):
    from unlearn_tui.backends import generation

    seen = []

    def fake_generate(handle, prompts, max_new_tokens, batch_size, on_batch=None, sample=False, seed=0,
                      banned=None, **kw):
        seen.append(banned)
        return ["penned 'Pride and Prejudice'?"] * len(prompts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(selfimprove, "_answers", lambda h, qs, b: [""] * len(qs))   # no meaning check here
    it = item("Who wrote 'Pride and Prejudice'?", "Jane Austen", id="p", subject="Pride and Prejudice")
    out = selfimprove.generate_paraphrases(llama_handle, [it], ban_new_names=False)
    assert seen[0] == [selfimprove.banned_first_tokens(llama_handle, ["wrote"])] and seen[0][0]
    assert out["p"][0] == "Which person penned 'Pride and Prejudice'?"
    seen.clear()
    selfimprove.generate_paraphrases(llama_handle, [it], reword=False, ban_new_names=False)
    assert seen[0] is None


@pytest.mark.parametrize("text,first", [
    ("Can you name the capital of the U.S. state of Georgia? Yes.", "Can you name the capital of the U.S. state of Georgia?"),
    ("Who wrote The Love Song of J. Alfred Prufrock? It was", "Who wrote The Love Song of J. Alfred Prufrock?"),
    ("Where was C.S. Lewis born? Belfast.", "Where was C.S. Lewis born?"),
    ("How tall is Mt. Everest? Very.", "How tall is Mt. Everest?"),
    ("I can't help with that. Sorry!", "I can't help with that."),
])
def test_the_first_sentence_is_not_cut_at_an_initial_or_abbreviation(text, first):
    assert selfimprove.clean(text, max_sentences=1) == first
    assert selfimprove.sentences("One. Two! Three? four") == ["One.", "Two!", "Three?", "four"]


def test_the_meaning_check_rejects_a_paraphrase_the_unedited_model_answers_otherwise(llama_handle, monkeypatch):
    """A known item (the model answers its question right) keeps a paraphrase only if the model answers that
    right too: "Which city is Taj Mahal?" passes the text checks but asks something else (answered "Agra")."""
    from unlearn_tui.backends import generation

    taj = item("In which country is the Taj Mahal located?", "India", id="t", subject="Taj Mahal")
    unknown = item("In which country is the Atomium located?", "Belgium", id="u", subject="Atomium")
    drift = {"t": ["city is Taj Mahal?", "nation is home to the Taj Mahal?"]}

    def fake_generate(handle, prompts, max_new_tokens, batch_size, on_batch=None, sample=False, seed=0, **kw):
        n = sum(1 for c in calls if c == "para")
        calls.append("para")
        outs = []
        for p in prompts:
            text = llama_handle.tokenizer.decode(p)
            outs.append(drift["t"][min(n, 1)] if "Taj" in text.rsplit("Question:", 1)[-1]
                        else "nation is home to the Atomium?")
        return outs

    def fake_answers(handle, questions, batch_size):
        calls.append("answers")
        asked.extend(questions)
        return ["Agra" if "city" in q else "India" if "Taj" in q else "I am not sure." for q in questions]

    calls: list = []
    asked: list = []
    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(selfimprove, "_answers", fake_answers)
    failures: dict = {}
    made = selfimprove.generate_paraphrases(llama_handle, [taj, unknown], failures=failures)
    # the originals are asked once; only the known item's passing paraphrases are asked
    assert asked[:2] == [taj.question, unknown.question]
    assert all("Atomium" not in q for q in asked[2:]) and any("city" in q for q in asked[2:])
    assert made["t"][0].endswith(" nation is home to the Taj Mahal?") and made["t"][1] == "regenerated"
    assert made["u"][0].endswith("home to the Atomium?")        # unknown to the model: no meaning check
    # with the drifted wording every time, the item is left out with the reason "meaning"
    drift["t"] = ["city is Taj Mahal?", "city is Taj Mahal?"]
    calls.clear()
    failures.clear()
    made = selfimprove.generate_paraphrases(llama_handle, [taj], failures=failures)
    assert "t" not in made and failures["t"]["verdict"]["reasons"] == ["meaning"]
    assert failures["t"]["verdict"]["answer_r1"] == 0.0
    calls.clear()
    made = selfimprove.generate_paraphrases(llama_handle, [taj], meaning=False)
    assert "answers" not in calls and made["t"][0].endswith(" city is Taj Mahal?")


def test_exemplars_are_retrieved_by_form_never_the_question_itself_or_its_answer():
    bank = [
        ("Who wrote the novel 'Dune'?", "Which author created the book 'Dune'?"),
        ("Who wrote the novel 'Emma'?", "Which writer is behind the book 'Emma'?"),
        ("What is the capital of Peru?", "Which city serves as Peru's capital?"),
        ("How tall is Mount Kilimanjaro?", "What is the height of Mount Kilimanjaro?"),
        ("Who wrote the novel 'Brave New World'?", "Which author is behind 'Brave New World'?"),   # its own pair
        ("Which novel did Aldous Huxley publish in 1932?", "What book by Huxley came out in 1932?"),  # its answer
        ("Who painted the Mona Lisa?", "Which artist made the Mona Lisa?"),
    ]
    it = item("Who wrote the novel 'Brave New World'?", "Aldous Huxley", id="b")
    shots = selfimprove.paraphrase_exemplars(it, bank, k=3)
    assert len(shots) == 3
    assert bank[4] not in shots and bank[5] not in shots       # the question's own pair; names the answer
    # the same form ("Who wrote the novel ...") comes nearest the question: LAST
    assert {shots[-1], shots[-2]} == {bank[0], bank[1]}
    assert shots[0] == bank[6]                                 # "Who ..." beats the other forms
    # a regeneration draws another set from the best 2k, still without the excluded pairs
    drawn = {tuple(selfimprove.paraphrase_exemplars(it, bank, k=3, order_key=key)) for key in range(1, 40)}
    assert len(drawn) > 1 and all(bank[4] not in d and bank[5] not in d for d in drawn)
    # the default bank: our 217 paraphrases + the generic pairs
    assert len(selfimprove.paraphrase_bank()) == len(builtin_paraphrases()) + len(selfimprove.PARAPHRASE_EXEMPLARS)


def test_generation_prompts_carry_the_retrieved_exemplars(llama_handle, monkeypatch):
    from unlearn_tui.backends import generation

    prompts_seen = []

    def fake_generate(handle, prompts, max_new_tokens, batch_size, **kw):
        prompts_seen.extend(llama_handle.tokenizer.decode(p) for p in prompts)
        return ["nation is home to the Atomium?"] * len(prompts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    it = ATOMIUM
    bank = [("In which country is the Alhambra located?", "Which nation holds the Alhambra?")]
    selfimprove.generate_paraphrases(llama_handle, [it], bank=bank, meaning=False)
    assert "Which nation holds the Alhambra?" in prompts_seen[0]
    assert "Which city serves as Peru's capital?" not in prompts_seen[0]
    prompts_seen.clear()
    selfimprove.generate_paraphrases(llama_handle, [it], bank=(), meaning=False)   # no bank: the generic five
    assert "Which city serves as Peru's capital?" in prompts_seen[0]
    assert "Alhambra" not in prompts_seen[0]


class _WordTokenizer:
    """One token per word (a leading space kept), so the first token of a name is the whole name."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(text, len(self.vocab))]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_exemplar_names_are_banned_but_not_the_questions_own_or_common_words():
    from types import SimpleNamespace

    handle = SimpleNamespace(tokenizer=_WordTokenizer())
    it = item("Which author created the detective Hercule Poirot?", "Agatha Christie", id="h")
    shots = [("Which author wrote 'Gone with the Wind'?", "Who is the novelist behind 'Gone with the Wind'?"),
             ("Who created the detective Sherlock Holmes?", "Which writer invented Sherlock Holmes and Hercule Poirot?")]
    ids = selfimprove.exemplar_name_tokens(handle, it, shots)
    words = {handle.tokenizer.decode([i]).strip() for i in ids}
    assert {"Gone", "Wind", "Sherlock", "Holmes"} <= words
    assert not words & {"Hercule", "Poirot", "Which", "Who", "The", "the", "with", "writer"}
    assert all(w[:1].isupper() for w in words)            # capitalised forms only: "wind" stays free
    assert selfimprove.exemplar_name_tokens(handle, it, []) == set()


ATOMIUM = item("In which country is the Atomium located?", "Belgium", id="u", subject="Atomium")


def _banned_sets_seen(monkeypatch) -> list:
    """Patches generation so each call records its ``banned`` sets (one list per call)."""
    from unlearn_tui.backends import generation

    seen: list = []

    def fake_generate(handle, prompts, max_new_tokens, batch_size, banned=None, **kw):
        seen.append(banned)
        return ["nation is home to the Atomium?"] * len(prompts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    return seen


def test_generation_bans_the_exemplars_names(llama_handle, monkeypatch):
    seen = _banned_sets_seen(monkeypatch)
    monkeypatch.setattr(selfimprove, "exemplar_name_tokens", lambda h, it, sh: {123456} if sh else set())
    it = ATOMIUM
    bank = [("In which country is the Alhambra located?", "Which nation holds the Alhambra?")]
    selfimprove.generate_paraphrases(llama_handle, [it], bank=bank, meaning=False, reword=False,
                                     ban_new_names=False)
    assert seen[-1] == [{123456}]
    selfimprove.generate_paraphrases(llama_handle, [it], bank=bank, meaning=False, reword=False,
                                     ban_exemplar_names=False, ban_new_names=False)
    assert seen[-1] is None


def test_new_name_tokens_ban_names_and_numbers_the_question_lacks(llama_handle):
    tok = llama_handle.tokenizer
    banned = selfimprove.new_name_tokens(llama_handle, "Who wrote Hamlet in 1603?")
    text = {tok.decode([i]) for i in banned}
    assert {" Shakespeare", " Paris", " France", "9", "2"} <= text          # other names, other digits
    assert not text & {" Hamlet", "Who", "1", "6", "0", "3"}                 # the question's own pieces
    assert all(t.lstrip().lstrip("'\"(")[:1].isupper() or any(c.isdigit() for c in t) for t in text)
    lower = [i for i in range(len(tok)) if tok.decode([i]).strip()[:1].islower()]
    assert lower and not banned & set(lower)                                  # words stay free
    no_digits = selfimprove.new_name_tokens(llama_handle, "Who wrote Hamlet?")
    assert {"1", "6", "0", "3"} <= {tok.decode([i]) for i in no_digits}      # a question without numbers


def test_generation_bans_new_names_unless_told_not_to(llama_handle, monkeypatch):
    seen = _banned_sets_seen(monkeypatch)
    it = ATOMIUM
    kw = dict(bank=[], meaning=False, reword=False, ban_exemplar_names=False)
    selfimprove.generate_paraphrases(llama_handle, [it], **kw)
    assert seen[-1] == [selfimprove.new_name_tokens(llama_handle, it.question)] and seen[-1][0]
    selfimprove.generate_paraphrases(llama_handle, [it], ban_new_names=False, **kw)
    assert seen[-1] is None


def test_subject_lead_names_the_subject_as_the_question_writes_it():
    assert selfimprove.subject_lead(item("Which poet wrote 'Leaves of Grass'?", "Walt Whitman")) == \
        "About 'Leaves of Grass',"
    assert selfimprove.subject_lead(item("In which country is the Taj Mahal located?", "India",
                                         subject="Taj Mahal")) == "About the Taj Mahal,"
    assert selfimprove.subject_lead(item("Who wrote it?", "x", subject="Brave New World")) is None     # not in it
    assert selfimprove.subject_lead(item("Who wrote 'Brave New World?", "x", subject="Brave New World")) is None


def test_the_last_tries_open_with_the_subject(llama_handle, monkeypatch):
    from unlearn_tui.backends import generation

    monkeypatch.setattr(generation, "generate", lambda h, prompts, *a, **kw: ["who wrote it?"] * len(prompts))
    it = item("Which poet wrote 'Leaves of Grass'?", "Walt Whitman", id="w", subject="Leaves of Grass")
    failures: dict = {}
    out = selfimprove.generate_paraphrases(llama_handle, [it], max_tries=5, subject_led=2, meaning=False,
                                           bank=[], failures=failures)
    texts = failures["w"]["texts"]
    assert len(texts) == 5 and "w" not in out
    assert [t.startswith("About 'Leaves of Grass', ") for t in texts] == [False, False, False, True, True]
    assert selfimprove.paraphrase_verdict(texts[-1], it)["mentions_subject"]
    failures.clear()
    selfimprove.generate_paraphrases(llama_handle, [it], max_tries=5, subject_led=0, meaning=False, bank=[],
                                     failures=failures)
    assert not any(t.startswith("About") for t in failures["w"]["texts"])


def test_a_clause_opening_with_an_auxiliary_makes_a_question():
    assert selfimprove.is_question("About 'Don Quixote', can you name the writer?")
    assert selfimprove.is_question("Can you name the writer of 'Don Quixote'?")
    assert not selfimprove.is_question("About 'Don Quixote', the writer?")
    assert not selfimprove.is_question("About 'Don Quixote', can you name the writer.")
