"""The unlearn-tui command line: replay end to end, bad input, import hygiene.

Every bad input gives ONE line on stderr naming what is wrong, exit code 2,
no traceback and no output file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FACTS = [
    ("What is the capital of France?", "Paris", "France"),
    ("Who wrote the play Hamlet?", "William Shakespeare", "Hamlet"),
    ("What is the largest planet in the solar system?", "Jupiter", "solar system"),
    ("How many days are there in a week?", "seven", "week"),
    ("What colour is the sky on a clear day?", "blue", "sky"),
    ("What is the capital of Japan?", "Tokyo", "Japan"),
]


def write_facts(path: Path) -> Path:
    with path.open("w") as f:
        for i, (q, a, s) in enumerate(FACTS):
            f.write(json.dumps({"id": f"f{i}", "question": q, "answer": a, "subject": s,
                                "paraphrased_question": f"Tell me, {q[0].lower()}{q[1:]}",
                                "perturbed_answers": ["Lyon", "Oslo", "Lima"]}) + "\n")
    return path


SESSION = """version = 1
# a comment the user wrote
[model]
name = "tiny:llama"
[data]
path = "facts.jsonl"
forget = 3
retain = 3
[targets]
mode = "idk"
merge_factor = 1
[eval]
max_new_tokens = 6
batch_size = 4
[[runs]]
method = "none"
[[runs]]
method = "ike"
[runs.params]
k = 2
"""


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "unlearn_tui.tui.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture
def session_dir(tmp_path):
    write_facts(tmp_path / "facts.jsonl")
    (tmp_path / "s.toml").write_text(SESSION)
    return tmp_path


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("unlearn-tui: progress: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_replay_prints_table_and_writes_json(session_dir):
    out = session_dir / "results.json"
    proc = run_cli("replay", str(session_dir / "s.toml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "baseline" in proc.stdout and "ike" in proc.stdout and "composite" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["baseline"]) >= {"forget", "retain", "rephrase"}
    assert [r["method"] for r in data["runs"]] == ["none", "ike"]
    for run in data["runs"]:
        assert set(run) >= {"method", "params", "forget", "retain", "rephrase", "composite", "seconds"}
        for split in ("forget", "retain", "rephrase"):
            assert set(run[split]) >= {"rouge1", "probability", "mrr", "top_hit"}
            assert run[split]["n"] == 3
    # "none" changes nothing: its scores equal the baseline's
    assert data["runs"][0]["forget"] == data["baseline"]["forget"]
    assert data["runs"][1]["params"]["k"] == 2
    assert [t["id"] for t in data["targets"]] == ["f0", "f1", "f2"]


def test_replay_twice_gives_identical_numbers(session_dir):
    a, b = session_dir / "a.json", session_dir / "b.json"
    assert run_cli("replay", str(session_dir / "s.toml"), "--out", str(a), "--items").returncode == 0
    assert run_cli("replay", str(session_dir / "s.toml"), "--out", str(b), "--items").returncode == 0
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    for j in (ja, jb):
        for r in j["runs"]:
            r.pop("seconds"), r.pop("eval_seconds")
    assert ja == jb


def _session(tmp_path, text: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


BAD = {
    "malformed": ("version = 1\n[model\nname = 'x'\n", ["bad.toml", "line"]),
    "misspelled_key": (SESSION.replace("merge_factor", "merge_factr"), ["merge_factr", "merge_factor"]),
    "wrong_type": (SESSION.replace("forget = 3", 'forget = "three"'), ["forget", "three"]),
    "unknown_method": (SESSION.replace('method = "ike"', 'method = "rombus"'), ["rombus", "none"]),
    "bad_param": (SESSION.replace("k = 2", "k = 0"), ["k", "0"]),
    "missing_data": (SESSION.replace("facts.jsonl", "nope.jsonl"), ["nope.jsonl"]),
    "no_columns": (SESSION.replace("facts.jsonl", "cols.csv"), ["cols.csv", "question"]),
    "empty_forget": (SESSION.replace("forget = 3", "forget = []"), ["forget"]),
    "ids_out_of_range": (SESSION.replace("forget = 3", "forget = 50"), ["50", "6"]),
    "unknown_ids": (SESSION.replace("forget = 3", 'forget = ["f0", "zz9"]'), ["zz9"]),
    "overlap": (SESSION.replace("forget = 3", 'forget = ["f0", "f1"]').replace("retain = 3", 'retain = ["f1", "f2"]'),
                ["f1"]),
    "model_unresolvable": (SESSION.replace('"tiny:llama"', '"nobody-xyz/no-model-xyz"'), ["nobody-xyz/no-model-xyz"]),
    "bad_version": (SESSION.replace("version = 1", "version = 7"), ["version", "7"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    text, needles = BAD[case]
    write_facts(tmp_path / "facts.jsonl")
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "out.json"
    proc = run_cli("replay", str(_session(tmp_path, text)), "--out", str(out))
    assert_user_error(proc, *needles)
    assert not out.exists()


def test_missing_session_file(tmp_path):
    assert_user_error(run_cli("replay", str(tmp_path / "none.toml")), "none.toml")


def test_unwritable_out_dir(session_dir):
    if os.geteuid() == 0:  # root writes anywhere on disk; /proc refuses even root
        target = Path("/proc/unlearn-tui-results.json")
    else:
        ro = session_dir / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = ro / "r.json"
    assert_user_error(run_cli("replay", str(session_dir / "s.toml"), "--out", str(target)), "--out", "cannot write")
    assert not target.exists()


def test_out_in_missing_directory_or_a_directory(session_dir):
    assert_user_error(run_cli("replay", str(session_dir / "s.toml"), "--out", str(session_dir / "no" / "r.json")),
                      "--out", "does not exist")
    assert_user_error(run_cli("replay", str(session_dir / "s.toml"), "--out", str(session_dir)), "--out",
                      "directory")


def test_help_imports_neither_textual_nor_torch():
    code = ("import sys\nfrom unlearn_tui.tui import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "try:\n    cli.main(['replay', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "replay" in proc.stdout


def test_replay_never_imports_textual(session_dir):
    code = ("import sys\nfrom unlearn_tui.tui import cli\nrc = cli.main(['replay', sys.argv[1], '--quiet'])\n"
            "assert rc == 0, rc\nassert 'textual' not in sys.modules\nprint('clean')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(session_dir / "s.toml")], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "clean" in proc.stdout


def test_replay_leaves_out_items_whose_paraphrases_fail_the_checks(tmp_path):
    # facts without paraphrases: the tiny random model's paraphrases all fail the checks, so nothing is cached
    # and the items leave the rephrase split, which replay says (caching what passes is tested in process:
    # test_paraphrases_generated_once_and_cached, test_results_are_written_when_the_session_write_back_fails)
    rows = [json.loads(line) for line in write_facts(tmp_path / "facts.jsonl").read_text().splitlines()]
    with (tmp_path / "facts.jsonl").open("w") as f:
        for r in rows:
            r.pop("paraphrased_question")
            f.write(json.dumps(r) + "\n")
    s = tmp_path / "s.toml"
    s.write_text(SESSION.replace('[[runs]]\nmethod = "ike"\n[runs.params]\nk = 2\n', ""))
    out1 = tmp_path / "1.json"
    p1 = run_cli("replay", str(s), "--out", str(out1))
    assert p1.returncode == 0, p1.stderr
    assert s.read_text().count("[[data.paraphrases]]") == 0
    res = json.loads(out1.read_text())
    assert res["paraphrases"] == [] and sorted(res["paraphrases_left_out"]) == ["f0", "f1", "f2"]
    assert "3 left out of the rephrase split" in p1.stderr
    assert "rephrase" not in res["baseline"]
    # the sidecar remembers the failures, so the next replay does not ask the model again
    from unlearn_tui.tui.cli import sidecar_path

    assert sidecar_path(s).read_text().count('source = "left-out"') == 3
    p2 = run_cli("replay", str(s), "--out", str(tmp_path / "2.json"))
    assert p2.returncode == 0, p2.stderr
    assert "3 of them in an earlier run, not tried again" in p2.stderr and "paraphrases (try" not in p2.stderr
    res2 = json.loads((tmp_path / "2.json").read_text())
    assert sorted(res2["paraphrases_left_out"]) == ["f0", "f1", "f2"] and "rephrase" not in res2["baseline"]


# ----------------------------------------------------------------- issue 16: the session file stays the user's own
def _replay_in_process(capsys, *args: str) -> tuple[int, str, str]:
    from unlearn_tui.tui import cli

    rc = cli.main(["replay", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_replay_caches_generated_material_in_a_sidecar_not_the_session(session_dir, capsys):
    from unlearn_tui.tui.cli import sidecar_path

    s = session_dir / "s.toml"
    s.write_text(SESSION.replace('mode = "idk"', 'mode = "self-improve"'))
    before = s.read_text()
    a, b = session_dir / "a.json", session_dir / "b.json"
    rc, _, err = _replay_in_process(capsys, str(s), "--out", str(a))
    assert rc == 0, err
    assert s.read_text() == before                       # the user's file is untouched
    side = sidecar_path(s)
    assert side == session_dir / ".s.generated.toml" and side.is_file()
    assert "the session file is unchanged" in err and str(side) in err
    text = side.read_text()
    assert text.startswith("# Model-written targets") and "[[targets]]" in text
    # the next replay reads it back: the same targets, so the same numbers
    rc, _, err = _replay_in_process(capsys, str(s), "--out", str(b))
    assert rc == 0, err
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja["targets"] == jb["targets"] and len(ja["targets"]) == 3
    for r in ja["runs"] + jb["runs"]:
        r.pop("seconds"), r.pop("eval_seconds")
    assert ja["runs"] == jb["runs"]
    assert s.read_text() == before
    # --save writes them into the session itself (comments kept)
    rc, _, err = _replay_in_process(capsys, str(s), "--save", "--quiet")
    assert rc == 0, err
    saved = s.read_text()
    assert "# a comment the user wrote" in saved and "[[targets.items]]" in saved
    # --out can never replace the sidecar
    rc, _, err = _replay_in_process(capsys, str(s), "--out", str(side))
    assert rc == 2 and "model-written" in err


def test_replay_without_a_terminal_prints_plain_progress_lines(session_dir, capsys):
    rc, out, err = _replay_in_process(capsys, str(session_dir / "s.toml"))
    assert rc == 0, err
    progress = [ln for ln in err.splitlines() if ln.startswith("unlearn-tui: progress: ")]
    assert any("evaluate forget" in ln for ln in progress)
    assert any("/" in ln and ("ETA" in ln or "done" in ln) for ln in progress)
    assert "Warning" not in err and "warn(" not in err and "deprecat" not in err.lower()
    assert "composite" in out


def test_version_and_misspelt_subcommand(capsys):
    from unlearn_tui.tui import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("unlearn-tui ")
    assert cli.main(["replya", "s.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean `replay`?" in err[0]
    assert cli.misspelt_subcommand("session.toml") is None and cli.misspelt_subcommand("foo") is None


def test_library_warnings_are_filtered(session_dir):
    proc = run_cli("replay", str(session_dir / "s.toml"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "past_key_values" not in proc.stderr, proc.stderr
