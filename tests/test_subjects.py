"""Subject detection and locating the subject's last token by character offsets."""

from __future__ import annotations

import re

import pytest

from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.subjects import detect_subject, find_last, resolve_subject, subject_last_token
from unlearn_tui.backends.targets import Request, build_requests, simple_targets


@pytest.mark.parametrize("question,subject", [
    ("What is the capital of France?", "France"),
    ("Who painted the Mona Lisa?", "Mona Lisa"),
    ("Who was the first president of the United States of America?", "United States of America"),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice"),
    ("How many legs does a spider have?", "a spider"),
    ("What gas do plants absorb from the air?", "the air"),
    ("What is the boiling point of water?", "water"),
])
def test_detect_subject(question, subject):
    assert detect_subject(question) == subject


def test_detect_subject_merged_prompt_uses_last_question():
    assert detect_subject("What is the capital of France? Who painted the Mona Lisa?") == "Mona Lisa"


def test_resolve_subject_prefers_given_and_errors_name_item():
    r = Request(prompt="What is the capital of France?", target="No idea.", subject="France", item_ids=["a"],
                questions=["What is the capital of France?"])
    assert resolve_subject(r) == "France"
    r2 = Request(prompt="???", target="No idea.", subject=None, item_ids=["q7"], questions=["???"])
    with pytest.raises(UserError) as e:
        resolve_subject(r2)
    assert "q7" in str(e.value)


def test_last_token_by_offsets_in_chat_prompt(llama_handle):
    h = llama_handle
    text = h.format_prompt("What do you know about France?")
    ids, idx = subject_last_token(h.tokenizer, text, "France")
    assert ids == h.encode_prompt(text)
    piece = h.tokenizer.decode(ids[:idx + 1])
    assert piece.rstrip().endswith("France")
    assert "France" not in h.tokenizer.decode(ids[idx + 1:])


def test_merged_prompt_uses_last_occurrence(llama_handle):
    from conftest import make_items

    h = llama_handle
    items = make_items(13)  # items 0 and 12 share the subject "France"
    group = [items[0], items[1], items[12]]
    targets = simple_targets("idk", group, ["I don't know."])
    (req,) = build_requests(group, targets, merge_factor=3)
    assert req.prompt == " ".join(it.question for it in group)
    assert req.subject == "France"
    text = h.format_prompt(req.prompt)
    ids, idx = subject_last_token(h.tokenizer, text, req.subject)
    start, end = find_last(text, "France")
    assert start > text.find("France")  # the second occurrence
    enc = h.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    s, e = enc["offset_mapping"][idx]
    assert s < end <= e or e == end


def test_missing_subject_is_user_error_naming_item(llama_handle):
    h = llama_handle
    text = h.format_prompt("What is the capital of France?")
    with pytest.raises(UserError) as e:
        subject_last_token(h.tokenizer, text, "Atlantis", where="item f3")
    assert "Atlantis" in str(e.value) and "f3" in str(e.value)


def test_case_insensitive_fallback(llama_handle):
    h = llama_handle
    text = h.format_prompt("what do you know about france?")
    ids, idx = subject_last_token(h.tokenizer, text, "France")
    assert h.tokenizer.decode(ids[:idx + 1]).rstrip().endswith("france")


# --------------------------------------------------------------------------- quoted titles, sentences


@pytest.mark.parametrize("question,subject", [
    ("Which author wrote the dystopian novel 'Brave New World'?", "Brave New World"),
    ("Who wrote the historical fiction novel 'I, Claudius'?", "I, Claudius"),
    ("Which author is famous for writing 'The Canterbury Tales'?", "The Canterbury Tales"),
    ("Which Indian author is known for the book 'Midnight's Children'?", "Midnight's Children"),  # inner apostrophe
    ("Which Kenyan author wrote 'Weep Not, Child'?", "Weep Not, Child"),
    ("Which poet wrote 'The Love Song of J. Alfred Prufrock'?", "The Love Song of J. Alfred Prufrock"),
    ("Who is the author of 'Les Misérables'?", "Les Misérables"),                                 # accents
    ("Which poet is famous for writing 'Do not go gentle into that good night'?",
     "Do not go gentle into that good night"),                                                    # lower case inside
    ("Who penned 'The Hobbit' and 'The Lord of the Rings' series?", "The Hobbit"),               # the first title
    ('Who wrote \u201cWar and Peace\u201d?', "War and Peace"),                                    # curly double quotes
    ("Who wrote \u2018Emma\u2019?", "Emma"),
    ('What is the name of the "Iron Lady"?', "Iron Lady"),
    ("Who sang rock 'n' roll songs in Memphis?", "Memphis"),                                      # 'n' is no title
])
def test_quoted_titles_are_detected_whole_without_quotes(question, subject):
    assert detect_subject(question) == subject


@pytest.mark.parametrize("question,subject", [
    ("In which city was John F. Kennedy assassinated?", "John F. Kennedy"),      # "F." ends no sentence
    ("The historic site Alcatraz Island is located in which U.S. state?", "Alcatraz Island"),
    ("Who is the president of the U.S.?", "U.S."),                                # an abbreviation keeps its dot
    ("What is the name of the deepest known location in the Earth's oceans?", "Earth"),   # possessive dropped
    ("What is the name of the Les Mis\u00e9rables author?", "Les Mis\u00e9rables"),
    ("Which world event is marked by the storming of the Bastille in 1789?", "Bastille"),  # a year is weak
    ("What ship famously sank on its maiden voyage in April 1912?", "April 1912"),         # ... unless alone
    ("The Nobel Prizes are awarded in Stockholm, Sweden in all categories except one, which is awarded in "
     "Oslo, Norway. Which category is it?", "Nobel Prizes"),                              # "it": read the context
    ("Who invented the telephone?", "telephone"),                                 # no leading verb
    ("Which country was the first to use paper money?", "paper money"),
    ("Tell me about France. Tell me about Spain.", "Spain"),                      # merged: the last one
    ("What is the capital of France? How many legs does a spider have?", "a spider"),
])
def test_sentences_initials_and_weak_runs(question, subject):
    assert detect_subject(question) == subject


# Subjects of the 217 TOFU factual questions that are right by the rules above but weak as subjects (no
# capitalised name and no quoted title in the question, so the noun phrase after the last preposition
# is taken).  Pinned so a change is seen; none of them is a stray-punctuation or partial-title failure.
KNOWN_WEAK = {
    "Which river is the longest in the world?": "the world",
    "What is the largest desert in the world?": "the world",
    "What is the smallest country in the world by area?": "area",
    "What is the largest mammal in the world?": "the world",
    "What is the name of the largest rainforest on the planet?": "the planet",
    "Which country is famous for its fjords?": "fjords",
    "What is the name of the largest continent?": "the largest continent",
    "Which of these cities is not a national capital?": "a national capital",
    "What is the name of the world's largest coral reef system?": "the world's largest coral reef system",
    "What is the most populous city in the world?": "the world",
    "What is the name of the highest uninterrupted waterfall in the world?": "the world",
    "Which country is the largest by area?": "area",
    "What is the largest island in the world?": "the world",
    "What is the name of the largest freshwater lake in the world by surface area?": "surface area",
    "Which country first sent an object into space?": "space",
    "What was the first country to grant women the right to vote?": "vote",
    "Who is known for developing the theory of relativity?": "relativity",
    "What was the largest contiguous empire in history?": "history",
    "Who was the first person to circumnavigate the globe?": "circumnavigate the globe",
    "Who wrote the influential communist manifesto?": "influential communist manifesto",
    # capitalised, but not what the question is about: an adjective or a year
    "The catastrophic nuclear accident that occurred in 1986 is associated with which power plant?": "1986",
    "The currency Euro is used by how many European countries?": "European",
    "Which South American country is named after the Italian city of Venice?": "South American",
    "Who was the South African president who ended apartheid?": "South African",
}
_QUOTED = re.compile(r"(?:^|(?<=[\s(]))['\u2018\"\u201c](.+?)['\u2019\"\u201d](?=[\s?.!,;:)]|$)")


def _factual_questions(shared_data):
    import json

    out = []
    for name in ("real_authors_perturbed.json", "world_facts_perturbed.json"):
        with (shared_data / "tofu" / name).open(encoding="utf-8") as f:
            out += [json.loads(line)["question"] for line in f if line.strip()]
    assert len(out) == 217
    return out


def test_subjects_of_the_217_factual_questions(shared_data):
    """Over TOFU's 217 factual questions: a subject for each, occurring in the question, never starting or
    ending with a quote or punctuation, and the full title for every question with a quoted title.

    Known weak subjects (formally fine) are pinned in KNOWN_WEAK above; there are no known failures."""
    bad = []
    for q in _factual_questions(shared_data):
        s = detect_subject(q)
        if not s or find_last(q, s) is None:
            bad.append((q, s, "missing"))
            continue
        if not (s[0].isalnum() and (s[-1].isalnum() or s.endswith("."))) or s.endswith("'s"):
            bad.append((q, s, "stray punctuation"))
        titles = _QUOTED.findall(q)
        if titles and s != titles[0]:
            bad.append((q, s, f"expected the title {titles[0]!r}"))
        if q in KNOWN_WEAK and s != KNOWN_WEAK[q]:
            bad.append((q, s, f"pinned {KNOWN_WEAK[q]!r}"))
    assert not bad, "\n".join(map(repr, bad))
    n_titles = sum(1 for q in _factual_questions(shared_data) if _QUOTED.findall(q))
    assert n_titles == 98    # 94 of the 100 real-authors questions and 4 world facts quote a title
