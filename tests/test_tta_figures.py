"""Tables of scripts/tta_figures.py: means, standard errors and time ratios against hand computations,
including folders holding other TTAs of the same runs merged into one table."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("tta_figures", ROOT / "scripts" / "tta_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(acc_none: float, acc_tta: float, ms_none: float, ms_tta: float) -> dict:
    return {"acc_none": acc_none, "acc_tta": acc_tta, "ms_per_image_none": ms_none, "ms_per_image_tta": ms_tta}


def _record(run: str, results: dict) -> dict:
    return {"run": f"/x/{run}", "test_domains": ["ink"], "ttas": list(results), "results": results}


def _write(folder: Path, run: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run}.json").write_text(json.dumps(record))


def test_merged_folders_give_one_column_per_tta(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # run r1 and r2: folder a has none + tent (+ an n/a bn_adapt), folder b has none + itta of the same runs
    for run, base, tent, itta, ms_b in [("r1", 0.50, 0.60, 0.55, 2.0), ("r2", 0.70, 0.65, 0.80, 4.0)]:
        sets_none = {"ink": _row(base, base, 1.0, 1.0), "ink/fog-1": _row(0.3, 0.3, 1.0, 1.0)}
        sets_tent = {"ink": _row(base, tent, 1.0, 2.0), "ink/fog-1": _row(0.3, 0.4, 1.0, 3.0)}
        _write(
            a,
            run,
            _record(
                run, {"none": {"sets": sets_none}, "bn_adapt": {"error": "no BatchNorm"}, "tent": {"sets": sets_tent}}
            ),
        )
        sets_none_b = {"ink": _row(base, base, ms_b, ms_b), "ink/fog-1": _row(0.3, 0.3, ms_b, ms_b)}
        sets_itta = {"ink": _row(base, itta, ms_b, 8 * ms_b), "ink/fog-1": _row(0.3, 0.2, ms_b, 8 * ms_b)}
        _write(b, run, _record(run, {"none": {"sets": sets_none_b}, "itta": {"sets": sets_itta}}))

    text = _module().tables(a, b)
    lines = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| |")
    }

    def cell(values: list[float]) -> str:
        return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values) / 2**0.5:.1f}"

    assert text.startswith("2 runs;")  # two runs, not four records
    assert "| | none | bn_adapt | tent | itta |" in text
    assert lines["ink"] == [cell([0.50, 0.70]), "n/a", cell([0.60, 0.65]), cell([0.55, 0.80])]
    assert lines["fog"] == [cell([0.3, 0.3]), "n/a", cell([0.4, 0.4]), cell([0.2, 0.2])]
    # tent's ratio against folder a's baseline ((2+3)/(1+1)), itta's against folder b's own baseline (8)
    assert lines["ratio"] == ["1.00", "n/a", "2.50", "8.00"]


def test_single_folder_matches_the_hand_computation(tmp_path: Path) -> None:
    for i, acc in enumerate([0.2, 0.4, 0.9]):
        none, t3a = {"photo": _row(acc, acc, 1.0, 1.0)}, {"photo": _row(acc, acc + 0.05, 1.0, 1.5)}
        _write(tmp_path, f"r{i}", _record(f"r{i}", {"none": {"sets": none}, "t3a": {"sets": t3a}}))
    text = _module().tables(tmp_path)
    sd = statistics.stdev([20.0, 40.0, 90.0])
    assert f"| photo | {50.0:.1f} ± {sd / 3**0.5:.1f} | {55.0:.1f} ± {sd / 3**0.5:.1f} |" in text
    assert "| ratio | 1.00 | 1.50 |" in text
