"""``[eval] extra`` end to end on tiny random models: the field's metrics and attacks in the results,
under exactly the names scripts rely on, with the retain-only model, the holdout split and derived
perturbed answers (issue 18)."""

from __future__ import annotations

import json

import pytest

from unlearn_tui import sessions
from unlearn_tui.backends import extras, field_metrics, mia, perturb
from unlearn_tui.backends.data import QAItem
from unlearn_tui.backends.events import Log
from unlearn_tui.backends.runner import Workbench

ALL = ["mia", "forget_quality", "model_utility", "perplexity", "relearn", "mcq", "in_context"]
CITIES = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Quito", "Dakar", "Hanoi", "Bern", "Accra", "Riga", "Doha",
          "Kyiv", "Baku"]


def write_contracts(path, n=14):
    """PISTOL-like records: one question template, different entities, no perturbed answers."""
    recs = [{"question": f"In which city did Firm{chr(65 + i)} sign the contract with Corp{chr(65 + i)}?",
             "answer": CITIES[i], "edge": f"E{i}"} for i in range(n)]
    path.write_text(json.dumps(recs))


def make_session(tmp_path, extra=ALL, finetune=True, **eval_keys):
    write_contracts(tmp_path / "contracts.json")
    text = ('version = 1\n[model]\nname = "tiny:llama"\n'
            '[data]\npath = "contracts.json"\nformat = "pistol"\nforget = 4\nretain = 4\nrephrase = false\n'
            '[targets]\nmode = "idk"\n'
            f'[eval]\nmax_new_tokens = 6\nbatch_size = 8\nextra = {json.dumps(extra)}\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in eval_keys.items())
            + ('[finetune]\ndata = "forget+retain"\nepochs = 1\nuntil_rouge1 = 0\nlr = 1e-3\n' if finetune else "")
            + '[[runs]]\nmethod = "none"\n[[runs]]\nmethod = "ga"\nparams = { epochs = 1 }\n')
    p = tmp_path / "s.toml"
    p.write_text(text)
    return sessions.load(p)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("UNLEARN_TUI_PAPER_DATA", str(tmp_path / "no-shared-data"))


def run(session, events=None):
    ev = [] if events is None else events
    wb = Workbench(session, ev.append)
    wb.load_data()
    return wb, wb.run_all(), ev


def test_every_extra_lands_under_its_name_in_the_baseline_and_every_run(tmp_path):
    wb, result, events = run(make_session(tmp_path))
    js = result.to_json()
    for block in [js["baseline"], *js["runs"]]:
        assert set(block["mia"]) >= {"loss_auc", "zlib_auc", "mink_auc", "minkpp_auc", "privleak"}
        assert all(block["mia"][k] is not None and 0.0 <= block["mia"][k] <= 1.0
                   for k in ("loss_auc", "zlib_auc", "mink_auc", "minkpp_auc"))
        assert isinstance(block["mia"]["privleak"], float)
        assert 0.0 <= block["forget_quality"] <= 1.0
        assert block["model_utility"] is not None and 0.0 <= block["model_utility"] <= 1.0
        assert list(block["model_utility_parts"]) == ["retain"]    # no TOFU sets in the isolated data folder
        assert block["perplexity"] > 1.0 and block["perplexity_tokens"] > 100
        assert set(block["relearn"]) >= {"before", "after"}
        assert block["mcq"]["n"] == 4 and block["in_context"]["n"] == 4
        assert set(block["extra_seconds"]) == set(ALL)
        assert block["perturbed_derived"] == 8     # forget + retain: every item got answers of the others
    # the none run reuses the baseline's evaluation, extras included; ga changed the model
    assert js["runs"][0]["mia"] == js["baseline"]["mia"]
    assert js["runs"][1]["perplexity"] != js["baseline"]["perplexity"]
    assert any(isinstance(e, Log) and "retain-only model" in e.message for e in events)


def test_mia_auc_is_the_membership_scores_of_forget_vs_holdout(tmp_path):
    wb, result, _ = run(make_session(tmp_path, extra=["mia"], holdout=3))
    inp = wb.extras_inputs(wb.prepare(), ["mia"])
    assert [it.id for it in inp.holdout] == ["8", "9", "10"]     # neither selected nor trained on
    members = mia.item_scores(wb.handle, inp.forget)
    nonmembers = mia.item_scores(wb.handle, inp.holdout)
    expect = field_metrics.mia_aucs(members, nonmembers)
    got = result.baseline.extra["mia"]
    per_item = result.baseline.extra["mia_items"]
    assert [x["id"] for x in per_item["forget"]] == [it.id for it in inp.forget]
    assert [x["loss"] for x in per_item["holdout"]] == pytest.approx([x["loss"] for x in nonmembers])
    assert got["loss_auc"] == pytest.approx(expect["loss_auc"])
    assert got["minkpp_auc"] == pytest.approx(expect["minkpp_auc"])
    assert got["privleak"] == pytest.approx(field_metrics.privleak(got["mink_auc"], inp.reference.mia["mink_auc"]))


def test_forget_quality_compares_with_the_retain_only_model(tmp_path):
    wb, result, _ = run(make_session(tmp_path, extra=["forget_quality"]))
    inp = wb.extras_inputs(wb.prepare(), ["forget_quality"])
    ref = inp.reference
    assert ref.finetune["items"] == 4 and ref.finetune["data"] == "retain"   # forget+retain minus forget
    mine = [r for r in extras.truth_ratios(wb.handle, inp.forget, wb.settings) if r is not None]
    expect = field_metrics.forget_quality(mine, ref.ratios)
    assert result.baseline.extra["forget_quality"] == pytest.approx(expect["pvalue"])
    assert result.baseline.extra["truth_ratio_tofu"] == pytest.approx(field_metrics.truth_ratio_score(mine, True))


def test_without_finetune_forget_quality_is_null_and_says_why(tmp_path):
    events: list = []
    _, result, _ = run(make_session(tmp_path, extra=["forget_quality", "mia"], finetune=False), events)
    assert result.baseline.extra["forget_quality"] is None
    assert result.baseline.extra["mia"]["privleak"] is None
    assert result.baseline.extra["mia"]["loss_auc"] is not None
    assert any(isinstance(e, Log) and "need [finetune]" in e.message for e in events)


def test_relearn_leaves_the_weights_as_they_were(tmp_path):
    wb, result, _ = run(make_session(tmp_path, extra=["relearn"], relearn_epochs=3, relearn_lr=1e-2))
    import torch

    before = {n: p.detach().clone() for n, p in wb.handle.model.named_parameters()}
    p = wb.prepare()
    ev = wb.evaluate(p)
    rl = ev.extra["relearn"]
    assert rl["epochs"] == 3 and rl["lr"] == pytest.approx(1e-2)
    assert all(torch.equal(before[n], q) for n, q in wb.handle.model.named_parameters())


def test_replay_table_results_file_and_table_columns_carry_the_extras(tmp_path):
    from rich.console import Console

    from unlearn_tui.tui import results_store
    from unlearn_tui.tui.replay_view import results_table

    session = make_session(tmp_path, extra=["perplexity", "mcq"])
    _, result, _ = run(session)
    console = Console(width=400, record=True)
    console.print(results_table(result))
    text = console.export_text()
    assert "ppl ↓" in text and "MCQ acc ↓" in text and "FQ ↑" not in text
    # the results file keeps them through a reopen
    path = results_store.write(session, result.baseline, result.runs, [])
    base, runs, _ = results_store.loads(path.read_text())
    assert base.extra["perplexity"] == pytest.approx(result.baseline.extra["perplexity"])
    assert runs[1].eval.extra["perplexity"] == pytest.approx(result.runs[1].eval.extra["perplexity"])
    values = results_store.eval_values(runs[1].eval)
    assert values["perplexity"] == pytest.approx(result.runs[1].eval.extra["perplexity"])
    assert values["mcq.top_hit"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_derived_perturbed_answers_share_the_question_template():
    items = [QAItem(str(i), q, a) for i, (q, a) in enumerate([
        ("What was the effective date of the contract between Abc SA and Def AG?", "01-02-1990."),
        ("What was the effective date of the contract between Ghi NV and Jkl PLC?", "03-04-1991."),
        ("What was the effective date of the contract between Mno SAS and Pqr Ltd?", "01-02-1990."),
        ("What was the address of Abc SA in the contract with Def AG?", "1 Main Road."),
    ])]
    out = perturb.derive(items)
    assert out[0].perturbed_answers == ["03-04-1991."]            # the same answer is not a wrong one
    assert sorted(out[1].perturbed_answers) == ["01-02-1990."]      # duplicates count once
    assert out[3].perturbed_answers == [] and "perturbed_source" not in out[3].extra
    assert out[0].extra["perturbed_source"] == "derived"
    given = QAItem("x", items[0].question, "y", perturbed_answers=["z"])
    assert perturb.derive([given], items)[0] is given


def test_bad_extra_keys_are_one_line_errors(tmp_path):
    from unlearn_tui.backends.errors import UserError

    for bad, needle in [('extra = ["mai"]', 'did you mean "mia"'), ('extra = ["mia", "mia"]', "listed twice"),
                        ("holdout = 0", "integer >= 1"), ('perplexity_text = "none.txt"', "not found")]:
        p = tmp_path / "b.toml"
        p.write_text(f"version = 1\n[eval]\n{bad}\n")
        with pytest.raises(UserError, match=needle):
            sessions.load(p)


def test_results_pane_shows_the_extras_columns_and_the_drill_down_line():
    from unlearn_tui.backends.metrics import EvalResult, ItemScore, SplitScores
    from unlearn_tui.tui import results_store
    from unlearn_tui.tui.widgets.results import default_columns, extras_line

    ev = EvalResult({"forget": SplitScores("forget", [ItemScore("a", "q", "x", "y", 0.0, 0.1, 0.2, 0.3)])},
                    extra={"forget_quality": 0.031, "model_utility": 0.4, "mia": {"privleak": -45.0, "holdout": 3},
                           "relearn": {"before": 0.1, "after": 0.6, "train_ids": ["a"]}})
    rows = results_store.entries(ev, [], [])
    cols = default_columns(rows)
    assert {"forget_quality", "model_utility", "mia.privleak", "relearn.after"} <= set(cols)
    assert "perplexity" not in cols and "mcq.top_hit" not in cols
    line = extras_line(ev)
    assert "FQ 0.031" in line and "MU 0.400" in line and "privleak -45.000" in line.replace("−", "-")
    assert "relearn 0.100→0.600" in line
    assert extras_line(EvalResult()) == ""


def test_a_sweep_trial_carries_the_extras_in_its_line_and_csv_row(tmp_path):
    from unlearn_tui.sessions import sweep as sw

    make_session(tmp_path, extra=["perplexity", "mcq", "mia"], finetune=False)
    text = (tmp_path / "s.toml").read_text().split("[[runs]]")[0] + '[sweep]\nmethod = ["none"]\n'
    spec = sw.load_sweep(write_text(tmp_path / "sweep.toml", text))
    (res,) = sw.run_sweep(spec, tmp_path / "out", backend="local")
    line = res.line()
    assert line["perplexity"] > 1.0 and set(line["mia"]) >= {"loss_auc", "privleak"} and line["mcq"]["n"] == 4
    row = res.row()
    assert row["perplexity"] == line["perplexity"] and row["mia.loss_auc"] == line["mia"]["loss_auc"]
    assert row["mcq.top_hit"] == line["mcq"]["top_hit"]


def write_text(path, text):
    path.write_text(text)
    return path


def test_every_pistol_question_gets_wrong_answers_of_its_own_kind(shared_data):
    from unlearn_tui.backends import data

    path = shared_data / "pistol" / "sample_data_1.json"
    items = data.load_items(str(path), format="pistol")
    out = perturb.derive(items)
    assert all(it.perturbed_answers for it in out)                       # 400 of 400
    assert sum(len(it.perturbed_answers) == 3 for it in out) >= 360
    for it in out:
        assert it.answer not in it.perturbed_answers
        same = [o for o in items if perturb.question_template(o.question) == perturb.question_template(it.question)]
        assert set(it.perturbed_answers) <= {o.answer for o in same}      # answers to the same question template
