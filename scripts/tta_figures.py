"""TTA figures over a sweep's checkpoints: accuracy per held-out domain and per corruption/severity, and the
time per image relative to no TTA, for several TTAs at once (each checkpoint is loaded once).

    python scripts/tta_figures.py 'outputs/multirun/digits_erm/*' --out outputs/tta/digits_erm \\
        --ttas none,bn_adapt,tent,t3a,adanpc --corrupt-images 128 --threads 1
    python scripts/tta_figures.py --tables outputs/tta/digits_erm          # markdown tables from the results
    python scripts/tta_figures.py --tables outputs/tta/digits_erm outputs/tta/digits_erm_itta   # merged columns

Every TTA runs with its ``conf/tta/<name>.yaml`` defaults (no choice is made on the test domains). A TTA that
does not fit the model (``bn_adapt`` on a GroupNorm CNN) is recorded with its error and shown as ``n/a``.
Results go to ``<out>/<run folder name>.json`` (atomically); a run already there is skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgkit.checkpoint import load_checkpoint_and_data  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.search import without_search  # noqa: E402
from dgkit.tta import build_test_sets, evaluate_tta  # noqa: E402
from dgkit.tta.runner import result_metric  # noqa: E402
from dgkit.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


def evaluate_run(run: Path, ttas: list[str], corrupt: dict, seed: int) -> dict:
    """Every TTA on one run's ``best.ckpt``: ``{"test_domains", "results": {tta: result or {"error"}}}``."""
    _, datamodule, method = load_checkpoint_and_data(run / "checkpoints" / "best.ckpt")
    sets = build_test_sets(datamodule, None, "in", corrupt)
    results: dict = {}
    for i, name in enumerate(ttas):
        tta = instantiate(without_search(OmegaConf.load(ROOT / "conf" / "tta" / f"{name}.yaml")))
        try:  # the unadapted model is measured once, with the first TTA (time ratios are taken against it)
            results[name] = evaluate_tta(method, datamodule, tta, sets, seed=seed, baseline=i == 0)
        except ValueError as e:  # a TTA that does not fit this model: recorded, not fatal
            results[name] = {"error": str(e)}
        res = results[name]
        print(f"{run.name} {name}: {res.get(f'mean_{result_metric(res)[0]}_tta', res.get('error'))}", flush=True)
    tested = {"run": str(run), "test_domains": list(datamodule.test_domains), "corrupt": corrupt, "ttas": ttas}
    return {**tested, "results": results}


def _mean_se(values: list[float]) -> str:
    if not values:
        return "n/a"
    m = 100 * statistics.fmean(values)
    se = 100 * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.1f} ± {se:.1f}"


def _load_records(folders: list[Path]) -> dict[str, list[dict]]:
    """Run file name -> its result records, one per folder that has it, in the order of ``folders``."""
    records: dict[str, list[dict]] = defaultdict(list)
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            records[path.stem].append(json.loads(path.read_text()))
    if not records:
        raise SystemExit(f"no result files (*.json) in {', '.join(map(str, folders))}")
    return records


def _add_tta(tta: str, res: dict, base_ms: float, clean: dict, corr: dict, sev: dict, ratio: dict) -> None:
    """Add one run's result of one TTA to the per-domain, per-corruption, per-severity and time tallies."""
    ratio[tta].append(sum(row["ms_per_image_tta"] for row in res["sets"].values()) / base_ms)
    per_run_corr: dict = defaultdict(list)
    per_run_sev: dict = defaultdict(list)
    key = result_metric(res)[0]  # the task's metric (acc; miou for segmentation)
    for name, row in res["sets"].items():
        acc = row[f"{key}_tta"]
        if "/" not in name:
            if tta != "none":
                clean[name][tta].append(acc)
            continue
        kind, level = name.split("/", 1)[1].rsplit("-", 1)
        per_run_corr[kind].append(acc)
        per_run_sev[level].append(acc)
    for kind, accs in per_run_corr.items():
        corr[kind][tta].append(statistics.fmean(accs))
    for level, accs in per_run_sev.items():
        sev[level][tta].append(statistics.fmean(accs))


def tables(*folders: Path) -> str:
    """Markdown tables (mean ± standard error over runs) from every ``<folder>/*.json``.

    Folders holding other TTAs of the same runs (the same file names) are merged into one table. Each TTA's
    time ratio is taken against the unadapted timing measured in its own record; a TTA found in several
    records of a run (``none`` always is) counts once, from the first folder.
    """
    records = _load_records(list(folders))
    ttas = list(dict.fromkeys(t for recs in records.values() for rec in recs for t in rec["ttas"]))
    clean: dict = defaultdict(lambda: defaultdict(list))  # domain -> tta -> [acc per run]
    corr: dict = defaultdict(lambda: defaultdict(list))  # corruption -> tta -> [acc]
    sev: dict = defaultdict(lambda: defaultdict(list))  # severity -> tta -> [acc]
    ratio: dict = defaultdict(list)
    for recs in records.values():
        done: set[str] = set()
        for i, rec in enumerate(recs):
            base = rec["results"][rec["ttas"][0]]  # the first TTA also measured the unadapted model
            base_ms = sum(row["ms_per_image_none"] for row in base["sets"].values())
            if i == 0:  # the unadapted accuracy: once per run
                for name, row in base["sets"].items():
                    if "/" not in name:
                        clean[name]["none"].append(row[f"{result_metric(base)[0]}_none"])
            for tta, res in rec["results"].items():
                if tta in done or "sets" not in res:
                    continue
                done.add(tta)
                _add_tta(tta, res, base_ms, clean, corr, sev, ratio)
    head = "| | " + " | ".join(ttas) + " |\n|---|" + "---|" * len(ttas) + "\n"
    results = [res for recs in records.values() for rec in recs for res in rec["results"].values() if "sets" in res]
    metric = " / ".join(sorted({result_metric(res)[1] for res in results})) or "accuracy"
    out = [f"{len(records)} runs; {metric} % (held-out domain 'in' split), mean ± standard error over runs.\n"]
    out.append("Clean held-out domains\n\n" + head)
    out += [f"| {d} | " + " | ".join(_mean_se(clean[d][t]) for t in ttas) + " |\n" for d in sorted(clean)]
    if corr:
        out.append("\nCorruptions (mean over severities 1-5)\n\n" + head)
        out += [f"| {c} | " + " | ".join(_mean_se(corr[c][t]) for t in ttas) + " |\n" for c in sorted(corr)]
        out.append("\nSeverity (mean over corruptions)\n\n" + head)
        out += [f"| {s} | " + " | ".join(_mean_se(sev[s][t]) for t in ttas) + " |\n" for s in sorted(sev)]
    out.append("\nTime per image relative to no TTA (median over runs)\n\n" + head)
    out.append("| ratio | " + " | ".join(f"{statistics.median(ratio[t]):.2f}" if ratio[t] else "n/a" for t in ttas))
    return "".join(out) + " |\n"


def main() -> None:
    """Evaluate the runs matching the pattern, or print/write the tables (``--tables``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="?", help="glob of run folders (each with checkpoints/best.ckpt)")
    p.add_argument("--out", type=Path, default=Path("outputs/tta/digits_erm"))
    p.add_argument("--ttas", default="none,bn_adapt,tent,t3a,adanpc")
    p.add_argument("--corrupt-images", type=int, default=128, help="images per corrupted set (0: no corruptions)")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--tables",
        type=Path,
        nargs="+",
        metavar="FOLDER",
        help="results folders (other TTAs of the same runs merge into one table): print the tables and "
        "write them to the first folder's tables.md",
    )
    args = p.parse_args()
    if args.tables:
        text = tables(*args.tables)
        atomic_write_text(args.tables[0] / "tables.md", text)
        print(text)
        return
    register_resolvers()
    torch.set_num_threads(args.threads)
    severities = [int(s) for s in args.severities.split(",")] if args.corrupt_images else []
    corrupt = {"names": None, "severities": severities, "max_images": args.corrupt_images, "seed": args.seed}
    for run in sorted(Path(r) for r in glob.glob(args.runs)):
        target = args.out / f"{run.name}.json"
        if target.exists() or not (run / "checkpoints" / "best.ckpt").exists():
            continue
        atomic_write_json(target, evaluate_run(run, args.ttas.split(","), corrupt, args.seed))


if __name__ == "__main__":
    main()
