"""Golden tests for model selection and result tables (dgkit.eval, scripts/collect_results.py).

Every expected number is computed by hand in the test from the records the test writes, never by the code.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dgkit.eval import (
    Cell,
    LeaveOneDomainOut,
    RecordsError,
    TestDomainOracle,
    TrainingDomainValidation,
    format_cell,
    load_runs,
    summarise,
    to_csv,
    to_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "collect_results.py"
DOMAINS = ("A", "B", "C")
FILL = 0.5  # every accuracy a record does not set explicitly
IID, LODO, ORACLE = TrainingDomainValidation(), LeaveOneDomainOut(), TestDomainOracle()


def rec(step: int, **accs: float) -> dict:
    """A record at ``step``; ``A_in=0.9`` sets ``acc/A/in``; every other split of every domain is FILL."""
    record = {"step": step, "epoch": step // 100}
    for d in DOMAINS:
        for split in ("in", "out"):
            record[f"acc/{d}/{split}"] = accs.pop(f"{d}_{split}", FILL)
    assert not accs, f"unknown keys {accs}"
    return record


def write_run(
    root: Path,
    test: tuple[str, ...],
    records: list[dict],
    *,
    seed: int = 0,
    tag: str = "ERM",
    hparams: str = "h0",
    done: bool = True,
    dataset: str = "toy",
) -> Path:
    """Write one run directory (nested two levels deep, as a Hydra multirun does) and return it."""
    path = root / tag / f"{hparams}_s{seed}_{'-'.join(test)}" / "run"
    path.mkdir(parents=True)
    meta = {
        "dataset": dataset,
        "domains": list(DOMAINS),
        "test_domains": list(test),
        "seed": seed,
        "tag": tag,
        "hparams": hparams,
    }
    (path / "run.json").write_text(json.dumps(meta))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (path / "done").touch()
    return path


def table_row(markdown: str, heading: str, tag: str) -> list[str]:
    """The cells of row ``tag`` in the table under ``heading``."""
    section = markdown.split(f"### {heading}\n", 1)[1].split("###", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == tag:
            return cells[1:]
    raise AssertionError(f"no row {tag!r} under {heading!r}")


def run_main(argv: list[str]) -> int:
    """Call the script's ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("collect_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture
def two_candidates(tmp_path):
    """Test domain A, seed 0, hparams candidates h0 and h1, evaluated at steps 100 and 200."""
    write_run(
        tmp_path,
        ("A",),
        [
            rec(100, B_out=0.80, C_out=0.70, A_in=0.60, A_out=0.60),
            rec(200, B_out=0.70, C_out=0.60, A_in=0.65, A_out=0.62),
        ],
        hparams="h0",
    )
    write_run(
        tmp_path,
        ("A",),
        [
            rec(100, B_out=0.60, C_out=0.60, A_in=0.50, A_out=0.95),
            rec(200, B_out=0.72, C_out=0.74, A_in=0.70, A_out=0.90),
        ],
        hparams="h1",
    )
    return load_runs(tmp_path)


def test_training_domain_validation_picks_an_early_step(two_candidates):
    # val = mean of B_out, C_out: h0@100 (0.80+0.70)/2 = 0.75, h0@200 0.65, h1@100 0.60, h1@200 (0.72+0.74)/2 = 0.73
    choice = IID.select(two_candidates, "A")
    assert (choice.hparams, choice.step) == ("h0", 100)  # not the last step
    assert choice.val_score == pytest.approx((0.80 + 0.70) / 2)
    assert choice.test_score == pytest.approx(0.60)  # acc/A/in at h0, step 100


def test_oracle_reads_only_the_last_step_and_picks_another_candidate(two_candidates):
    # last steps: h0@200 A_out 0.62, h1@200 A_out 0.90 -> h1 (h1@100's 0.95 is not the last step, so not seen)
    choice = ORACLE.select(two_candidates, "A")
    assert (choice.hparams, choice.step) == ("h1", 200)
    assert choice.val_score == pytest.approx(0.90)
    assert choice.test_score == pytest.approx(0.70)


def test_rules_without_runs_for_the_domain_give_none(two_candidates):
    assert IID.select(two_candidates, "B") is None
    assert ORACLE.select(two_candidates, "B") is None
    assert LODO.select(two_candidates, "A") is None  # no runs with two test domains


def test_leave_one_domain_out_on_three_domains(tmp_path):
    # h0: val(100) = (B_in of {A,B} + C_in of {A,C}) / 2 = (0.80 + 0.70) / 2 = 0.75; val(200) = (0.60 + 0.60) / 2
    write_run(tmp_path, ("A",), [rec(100, A_in=0.50), rec(200, A_in=0.55)], hparams="h0")
    write_run(tmp_path, ("A", "B"), [rec(100, B_in=0.80, A_in=0.99), rec(200, B_in=0.60)], hparams="h0")
    write_run(tmp_path, ("C", "A"), [rec(100, C_in=0.70), rec(200, C_in=0.60)], hparams="h0")
    # h1: val(100) = (0.90 + 0.58) / 2 = 0.74; val(200) = (0.85 + 0.75) / 2 = 0.80;
    # step 300 is skipped: the {A,C} run has no evaluation there (its val would be (1.0 + ?) / 2)
    write_run(tmp_path, ("A",), [rec(100, A_in=0.65), rec(200, A_in=0.68), rec(300, A_in=0.99)], hparams="h1")
    write_run(tmp_path, ("B", "A"), [rec(100, B_in=0.90), rec(200, B_in=0.85), rec(300, B_in=1.0)], hparams="h1")
    write_run(tmp_path, ("A", "C"), [rec(100, C_in=0.58), rec(200, C_in=0.75)], hparams="h1")
    # h2 has no {A,C} run: skipped whatever its accuracies
    write_run(tmp_path, ("A",), [rec(100, A_in=0.10)], hparams="h2")
    write_run(tmp_path, ("A", "B"), [rec(100, B_in=1.0)], hparams="h2")
    runs = load_runs(tmp_path)

    choice = LODO.select(runs, "A")
    assert (choice.hparams, choice.step) == ("h1", 200)
    assert choice.val_score == pytest.approx((0.85 + 0.75) / 2)
    assert choice.test_score == pytest.approx(0.68)  # acc/A/in of h1's single-test-domain run at step 200
    assert LODO.select(runs, "B") is None  # no single-test-domain run for B, no {B,C} pair

    # the pair runs are invisible to the other two rules: training-domain validation sees only the single
    # runs, whose source out accuracies are all FILL, so the first candidate wins (h0, step 100)
    iid = IID.select(runs, "A")
    assert (iid.hparams, iid.step, iid.test_score) == ("h0", 100, pytest.approx(0.50))

    summary = summarise(runs)
    assert summary["toy"][LODO.name]["ERM"]["A"].mean == pytest.approx(68.0)
    assert summary["toy"][LODO.name]["ERM"]["B"] is None


@pytest.fixture
def seeds_sweep(tmp_path):
    """ERM: A on seeds 0-2 (0.1, 0.2, 0.3), B on seeds 0-1 (0.5, 0.7), C never; DANN: seed 0 on A, B, C."""
    for seed, acc in enumerate([0.1, 0.2, 0.3]):
        write_run(tmp_path, ("A",), [rec(100, A_in=acc)], seed=seed)
    for seed, acc in enumerate([0.5, 0.7]):
        write_run(tmp_path, ("B",), [rec(100, B_in=acc)], seed=seed)
    for domain, acc in zip(DOMAINS, [0.4, 0.6, 0.8]):
        write_run(tmp_path, (domain,), [rec(100, **{f"{domain}_in": acc})], tag="DANN")
    return tmp_path


def test_mean_and_standard_error_over_seeds(seeds_sweep):
    summary = summarise(load_runs(seeds_sweep))
    erm = summary["toy"][IID.name]["ERM"]
    # A: mean 0.2; population variance ((0.1-0.2)^2 + 0 + (0.3-0.2)^2) / 3 = 0.02/3; SE = sqrt(0.02/3) / sqrt(3)
    se_a = math.sqrt(0.02 / 3) / math.sqrt(3)  # 0.0471...
    assert erm["A"].mean == pytest.approx(20.0)
    assert erm["A"].se == pytest.approx(100 * se_a)
    assert erm["A"].n_seeds == 3
    assert format_cell(erm["A"]) == "20.0 ± 4.7"
    # B: seed 2 is missing, so the cell averages 2 seeds: mean 0.6, std 0.1, SE 0.1 / sqrt(2) = 0.0707
    assert erm["B"].n_seeds == 2
    assert format_cell(erm["B"]) == "60.0 ± 7.1"
    assert erm["C"] is None and format_cell(None) == "X"

    markdown = to_markdown(summary)
    heading = f"toy — {IID.name}"
    assert table_row(markdown, heading, "Algorithm") == ["A", "B", "C", "Avg"]
    assert table_row(markdown, heading, "ERM") == ["20.0 ± 4.7", "60.0 ± 7.1", "X", "X"]  # a missing domain: Avg X
    # DANN: one seed each, so no standard error (not "± 0.0"); Avg = (40 + 60 + 80) / 3 = 60.0
    assert table_row(markdown, heading, "DANN") == ["40.0 (1 seed)", "60.0 (1 seed)", "80.0 (1 seed)", "60.0"]
    # under each table, the selection score behind each cell: here the source domains' out score (FILL)
    section = markdown.split(f"### {heading}\n", 1)[1].split("###", 1)[0]
    selection = section.split("Selection score (%) behind each cell (mean source-domain `out` score)", 1)[1]
    assert table_row(f"### s\n{selection}", "s", "ERM") == [f"{100 * FILL:.1f} [1]"] * 2 + ["X"]  # one candidate
    # no run with two test domains: the leave-one-domain-out table is replaced by a note
    assert f"### toy — {LODO.name}\n\n_Table omitted" in markdown
    assert table_row(markdown, f"toy — {ORACLE.name}", "ERM")[0] == "20.0 ± 4.7"


def test_average_is_the_mean_of_unrounded_domain_means():
    # 10.04 and 10.04 and 10.07 round to 10.0, 10.0, 10.1 but average (10.04 + 10.04 + 10.07) / 3 = 10.05
    from dgkit.eval import row_average

    row = {d: Cell(mean=m, se=0.0, n_seeds=1) for d, m in zip(DOMAINS, [10.04, 10.04, 10.07])}
    assert row_average(row) == pytest.approx((10.04 + 10.04 + 10.07) / 3)
    assert row_average({**row, "C": None}) is None


def test_csv_is_long_format(seeds_sweep):
    rows = list(csv.DictReader(io.StringIO(to_csv(summarise(load_runs(seeds_sweep))))))
    columns = ["dataset", "rule", "tag", "test_domain", "mean", "se", "n_seeds", "val_mean", "n_candidates"]
    assert list(rows[0]) == columns
    erm_a = [r for r in rows if r["rule"] == IID.name and r["tag"] == "ERM" and r["test_domain"] == "A"]
    assert len(erm_a) == 1
    assert float(erm_a[0]["mean"]) == pytest.approx(20.0)
    assert float(erm_a[0]["se"]) == pytest.approx(100 * math.sqrt(0.02 / 3) / math.sqrt(3), abs=1e-4)  # 4 decimals
    assert erm_a[0]["n_seeds"] == "3"
    assert float(erm_a[0]["val_mean"]) == pytest.approx(100 * FILL)  # the sources' out scores that selected it
    # 2 tags x 2 rules with results (IID, oracle): ERM has A and B, DANN has A, B, C -> (2 + 3) x 2 rows
    assert len(rows) == (2 + 3) * 2


def test_script_writes_the_three_files(seeds_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_main([str(seeds_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"### toy — {IID.name}" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md", "toy.png"]
    assert (out / "results.md").read_text(encoding="utf-8").strip() == printed.out.strip()
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_script_skips_unfinished_runs(tmp_path, capsys):
    write_run(tmp_path, ("A",), [rec(100, A_in=0.2)], seed=0)
    write_run(tmp_path, ("A",), [rec(100, A_in=0.4)], seed=1, done=False)
    assert run_main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unfinished run" in captured.err
    assert table_row(captured.out, f"toy — {IID.name}", "ERM")[0] == "20.0 (1 seed)"  # seed 0 only
    assert (tmp_path / "results.md").exists()  # --out defaults to DIR

    assert run_main([str(tmp_path), "--include-incomplete"]) == 0
    # seeds 0 and 1: mean (0.2 + 0.4) / 2 = 0.3, std 0.1, SE 0.1 / sqrt(2) = 0.0707
    assert table_row(capsys.readouterr().out, f"toy — {IID.name}", "ERM")[0] == "30.0 ± 7.1"


def test_script_errors(tmp_path, capsys):
    assert run_main([str(tmp_path)]) == 1
    assert "no runs found" in capsys.readouterr().err
    assert run_main([str(tmp_path / "absent")]) == 1
    assert "no such directory" in capsys.readouterr().err

    write_run(tmp_path, ("A",), [rec(100)], done=False)
    assert run_main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_malformed_files_are_named(tmp_path):
    path = write_run(tmp_path, ("A",), [rec(100)])
    (path / "results.jsonl").write_text(json.dumps(rec(100)) + "\n{not json\n")
    with pytest.raises(RecordsError, match=r"results\.jsonl:2: not valid JSON"):
        load_runs(tmp_path)

    record = rec(100)
    del record["acc/B/out"]
    (path / "results.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(RecordsError, match=r"results\.jsonl:1: missing 'acc/B/out'"):
        load_runs(tmp_path)

    (path / "results.jsonl").write_text(json.dumps(rec(100, A_in=93.0)) + "\n")
    with pytest.raises(RecordsError, match=r"must be a score in \[0, 1\]"):
        load_runs(tmp_path)

    meta = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**meta, "test_domains": ["Z"]}))
    with pytest.raises(RecordsError, match=r"run\.json: test domain\(s\) \['Z'\] not in domains"):
        load_runs(tmp_path)


def test_inconsistent_or_duplicate_runs_are_refused(tmp_path):
    first = write_run(tmp_path, ("A",), [rec(100)], seed=0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "results.jsonl", "done"):
        (copy / name).write_bytes((first / name).read_bytes())
    with pytest.raises(RecordsError, match="duplicate run"):
        summarise(load_runs(tmp_path))

    meta = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**meta, "domains": ["C", "B", "A"]}))
    with pytest.raises(RecordsError, match="differ from"):
        summarise(load_runs(tmp_path))


def test_script_runs_from_the_repo_root(seeds_sweep):
    result = subprocess.run(
        [sys.executable, "scripts/collect_results.py", str(seeds_sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| ERM " in result.stdout
    assert (seeds_sweep / "results.csv").exists()


def test_several_sweep_folders_give_one_table(tmp_path, capsys):
    erm, dann = tmp_path / "erm", tmp_path / "dann"
    write_run(erm, ("A",), [rec(100, A_in=0.2)], seed=0, tag="ERM")
    write_run(dann, ("A",), [rec(100, A_in=0.5)], seed=0, tag="DANN")
    assert run_main([str(erm), str(dann)]) == 1  # several folders need --out
    assert "--out is required" in capsys.readouterr().err
    out = tmp_path / "both"
    assert run_main([str(erm), str(dann), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert table_row(printed, f"toy — {IID.name}", "ERM")[0] == "20.0 (1 seed)"
    assert table_row(printed, f"toy — {IID.name}", "DANN")[0] == "50.0 (1 seed)"
    assert (out / "results.md").exists()
    assert run_main([str(erm), str(tmp_path / "absent"), "--out", str(out)]) == 1
    assert "absent" in capsys.readouterr().err
