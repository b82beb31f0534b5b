"""Subject detection and locating the subject's last token by character offsets."""

from __future__ import annotations

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
