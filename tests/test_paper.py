"""``unlearn-tui paper`` (sessions/paper.py, tui/paper_cli.py): the grids expand to the documented runs,
--dry-run prints them, a --quick run of two methods on a tiny model writes the tables (Markdown, CSV, JSON)
and plots (SVG) with the paper's columns and the model's own baseline, a second run is resumed from the
kept trials (nothing runs again), and bad flags are one line with exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from unlearn_tui.sessions import paper as pp
from unlearn_tui.sessions import sweep as sw
from unlearn_tui.tui import cli

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]
BOOKS = [("Hamlet", "William Shakespeare"), ("1984", "George Orwell"), ("Emma", "Jane Austen"),
         ("Ulysses", "James Joyce"), ("Dracula", "Bram Stoker"), ("Beloved", "Toni Morrison")]


def write_data(tmp: Path) -> tuple[Path, Path, Path]:
    """A fake factual set in TOFU's JSON Lines form (two files, 14 items) and a fake PISTOL file (12 items)."""
    a, w, p = tmp / "authors.json", tmp / "world.json", tmp / "pistol.json"
    a.write_text("".join(json.dumps({"question": f"What is the capital of {c}?", "answer": x,
                                     "perturbed_answer": ["Oslo", "Bern"]}) + "\n" for c, x in CAPITALS))
    w.write_text("".join(json.dumps({"question": f"Who wrote the novel '{t}'?", "answer": x,
                                     "perturbed_answer": ["Mark Twain"]}) + "\n" for t, x in BOOKS))
    p.write_text(json.dumps([{"question": f"What was the effective date of contract {i} between Abc SA and Xyz Ltd?",
                              "answer": f"0{i % 9 + 1}-02-1998.", "edge": "A_B" if i < 6 else "A_C"}
                             for i in range(12)]))
    return a, w, p


def quick_args(tmp: Path, out: Path) -> list[str]:
    a, w, p = write_data(tmp)
    return ["paper", "--model", "tiny:llama", "--quick", "--methods", "rome,gd", "--known", "0",
            "--forget-sizes", "2,4", "--merge-factors", "1,2", "--factual-data", f"{a},{w}", "--pistol-data", str(p),
            "--local", "--quiet", "--out", str(out)]


# ----------------------------------------------------------------------------- the grids
def test_the_full_grids_expand_to_the_documented_runs():
    cfg = pp.PaperConfig()
    points = pp.plan(cfg)
    counts = pp.plan_counts(points)
    n_methods = len(cfg.method_list(pp.PAPER_METHODS))
    assert n_methods == len(pp.PAPER_METHODS) == 11          # GA GD KL DPO NPO ROME MEMIT AlphaEdit WISE GRACE IKE
    assert counts["table1"] == counts["table2"] == 2 * 11      # both settings, every method; Table 2 = same runs
    assert counts["figure4"] == 4 * 4 and counts["figure6"] == 2 * 5
    # the figure 4 points at 40 forget are the factual table's runs: run once
    assert counts["total"] == 22 + (16 - 4) + 10
    keys = {p.key: p for p in points}
    assert keys[("factual", 40, "alphaedit", 1)].uses == ["table1", "table2", "figure4"]
    assert keys[("pistol", 20, "rome", 1)].uses == ["table1", "table2"]
    assert {k[3] for k in keys if k[2] == "memit" and k[1] == 80} == {1, 2, 5, 10, 16}
    assert {k[1] for k in keys if k[2] == "wise"} == {10, 20, 40, 80}

    # subsets
    sub = pp.plan(pp.PaperConfig(tables=(1,), figures=(), settings=("pistol",), methods=("rome", "ga")))
    assert [(p.setting, p.method, p.forget) for p in sub] == [("pistol", "ga", 20), ("pistol", "rome", 20)]
    q = pp.plan_counts(pp.plan(pp.PaperConfig(quick=True, methods=("rome", "gd"))))
    assert q == {"table1": 4, "table2": 4, "figure4": 4, "figure6": 5, "total": 4 + 3 + 5}
    assert pp.PaperConfig(quick=True).fig4_sizes() == (1, 2, 4, 8) and pp.PaperConfig(quick=True).fig6_forget() == 8


def test_dry_run_prints_the_runs_and_counts(tmp_path, capsys):
    rc = cli.main(["paper", "--dry-run", "--figures", "6", "--tables", "1", "--settings", "factual",
                   "--methods", "rome,memit,gd", "--out", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln[:3].strip().isdigit()]
    assert len(rows) == 3 + 10                                   # 3 table runs + ROME/MEMIT x 5 merge factors
    assert "figure6 10" in out and "table1 3" in out and "distinct runs: 13" in out
    assert not (tmp_path / "res").exists()                       # nothing written, no model loaded


@pytest.mark.parametrize("flags, says", [
    (["--tables", "3"], "--tables: expected 1 and/or 2"),
    (["--figures", "5"], "--figures: expected 4 and/or 6"),
    (["--settings", "tofu"], "--settings: expected factual and/or pistol"),
    (["--methods", "romee"], "--methods: unknown method"),
    (["--known", "1.5"], "--known: expected a ROUGE-1 recall between 0 and 1"),
    (["--forget-sizes", "10,x"], "--forget-sizes: expected integers >= 1"),
    (["--merge-factors", "0"], "--merge-factors: expected integers >= 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--extra", "mia,bogus"], "--extra: expected one of mia, forget_quality"),
    (["--extra", ","], "--extra: expected extras"),
    (["--tables", "none", "--figures", "none"], "nothing to run"),
    (["--table-merge", "rome"], "--table-merge: expected METHOD=M[/M...]"),
    (["--table-merge", "rome=0"], "--table-merge: expected merge factors >= 1"),
    (["--table-merge", "rome=2/x"], "--table-merge: expected merge factors (integers >= 1"),
    (["--table-merge", "romee=2"], "--table-merge: unknown method"),
    (["--set", "alphaedit.l3=2"], '--set alphaedit.l3: unknown key "l3"'),
    (["--set", "alphaedit.l2=-1"], "--set alphaedit.l2: expected a value >= 1e-09"),
    (["--set", "rome.merge_update=magic"], "--set rome.merge_update: expected one of 'exact'"),
    (["--set", "alphaedit=1"], "--set: expected METHOD.KEY=VALUE"),
    (["--finetune", "lr=2"], '--finetune: lr: expected a number > 0 and <= 1 or "auto", got 2'),
    (["--finetune", "epochs=0"], "--finetune: epochs: expected an integer between 1 and 10000, got 0"),
    (["--finetune", "tuning=xx"], '--finetune: tuning: expected one of full, lora; got "xx"'),
    (["--finetune", "foo=1"], '--finetune: unknown key "foo"; expected one of: data, epochs'),
    (["--finetune", "data=retain"], "--finetune: the PISTOL setting fine-tunes on all its items"),
    (["--finetune", "lr"], "--finetune: expected KEY=VALUE"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, says):
    try:
        rc = cli.main(["paper", "--dry-run", "--out", str(tmp_path / "res"), *flags])
    except SystemExit as exc:          # argparse's own errors exit from the parser (one line, code 2)
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert err.startswith("unlearn-tui: error:")


def test_a_missing_data_set_is_skipped_with_a_message(tmp_path):
    cfg = pp.PaperConfig(factual_data=(tmp_path / "nope.json",), pistol_data=tmp_path / "none.json")
    why = pp.check_data(cfg, ["factual", "pistol"])
    assert "factual setting skipped" in why["factual"] and "nope.json not found" in why["factual"]
    assert "--pistol-data" in why["pistol"]


# ----------------------------------------------------------------------------- a quick run, then a resumed one
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    tmp = tmp_path_factory.mktemp("paper")
    out = tmp / "res"
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(io.StringIO()):
        rc = cli.main(quick_args(tmp, out))
    return tmp, out, rc, buf.getvalue()


def test_a_quick_run_writes_the_tables_and_plots(quick_run):
    tmp, out, rc, printed = quick_run
    assert rc == 0, printed
    for name in ("paper.md", "paper.json", "table1.csv", "table2.csv", "figure4.csv", "figure6.csv",
                 "table1-factual.svg", "table1-pistol.svg", "figure4.svg", "figure6.svg", "results.jsonl"):
        assert (out / name).is_file(), name
    md = (out / "paper.md").read_text()
    assert "Table 1: forget and retain (factual setting)" in md and "(pistol setting)" in md
    assert "Table 2: rephrased forget questions" in md and "Figure 4" in md and "Figure 6" in md
    # the model's own baseline is stated above every table and is its first row
    sections = [s for s in md.split("\n## ")[1:]]
    assert len(sections) == 6
    for s in sections:
        assert "Its own baseline (unedited)" in s and "| *unedited (baseline)* |" in s, s[:200]
    assert "| Method | forget R1 ↓ | forget Prob ↓ | forget MRR ↓ | forget Hit ↓ | retain R1 ↑ | retain Prob ↑ | " \
           "retain MRR ↑ | retain Hit ↑ | composite ↑ |" in md
    assert "| Method | rephrase R1 ↓ | rephrase Prob ↓ | rephrase MRR ↓ | rephrase Hit ↓ | composite ↑ |" in md
    assert "fine-tuned first on 12 items" in md            # PISTOL: [finetune] before the baseline
    assert printed.count("# Editing as Unlearning") == 1 and "unedited ███" in printed   # terminal bars

    rows = list(csv.DictReader((out / "table1.csv").open()))
    assert list(rows[0]) == ["setting", *pp.TABLE1_COLUMNS, "forget_n", "retain_n", "status"]
    assert [(r["setting"], r["method"]) for r in rows] == [("factual", "baseline"), ("factual", "gd"),
                                                           ("factual", "rome"), ("pistol", "baseline"),
                                                           ("pistol", "gd"), ("pistol", "rome")]
    f = rows[2]
    assert f["forget_n"] == "4" and f["retain_n"] == "10" and f["status"] == "ok"
    assert abs(float(f["composite"]) - (1 - float(f["forget R1"]) + float(f["retain R1"]))) < 1e-9
    assert list(next(csv.DictReader((out / "table2.csv").open()))) == \
        ["setting", *pp.TABLE2_COLUMNS, "forget_n", "retain_n", "status"]
    fig6 = list(csv.DictReader((out / "figure6.csv").open()))
    assert list(fig6[0]) == list(pp.FIGURE_COLUMNS)
    assert [(r["method"], r["merge_factor"], r["forget"]) for r in fig6 if r["method"] != "baseline"] == \
        [("rome", "1", "8"), ("rome", "2", "8")]
    fig4 = list(csv.DictReader((out / "figure4.csv").open()))
    assert [(r["method"], r["forget"]) for r in fig4 if r["method"] != "baseline"] == [("gd", "2"), ("gd", "4")]

    js = json.loads((out / "paper.json").read_text())
    assert js["model"] == "tiny:llama" and js["trials"] == {"total": 7, "ran": 7, "cached": 0, "failed": 0}
    assert js["tables"]["table1"]["factual"]["info"]["baseline"]["composite"] is not None
    assert js["settings"]["factual"]["known"] == 14 and js["settings"]["pistol"]["finetune"]["items"] == 12
    assert len(js["runs"]) == 7
    for svg in out.glob("*.svg"):
        text = svg.read_text()
        assert text.startswith("<svg") and text.rstrip().endswith("</svg>") and "composite" in text
    assert "unedited" in (out / "table1-factual.svg").read_text()
    # every group is a sweep file of its own, replayable: sessions/SETTING-forgetN.toml
    assert sorted(p.name for p in (out / "sessions").glob("*.toml")) == \
        ["factual-forget2.toml", "factual-forget4.toml", "factual-forget8.toml", "pistol-forget2.toml"]
    assert len(list((out / "trials").glob("*.json"))) == 7


def test_refusals_are_tabled_per_split_with_the_editing_methods_total(quick_run):
    """Under Table 1: the detector's refusal share of forget / rephrase / retain (over-refusal) per method, and
    how many of the editing methods' forget answers were refusals."""
    tmp, out, rc, _ = quick_run
    assert rc == 0
    md = (out / "paper.md").read_text()
    js = json.loads((out / "paper.json").read_text())
    for setting in ("factual", "pistol"):
        part = md.split(f"### Refusals ({setting} setting)")[1].split("\n## ")[0]
        assert "| Method | forget refused ↑ | rephrase refused ↑ | retain refused ↓ |" in part
        rows = js["tables"]["table1"][setting]["rows"]
        for r in rows:
            assert {"refused", "refused_rephrase", "refused_retain"} <= set(r)
            assert all(v is None or 0.0 <= v <= 1.0 for v in (r["refused"], r["refused_retain"]))
            assert f"| {r['method']} |" in part
        hit, total = pp.refusal_total(rows)
        rome = [r for r in rows if r["method"] == "rome"]
        assert total == sum(int(r["n"]["forget"]) for r in rome) > 0          # gd is not an editing method
        assert hit == sum(round(r["refused"] * r["n"]["forget"]) for r in rome)
        assert f"Editing methods' forget answers detected as refusals: {hit}/{total} " in part
        base = js["tables"]["table1"][setting]["info"]["baseline"]
        assert {"forget refused", "retain refused", "rephrase refused"} <= set(base)


def test_a_second_run_is_resumed_from_the_kept_trials(quick_run):
    tmp, out, rc, _ = quick_run
    assert rc == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")}
    args = pp.PaperConfig(model="tiny:llama", quick=True, methods=("rome", "gd"), known=0.0, forget_sizes=(2, 4),
                          merge_factors=(1, 2), factual_data=(tmp / "authors.json", tmp / "world.json"),
                          pistol_data=tmp / "pistol.json")
    events: list = []
    sw._HANDLE.clear()
    res = pp.run_paper(args, out, events.append, backend="local")
    finished = [e for e in events if isinstance(e, sw.TrialFinished)]
    assert len(finished) == 7 and all(e.result.cached for e in finished)       # no trial ran again
    assert not sw._HANDLE                                                     # not even the model was loaded
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")} == stamps
    assert all(p.cached for p in res.preps.values())                          # known pass and fine-tune kept
    assert res.report["trials"] == {"total": 7, "ran": 0, "cached": 7, "failed": 0}


def test_the_preparation_is_keyed_on_the_built_in_paraphrases(tmp_path, monkeypatch):
    """A release with new built-in paraphrases, or a new paraphrase generator, prepares again (the kept choice
    named the old ones)."""
    from unlearn_tui.backends import selfimprove

    data = tmp_path / "d.json"
    data.write_text("[]")
    cfg = pp.PaperConfig(model="tiny:llama", quick=True)
    key = pp._prep_key(cfg, "pistol", data, 2)
    assert key["paraphrases"] == selfimprove.builtin_paraphrase_digest() and len(key["paraphrases"]) == 16
    assert pp._prep_key(cfg, "pistol", data, 2) == key
    monkeypatch.setattr(selfimprove, "builtin_paraphrase_digest", lambda: "0" * 16)
    assert pp._prep_key(cfg, "pistol", data, 2) != key
    monkeypatch.undo()
    assert pp._prep_key(cfg, "pistol", data, 2) == key
    # and on the paraphrase generator's version (a new way of writing them: generate again)
    monkeypatch.setattr(selfimprove, "PARAPHRASE_GENERATOR", selfimprove.PARAPHRASE_GENERATOR + 1)
    assert pp._prep_key(cfg, "pistol", data, 2) != key


def test_extra_metrics_are_run_and_tabled_beside_table_1(tmp_path):
    """``--extra``: every run's session asks for them, and a table of them follows Table 1 (baseline first)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    a, w, p = write_data(tmp_path)
    out = tmp_path / "res"
    args = ["paper", "--model", "tiny:llama", "--quick", "--methods", "gd", "--known", "0", "--tables", "1",
            "--figures", "none", "--settings", "factual", "--factual-data", f"{a},{w}", "--extra",
            "perplexity,relearn", "--local", "--quiet", "--out", str(out)]
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0, buf.getvalue()
    md = (out / "paper.md").read_text()
    assert "### The field's metrics (factual setting): perplexity, relearn" in md
    table = md.split("### The field's metrics")[1]
    head = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert "ppl" in head and "relearn after" in head and "FQ" not in head and "PrivLeak" not in head
    report = json.loads((out / "paper.json").read_text())
    t = report["tables"]["table1"]["factual"]
    row = t["rows"][0]
    assert row["method"] == "gd" and row["extra"]["ppl"] > 0 and 0 <= row["extra"]["relearn after ↓"] <= 1
    assert t["info"]["baseline_extra"]["ppl"] > 0
    assert row["extra"]["ppl"] != t["info"]["baseline_extra"]["ppl"]          # gd changed the model
    assert "| *unedited (baseline)* |" in table


def test_table_merge_puts_a_method_in_the_tables_at_chosen_merge_factors(tmp_path):
    """``--table-merge rome=1/2``: Tables 1-2 get a row per merge factor, each from its own run."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    cfg = pp.PaperConfig(tables=(1, 2), figures=(), settings=("factual",), methods=("rome", "gd"),
                         table_merge=(("rome", (1, 2)),))
    assert sorted(p.key for p in pp.plan(cfg)) == [("factual", 40, "gd", 1), ("factual", 40, "rome", 1),
                                                   ("factual", 40, "rome", 2)]
    a, w, _ = write_data(tmp_path)
    out = tmp_path / "res"
    args = ["paper", "--model", "tiny:llama", "--quick", "--methods", "rome", "--known", "0", "--tables", "1",
            "--figures", "none", "--settings", "factual", "--factual-data", f"{a},{w}", "--table-merge", "rome=1/2",
            "--local", "--quiet", "--out", str(out)]
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0, buf.getvalue()
    report = json.loads((out / "paper.json").read_text())
    rows = report["tables"]["table1"]["factual"]["rows"]
    assert [(r["method"], r["merge_factor"]) for r in rows] == [("rome", 1), ("rome+merge (m=2)", 2)]
    assert all(r["status"] == "ok" for r in rows)
    sessions = [p.read_text() for p in (out / "sessions").rglob("*.toml")]
    assert any("merge_factor = 2" in s for s in sessions) and any("merge_factor = 1" in s for s in sessions)
    assert "| rome+merge (m=2) |" in (out / "paper.md").read_text()


def test_set_gives_every_run_of_a_method_its_hyper_parameters(tmp_path, capsys):
    """``--set METHOD.KEY=VALUE``: checked against the method's Params, written into every run of it (so its
    trials are new runs, cached apart from the defaults), shown by --dry-run."""
    from unlearn_tui.tui.paper_cli import _method_sets

    sets = _method_sets(["alphaedit.l2=30", "alphaedit.layers=[4, 5]", "rome.merge_update=mean-key"])
    assert sets == (("alphaedit", (("l2", 30.0), ("layers", [4, 5]))), ("rome", (("merge_update", "mean-key"),)))
    assert _method_sets(["memit.batch_size=auto"]) == (("memit", (("batch_size", "auto"),)),)
    cfg = pp.PaperConfig(params=sets, quick=True)
    assert cfg.method_params("alphaedit") == {**pp.QUICK_PARAMS.get("alphaedit", {}), "l2": 30.0, "layers": [4, 5]}
    assert cfg.method_params("gd") == pp.QUICK_PARAMS.get("gd", {})
    rc = cli.main(["paper", "--dry-run", "--tables", "1", "--figures", "none", "--settings", "factual",
                   "--methods", "alphaedit", "--set", "alphaedit.l2=30", "--out", str(tmp_path / "res")])
    assert rc == 0 and "alphaedit runs with l2 = 30.0 (--set)" in capsys.readouterr().out
    a, w, _ = write_data(tmp_path)
    prep = pp.Prepared("factual", a, "auto", 14, ["author-001", "author-002"], ["author-001", "author-002"],
                       None, {}, [], None)
    plain = pp.group_text(pp.PaperConfig(), prep, 1, [pp.Point("factual", "alphaedit", 1)])
    tuned = pp.group_text(pp.PaperConfig(params=sets), prep, 1, [pp.Point("factual", "alphaedit", 1)])
    assert 'params = {}' in plain and 'params = { "l2" = 30.0, "layers" = [4, 5] }' in tuned


def test_finetune_flag_sets_the_pistol_fine_tune_and_its_key(tmp_path, capsys):
    """``--finetune KEY=VALUE``: the PISTOL fine-tune's [finetune] (over the paper's defaults), in every PISTOL
    session, in the preparation's key (another setting is another fine-tune), and shown by --dry-run."""
    from unlearn_tui.tui.paper_cli import _finetune_sets

    sets = _finetune_sets(["lr=5e-4", "epochs=60", "tuning=lora"])
    assert sets == (("lr", 0.0005), ("epochs", 60), ("tuning", "lora"))
    cfg = pp.PaperConfig(finetune=sets)
    assert pp.finetune_table(cfg) == {"data": "all", "epochs": 60, "until_rouge1": 0.95, "lr": 0.0005,
                                       "tuning": "lora"}
    assert pp.finetune_table(pp.PaperConfig()) == {"data": "all", "epochs": pp.PISTOL_EPOCHS, "until_rouge1": 0.95}
    data = tmp_path / "d.json"
    data.write_text("[]")
    assert pp._prep_key(cfg, "pistol", data, 20) != pp._prep_key(pp.PaperConfig(), "pistol", data, 20)
    a, w, p = write_data(tmp_path)
    prep = pp.Prepared("pistol", p, "pistol", 12, ["p1", "p2"], ["p1", "p2"], None, {}, [], None)
    text = pp.group_text(cfg, prep, 1, [pp.Point("pistol", "gd", 1)])
    assert '[finetune]\ndata = "all"\nepochs = 60\nuntil_rouge1 = 0.95\nlr = 0.0005\ntuning = "lora"' in text
    rc = cli.main(["paper", "--dry-run", "--tables", "1", "--figures", "none", "--settings", "pistol",
                   "--methods", "gd", "--finetune", "lr=5e-4", "--out", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert rc == 0 and f"pistol fine-tune: [finetune] data = 'all', epochs = {pp.PISTOL_EPOCHS}, until_rouge1 = " \
                       "0.95, lr = 0.0005 (--finetune)" in out


def test_a_pistol_run_prints_the_fine_tunes_rouge1_after_every_epoch(tmp_path, monkeypatch):
    """Without --quiet the fine-tune's per-epoch ROUGE-1 is printed (a 400-item fine-tune runs for hours)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "cache"))   # trained here, not loaded from a cache

    a, w, p = write_data(tmp_path)
    args = ["paper", "--model", "tiny:llama", "--quick", "--methods", "gd", "--tables", "1", "--figures", "none",
            "--settings", "pistol", "--pistol-data", str(p), "--local", "--out", str(tmp_path / "res")]
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        assert cli.main(args) == 0, err.getvalue()
    lines = [x for x in err.getvalue().splitlines() if x.startswith("unlearn-tui: finetune: epoch")]
    assert [x.split(":")[2].strip() for x in lines] == ["epoch 1/2", "epoch 2/2"], err.getvalue()[-2000:]
    assert all("ROUGE-1 " in x and " on 12 items" in x for x in lines)
