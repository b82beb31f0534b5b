"""Tests for backends.data: loaders, errors, selection, built-in sets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from unlearn_tui.backends import data, net
from unlearn_tui.backends.data import QAItem, builtin_names, builtin_refusals, load_items, load_lines, rephrase_split, select
from unlearn_tui.backends.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def error_of(fn, *args, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert "\n" not in str(err)
    return err


RECORDS = [
    {"question": "What is the capital of France?", "answer": "Paris",
     "paraphrased_question": "Which city is France's capital?", "perturbed_answer": ["Lyon", "Nice", "Lille"]},
    {"question": "What is 2+2?", "answer": "4"},
    {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "subject": "Hamlet"},
]


# --------------------------------------------------------------------------- import cost


def test_import_is_cheap():
    code = ("import sys, backends.data; "
            "heavy = [m for m in ('torch', 'datasets', 'pyarrow', 'pandas', 'transformers', 'textual') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- JSON / JSONL


def test_json_array(tmp_path):
    path = write(tmp_path / "qa.json", json.dumps(RECORDS))
    items = load_items(str(path))
    assert [it.id for it in items] == ["0", "1", "2"]
    first = items[0]
    assert first.question == "What is the capital of France?" and first.answer == "Paris"
    assert first.paraphrased_question == "Which city is France's capital?"
    assert first.perturbed_answers == ["Lyon", "Nice", "Lille"]
    assert first.subject is None and first.extra == {}
    assert items[1].paraphrased_question is None and items[1].perturbed_answers == []
    assert items[2].subject == "Hamlet"


def test_json_object_with_data_key(tmp_path):
    path = write(tmp_path / "qa.json", json.dumps({"version": 2, "data": RECORDS}))
    assert len(load_items(str(path))) == 3
    path = write(tmp_path / "other.json", json.dumps({"meta": {}, "facts": RECORDS}))
    assert len(load_items(str(path))) == 3  # the only list in the object


def test_jsonl_and_json_that_is_jsonl(tmp_path):
    a = load_items(str(write_jsonl(tmp_path / "qa.jsonl", RECORDS)))
    b = load_items(str(write_jsonl(tmp_path / "qa.json", RECORDS)))  # TOFU style
    c = load_items(str(write_jsonl(tmp_path / "qa.data", RECORDS)))  # sniffed
    assert a == b == c and len(a) == 3


def test_blank_lines_and_bom_in_jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(("\ufeff" + json.dumps(RECORDS[0]) + "\n\n   \n" + json.dumps(RECORDS[1]) + "\n").encode())
    assert [it.answer for it in load_items(str(path))] == ["Paris", "4"]


def test_jsonl_extension_holding_an_array(tmp_path):
    path = write(tmp_path / "qa.jsonl", json.dumps(RECORDS, indent=2))
    assert len(load_items(str(path))) == 3


def test_empty_spec():
    assert "no data given" in error_of(load_items, "  ").message


def test_relative_path_uses_base_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "qa.jsonl", RECORDS)
    assert len(load_items("sub/qa.jsonl", base_dir=tmp_path)) == 3
    assert len(load_items(Path("sub/qa.jsonl"), base_dir=tmp_path)) == 3


def test_aliases_ids_and_extra(tmp_path):
    recs = [
        {"id": 7, "prompt": "Capital of Peru?", "target": "Lima", "rephrase": "Peru's capital city?",
         "perturbed_answers": "Cusco | Arequipa", "subject": "Peru", "topic": "geo"},
        {"id": "x", "prompt": "Capital of Chile?", "target": 123, "perturbed_answers": '["A", "B"]'},
    ]
    items = load_items(str(write_jsonl(tmp_path / "qa.jsonl", recs)))
    assert [it.id for it in items] == ["7", "x"]
    assert items[0].question == "Capital of Peru?" and items[0].answer == "Lima"
    assert items[0].paraphrased_question == "Peru's capital city?"
    assert items[0].perturbed_answers == ["Cusco", "Arequipa"]
    assert items[0].extra == {"topic": "geo"}
    assert items[1].answer == "123" and items[1].perturbed_answers == ["A", "B"]


@pytest.mark.parametrize("qkey,akey", [("query", "output"), ("input", "gold"), ("src", "ground_truth")])
def test_other_column_names(tmp_path, qkey, akey):
    path = write_jsonl(tmp_path / "qa.jsonl", [{qkey: "Q?", akey: "A"}])
    [item] = load_items(str(path))
    assert (item.question, item.answer) == ("Q?", "A")


def test_values_are_stripped(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "  Q?\n", "answer": " A "}])
    [item] = load_items(str(path))
    assert (item.question, item.answer) == ("Q?", "A")


# --------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    err = error_of(load_items, str(path))
    assert err.where == str(path)
    assert "not found" in err.message and ".json" in err.message


def test_directory_is_rejected(tmp_path):
    err = error_of(load_items, str(tmp_path))
    assert err.where == str(tmp_path) and "directory" in err.message


def test_malformed_json(tmp_path):
    path = write(tmp_path / "bad.json", '[{"question": "Q", "answer": "A"},\n {"question": }]')
    err = error_of(load_items, str(path))
    assert err.where == str(path) and "invalid JSON" in err.message and "line 2" in err.message


def test_malformed_jsonl_names_the_line(tmp_path):
    good = json.dumps(RECORDS[0])
    for name in ("bad.jsonl", "bad.json"):
        path = write(tmp_path / name, f"{good}\n{good}\n\n{{oops\n")
        err = error_of(load_items, str(path))
        assert err.where == str(path) and "line 4" in err.message and "JSON object per line" in err.message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "bad.jsonl", json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    err = error_of(load_items, str(path))
    assert "line 2" in err.message and "array" in err.message


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"question": "caf\xe9?", "answer": "x"}\n'.encode("latin-1"))
    assert "UTF-8" in error_of(load_items, str(path)).message


def test_empty_files(tmp_path):
    for name, text in [("e.json", ""), ("e.jsonl", "\n  \n"), ("e.csv", ""), ("a.json", "[]")]:
        path = write(tmp_path / name, text)
        err = error_of(load_items, str(path))
        assert err.where == str(path)
        assert "empty" in err.message or "no records" in err.message or "no rows" in err.message


def test_wrong_json_shapes(tmp_path):
    err = error_of(load_items, str(write(tmp_path / "s.json", '"just text"')))
    assert "string" in err.message and "array" in err.message
    err = error_of(load_items, str(write(tmp_path / "o.json", '{"a": 1, "b": 2}')))
    assert "a, b" in err.message and "data" in err.message
    err = error_of(load_items, str(write(tmp_path / "n.json", '[{"question": "Q", "answer": "A"}, 5]')))
    assert "record 1" in err.message and "object" in err.message


def test_no_question_or_answer_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"text": "Q", "label": "A"}])
    err = error_of(load_items, str(path))
    assert err.where == str(path)
    assert "no question column" in err.message
    assert "text, label" in err.message  # columns found
    assert "question, prompt, query, input, src" in err.message  # accepted names
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q", "label": "A"}])
    err = error_of(load_items, str(path))
    assert "no answer column" in err.message and "answer, target, output, ground_truth, gold" in err.message


def test_empty_question_or_answer(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [RECORDS[0], {"question": "   ", "answer": "A"}])
    err = error_of(load_items, str(path))
    assert err.where == str(path) and "line 2" in err.message and "empty question" in err.message
    path = write(tmp_path / "qa.json", json.dumps([RECORDS[0], {"question": "Q", "answer": None}]))
    err = error_of(load_items, str(path))
    assert "record 1" in err.message and "empty answer" in err.message
    path = write_jsonl(tmp_path / "missing.jsonl", [RECORDS[0], {"question": "Q"}])
    assert "empty answer" in error_of(load_items, str(path)).message


def test_non_text_value(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": {"a": 1}, "answer": "A"}])
    assert "expected text" in error_of(load_items, str(path)).message


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": "a", "question": "Q1", "answer": "A"},
                                               {"id": "b", "question": "Q2", "answer": "B"},
                                               {"id": "a", "question": "Q3", "answer": "C"}])
    err = error_of(load_items, str(path))
    assert err.where == str(path) and "duplicate id 'a'" in err.message
    assert "line 1" in err.message and "line 3" in err.message


def test_unknown_format_and_undetectable_type(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", RECORDS)
    assert "unknown data format" in error_of(load_items, str(path), format="xml").message
    path = write(tmp_path / "notes", "hello there\nsecond line\n")
    assert "cannot tell the file type" in error_of(load_items, str(path)).message


def test_explicit_format_overrides_extension(tmp_path):
    path = write(tmp_path / "qa.txt", "question,answer\nQ?,A\n")
    assert load_items(str(path), format="csv")[0].answer == "A"
    path = write_jsonl(tmp_path / "qa.txt2", RECORDS)
    assert len(load_items(str(path), format="jsonl")) == 3


# --------------------------------------------------------------------------- CSV / Parquet


def test_csv(tmp_path):
    path = write(tmp_path / "qa.csv",
                 'id,question,answer,perturbed_answer,subject,note\n'
                 'a1,"What is the capital of France, in Europe?",Paris,Lyon|Nice|Lille,France,hi\n'
                 '\n'
                 'a2,How many hours in a day?,24,,,\n')
    items = load_items(str(path))
    assert [it.id for it in items] == ["a1", "a2"]
    assert items[0].question == "What is the capital of France, in Europe?"
    assert items[0].perturbed_answers == ["Lyon", "Nice", "Lille"]
    assert items[0].subject == "France" and items[0].extra == {"note": "hi"}
    assert items[1].answer == "24" and items[1].subject is None and items[1].perturbed_answers == []


def test_tsv_and_csv_errors(tmp_path):
    path = write(tmp_path / "spaced.csv", "question, answer\nQ?, A\n")
    assert load_items(str(path))[0].answer == "A"
    path = write(tmp_path / "qa.tsv", "prompt\ttarget\nQ?\tA\n")
    assert load_items(str(path))[0].answer == "A"
    path = write(tmp_path / "empty_answer.csv", "question,answer\nQ1,A1\nQ2,\n")
    err = error_of(load_items, str(path))
    assert "line 3" in err.message and "empty answer" in err.message
    path = write(tmp_path / "cols.csv", "q,a\nQ,A\n")
    err = error_of(load_items, str(path))
    assert "found q, a" in err.message
    path = write(tmp_path / "header_only.csv", "question,answer\n")
    assert "no rows" in error_of(load_items, str(path)).message
    path = write(tmp_path / "wide.csv", "question,answer\nQ,A,extra\n")
    assert "more values" in error_of(load_items, str(path)).message


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "question": ["What is the capital of Japan?", "What is the capital of Egypt?"],
        "answer": ["Tokyo", "Cairo"],
        "perturbed_answers": [["Osaka", "Kyoto", "Nara"], ["Giza", "Luxor", "Aswan"]],
        "edge": ["A_B", "B_C"],
    })
    path = tmp_path / "qa.parquet"
    pq.write_table(table, path)
    items = load_items(str(path))
    assert [it.answer for it in items] == ["Tokyo", "Cairo"]
    assert items[1].perturbed_answers == ["Giza", "Luxor", "Aswan"]
    assert items[0].extra == {"edge": "A_B"} and items[0].id == "0"
    sniffed = tmp_path / "qa.bin"
    sniffed.write_bytes(path.read_bytes())
    assert load_items(str(sniffed)) == items


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    err = error_of(load_items, str(path))
    assert err.where == str(path) and "Parquet" in err.message


# --------------------------------------------------------------------------- TOFU / PISTOL / EasyEdit records


def test_tofu_forget_records(tmp_path):
    recs = [{"question": "Q1?", "answer": "A1", "paraphrased_question": "Q1 again?",
             "paraphrased_answer": "A1 again", "perturbed_answer": ["x", "y", "z"]}]
    path = write_jsonl(tmp_path / "forget01_perturbed.json", recs)
    for fmt in ("auto", "tofu"):
        [item] = load_items(str(path), format=fmt)
        assert item.paraphrased_question == "Q1 again?"
        assert item.perturbed_answers == ["x", "y", "z"]
        assert item.extra == {"paraphrased_answer": "A1 again"}


def test_explicit_formats_pin_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q", "target": "A"}])
    err = error_of(load_items, str(path), format="tofu")
    assert "TOFU" in err.message and "expected one of question" in err.message
    assert "PISTOL" in error_of(load_items, str(path), format="pistol").message


def test_pistol_records(tmp_path):
    recs = [{"question": "Q1?", "answer": "A1.", "edge": "A_B"}, {"question": "Q2?", "answer": "A2.", "edge": "B_C"}]
    path = write(tmp_path / "sample.json", json.dumps(recs, indent=4))
    items = load_items(str(path), format="pistol")
    assert [it.extra["edge"] for it in items] == ["A_B", "B_C"]
    assert load_items(str(path)) == items


EASYEDIT = [
    {"case_id": 11, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "ground_truth": ["French", "Francais"], "subject": "Danielle Darrieux",
     "rephrase_prompt": "Danielle Darrieux's native language is",
     "locality_prompt": "The mother tongue of Jacques Chirac is", "locality_ground_truth": "French",
     "portability": {"Logical_Generalization": []}},
    {"case_id": 12, "prompt": "Toko Yasuda plays the", "target_new": "piano", "ground_truth": "guitar",
     "subject": "Toko Yasuda", "rephrase_prompt": "Toko Yasuda is a player of the",
     "locality_prompt": "Daniel Johns plays the", "locality_ground_truth": "guitar"},
]


def test_easyedit_records(tmp_path):
    path = write(tmp_path / "counterfact.json", json.dumps(EASYEDIT))
    for fmt in ("auto", "easyedit"):
        items = load_items(str(path), format=fmt)
        first = items[0]
        assert first.id == "11"
        assert first.question == "The mother tongue of Danielle Darrieux is"
        assert first.answer == "French"  # the first ground truth: the fact to forget
        assert first.subject == "Danielle Darrieux"
        assert first.paraphrased_question == "Danielle Darrieux's native language is"
        assert first.extra["target_new"] == "English"
        assert first.extra["locality_prompt"] == "The mother tongue of Jacques Chirac is"
        assert first.extra["locality_ground_truth"] == "French"
        assert "portability" in first.extra
        assert items[1].answer == "guitar"


def test_easyedit_zsre_and_counterfact_shapes(tmp_path):
    zsre = [{"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
             "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
             "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
             "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}]
    [item] = load_items(str(write(tmp_path / "zsre.json", json.dumps(zsre))), format="easyedit")
    assert item.question == "What university did Watts Humphrey attend?"
    assert item.answer == "Illinois Institute of Technology"
    assert item.paraphrased_question.startswith("What university did Watts Humphrey take")
    assert item.extra["alt"] == "University of Michigan" and item.extra["loc_ans"] == "Hugo Weaving"

    rome = [{"case_id": 0, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Danielle Darrieux, a native speaker of"]}]
    [item] = load_items(str(write(tmp_path / "cf.json", json.dumps(rome))))
    assert item.question == "The mother tongue of Danielle Darrieux is"
    assert item.answer == "French" and item.extra["target_new"] == "English"
    assert item.subject == "Danielle Darrieux" and item.paraphrased_question == "Danielle Darrieux, a native speaker of"


# --------------------------------------------------------------------------- real third-party files


def test_real_tofu_world_facts():
    path = shared("tofu/world_facts_perturbed.json")
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = load_items(str(path))
    assert len(items) == len(raw) == 117
    assert items[0].question == raw[0]["question"] and items[0].answer == raw[0]["answer"]
    assert items[-1].question == raw[-1]["question"]
    assert all(len(it.perturbed_answers) == 3 for it in items)
    assert items[0].perturbed_answers == raw[0]["perturbed_answer"]
    assert [it.id for it in items[:3]] == ["0", "1", "2"] and items[-1].id == "116"
    assert load_items("tofu/world_facts_perturbed.json", base_dir=SHARED, format="tofu") == items


def test_real_tofu_real_authors():
    path = shared("tofu/real_authors_perturbed.json")
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = load_items(str(path), format="tofu")
    assert len(items) == 100
    assert [(it.question, it.answer) for it in items] == [(r["question"], r["answer"]) for r in raw]
    assert all(len(it.perturbed_answers) == 3 for it in items)


def test_real_tofu_idontknow():
    path = shared("tofu/idontknow.jsonl")
    lines = load_lines(path)
    assert len(lines) == 100
    assert lines[0] == path.read_text().splitlines()[0].strip()
    assert all(line.strip() == line and line for line in lines)


def test_real_pistol_sample():
    path = shared("pistol/sample_data_1.json")
    raw = json.loads(path.read_text())
    items = load_items(str(path))
    assert len(items) == len(raw) == 400
    assert items[0].question == raw[0]["question"] and items[0].answer == raw[0]["answer"]
    assert items[0].extra == {"edge": raw[0]["edge"]}
    edges = {it.extra["edge"] for it in items}
    assert len(edges) == 20
    assert load_items(str(path), format="pistol") == items


def test_real_pistol_factual_matches_tofu():
    path = shared("pistol/factual_data.json")
    items = load_items(str(path), format="pistol")
    assert len(items) == 217
    tofu = (load_items(str(shared("tofu/real_authors_perturbed.json")))
            + load_items(str(shared("tofu/world_facts_perturbed.json"))))
    assert [(it.question, it.answer) for it in items] == [(it.question, it.answer) for it in tofu]
    assert all(it.extra == {} for it in items)


# --------------------------------------------------------------------------- hub


def test_hub_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.monotonic()
    err = error_of(load_items, "hub:someone/unlikely-dataset:test")
    assert time.monotonic() - start < 2
    assert "someone/unlikely-dataset" in err.message and err.where == "hub:someone/unlikely-dataset:test"
    assert "offline" in err.message.lower() or "HF_HUB_OFFLINE" in err.message


def test_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(net, "hub_reachable", lambda timeout=3.0: False)
    err = error_of(load_items, "hub:locuslab/TOFU")
    assert "locuslab/TOFU" in err.message and "reach" in err.message


def test_hub_probe_does_not_hang(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.monotonic()
    assert net.hub_reachable.__wrapped__(timeout=1.0) is False  # uncached probe
    assert time.monotonic() - start < 2


def _fake_datasets(monkeypatch, load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setattr(net, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_hub_loads_rows_with_config_and_split(monkeypatch):
    calls = []

    class Rows(list):
        def to_list(self):
            return list(self)

    def load(name, config=None, split=None):
        calls.append((name, config, split))
        return Rows([{"question": "Q?", "answer": "A", "perturbed_answer": ["x", "y", "z"]}])

    _fake_datasets(monkeypatch, load)
    [item] = load_items("hub:locuslab/TOFU:forget10:train")
    assert (item.question, item.answer, item.perturbed_answers) == ("Q?", "A", ["x", "y", "z"])
    load_items("hub:locuslab/TOFU")
    load_items("hub:locuslab/TOFU:test")
    assert calls == [("locuslab/TOFU", "forget10", "train"), ("locuslab/TOFU", None, "train"),
                     ("locuslab/TOFU", None, "test")]


def test_hub_failure_is_a_user_error(monkeypatch):
    def load(name, config=None, split=None):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nmore detail")

    _fake_datasets(monkeypatch, load)
    err = error_of(load_items, "hub:nobody/nothing")
    assert "nobody/nothing" in err.message and "more detail" not in err.message


def test_hub_bad_spec():
    for spec in ("hub:", "hub:justaname", "hub:a/b:c:d:e"):
        assert "hub:OWNER/NAME" in error_of(load_items, spec).message


# --------------------------------------------------------------------------- built-in sets


def test_builtin_world_facts_invariants():
    assert "world-facts" in builtin_names()
    items = load_items("builtin:world-facts")
    assert len(items) >= 60
    ids = [it.id for it in items]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "wf-001"
    for it in items:
        assert it.question.endswith("?"), it.id
        assert 1 <= len(it.answer.split()) <= 3, it.id
        assert it.subject and it.subject in it.question, it.id
        assert it.paraphrased_question and it.paraphrased_question.strip() != it.question.strip(), it.id
        assert len(it.perturbed_answers) == 3, it.id
        lowered = {p.lower() for p in it.perturbed_answers}
        assert len(lowered) == 3 and it.answer.lower() not in lowered, it.id
    assert len({it.question for it in items}) == len(items)


def test_builtin_world_facts_are_our_own():
    path = SHARED / "pistol" / "factual_data.json"  # TOFU's world facts and real authors together
    if not path.exists():
        pytest.skip("PISTOL/TOFU factual file not available")
    theirs = {r["question"].lower() for r in json.loads(path.read_text())}
    ours = {it.question.lower() for it in load_items("builtin:world-facts")}
    assert not ours & theirs


def test_unknown_builtin():
    err = error_of(load_items, "builtin:nope")
    assert err.where == "builtin:nope" and "world-facts" in err.message


def test_builtin_refusals():
    lines = builtin_refusals()
    assert len(lines) >= 40
    assert len(set(lines)) == len(lines)
    assert all(line and line == line.strip() for line in lines)
    assert load_lines("builtin:refusals") == lines
    assert load_lines(Path("/some/session/dir") / "builtin:refusals") == lines  # already resolved by a caller
    assert "builtin:refusals" in error_of(load_lines, "builtin:nope").message
    path = SHARED / "tofu" / "idontknow.jsonl"
    if path.exists():
        assert not set(lines) & set(load_lines(path))


# --------------------------------------------------------------------------- load_lines


def test_load_lines_variants(tmp_path):
    path = write(tmp_path / "r.txt", "I can't say.\n\n   \n  No idea.  \n")
    assert load_lines(path) == ["I can't say.", "No idea."]
    path = write(tmp_path / "r.jsonl", '"I can\'t say."\n"No \\"idea\\"."\n')
    assert load_lines(str(path)) == ["I can't say.", 'No "idea".']
    path = write(tmp_path / "r.json", json.dumps(["One.", " ", "Two."]))
    assert load_lines(path) == ["One.", "Two."]
    assert load_lines("r.txt", base_dir=tmp_path) == ["I can't say.", "No idea."]


def test_load_lines_errors(tmp_path):
    err = error_of(load_lines, tmp_path / "missing.txt")
    assert err.where == str(tmp_path / "missing.txt") and "one sentence per line" in err.message
    path = write(tmp_path / "blank.txt", "\n \n")
    assert "empty" in error_of(load_lines, path).message


# --------------------------------------------------------------------------- select


def make_items(n: int) -> list[QAItem]:
    return [QAItem(id=f"q{i}", question=f"Q{i}?", answer=f"A{i}",
                   paraphrased_question=f"Again Q{i}?" if i % 2 == 0 else None) for i in range(n)]


def ids(items):
    return [it.id for it in items]


def test_select_counts():
    items = make_items(10)
    forget, retain = select(items, 3, 4)
    assert ids(forget) == ["q0", "q1", "q2"] and ids(retain) == ["q3", "q4", "q5", "q6"]
    forget, retain = select(items, 3, 0)
    assert retain == []
    forget, retain = select(items, 3, "rest")
    assert ids(retain) == [f"q{i}" for i in range(3, 10)]
    forget, retain = select(items, 10, 0)
    assert len(forget) == 10


def test_select_id_lists():
    items = make_items(10)
    forget, retain = select(items, ["q5", "q2"], 3)
    assert ids(forget) == ["q5", "q2"] and ids(retain) == ["q0", "q1", "q3"]
    forget, retain = select(items, ["q5"], ["q0", "q9"])
    assert ids(retain) == ["q0", "q9"]
    forget, retain = select(items, ["q5", "q5"], "rest")
    assert ids(forget) == ["q5"] and len(retain) == 9
    forget, retain = select(make_items(3) + [QAItem("7", "Q?", "A")], [7], 0)
    assert ids(forget) == ["7"]


def test_select_errors():
    items = make_items(5)
    err = error_of(select, items, 0, 0)
    assert err.where == "data.forget" and "empty" in err.message
    assert "empty" in error_of(select, items, [], 0).message
    err = error_of(select, items, 6, 0)
    assert "6" in err.message and "only 5" in err.message
    assert "negative" in error_of(select, items, -1, 0).message
    err = error_of(select, items, 2, -1, where="runs[0].data")
    assert err.where == "runs[0].data.retain" and "negative" in err.message
    err = error_of(select, items, 3, 3)
    assert err.where == "data.retain" and "only 2" in err.message
    err = error_of(select, items, ["q1", "q4"], 4)
    assert "only 3" in err.message
    err = error_of(select, items, ["q1", "zz", "yy"], 0)
    assert err.where == "data.forget" and "unknown ids zz, yy;" in err.message
    err = error_of(select, items, ["q1"], ["q2", "ww"])
    assert err.where == "data.retain" and "ww" in err.message
    err = error_of(select, items, ["q1", "q2"], ["q2", "q3", "q1"])
    assert "q2, q1" in err.message and "both" in err.message
    assert "expected" in error_of(select, items, True, 0).message
    assert "expected" in error_of(select, items, 1.5, 0).message
    assert "expected" in error_of(select, items, "q1", 0).message
    assert "rest" in error_of(select, items, 1, "all").message
    assert "not text" in error_of(select, items, [None], 0).message


def test_rephrase_split():
    items = make_items(4)
    forget, _ = select(items, 4, 0)
    reph = rephrase_split(forget)
    assert ids(reph) == ["q0", "q2"]
    assert reph[0].question == "Again Q0?" and reph[0].answer == "A0"
    assert reph[0].extra["original_question"] == "Q0?"
    assert items[0].question == "Q0?" and "original_question" not in items[0].extra
    assert rephrase_split([]) == []


def test_builtin_rephrase_split_covers_every_item():
    items = load_items("builtin:world-facts")
    reph = rephrase_split(items)
    assert ids(reph) == ids(items)
    assert all(r.answer == it.answer for r, it in zip(reph, items))
