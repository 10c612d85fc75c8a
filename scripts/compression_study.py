"""Compress every finished run of a sweep and answer: does compression hurt held-out domains more than sources?

Usage::

    python scripts/compression_study.py outputs/sweeps/compress_vit --variants awq_w4 rtn_w4 awq_w8 \
        'awq_w4_target=awq_w4,calibration.allow_target=true' --out docs/results/compress_vit

Each variant is ``NAME`` (``conf/compress/NAME.yaml``) or ``LABEL=NAME,key=value,...`` (overrides of that
config). Every run's ``best.ckpt`` is compressed into ``<run>/variants/<LABEL>/`` (skipped when already done),
so ``scripts/collect_results.py`` then tabulates the variants as rows. This script prints and writes
(``study.md``, ``study.json``) the change of each variant against the run's own float model, on the ``in``
split: mean over held-out domains, mean over source domains, and their paired difference, each with its
standard error over runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.compress.runner import compress_checkpoint  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.eval.records import load_runs, split_finished  # noqa: E402
from dgkit.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """``(label, config name, overrides)`` of a ``NAME`` or ``LABEL=NAME,key=value,...`` spec."""
    label, _, rest = spec.partition("=") if "=" in spec.split(",")[0] else (spec, "", spec)
    name, *overrides = rest.split(",")
    return label, name, overrides


def variant_config(label: str, name: str, overrides: list[str]) -> dict:
    """The compression link's config: ``conf/compress/<name>.yaml`` with ``overrides``, named ``label``."""
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("compress_checkpoint", overrides=[f"compress={name}", "ckpt=x",
                                                        *[f"compress.{o}" for o in overrides]])  # fmt: skip
    config = OmegaConf.to_container(cfg.compress, resolve=True)
    config["name"] = label
    return config


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def change(final: dict) -> tuple[float, float]:
    """``(mean held-out change, mean source change)`` in points of a variant's ``final.json``."""
    metric, before = final["metric"], final["compress"]["before"]
    held, source = [], []
    for domain in final["domains"]:
        key = f"{metric}/{domain}/in"
        delta = 100 * (final["scores"][domain]["in"] - before[key])
        (held if domain in final["test_domains"] else source).append(delta)
    return sum(held) / len(held), sum(source) / len(source)


def main(argv: list[str] | None = None) -> int:
    """Compress what is missing, then print and write the held-out-versus-source table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [r for d in args.dirs for r in split_finished(load_runs(d))[0] if r.path.parent.name != "variants"]
    rows = []
    for spec in args.variants:
        label, name, overrides = parse_variant(spec)
        config = variant_config(label, name, overrides)
        changes, errors = [], []
        for run in runs:
            folder = run.path / "variants" / label
            if not (folder / "done").exists():
                compress_checkpoint(run.path / "checkpoints" / "best.ckpt", config, label)
            final = json.loads((folder / "final.json").read_text())
            changes.append(change(final))
            errors.append(final["compress"]["report"].get("logits_error"))
        held, source = [c[0] for c in changes], [c[1] for c in changes]
        rows.append({"variant": label, "runs": len(changes), "held_out": mean_se(held), "source": mean_se(source),
                     "difference": mean_se([h - s for h, s in changes])})  # fmt: skip
        if all(errors):  # AWQ: relative logits error on the calibration images, against RTN at the same bits
            rows[-1]["logits_error"] = {k: mean_se([e[k] for e in errors]) for k in errors[0]}
    lines = [
        "| variant | runs | held-out change | source change | held-out − source |",
        "|---|---|---|---|---|",
        *[
            f"| {r['variant']} | {r['runs']} | {r['held_out'][0]:+.2f} ± {r['held_out'][1]:.2f} | "
            f"{r['source'][0]:+.2f} ± {r['source'][1]:.2f} | {r['difference'][0]:+.2f} ± {r['difference'][1]:.2f} |"
            for r in rows
        ],
    ]
    awq = [r for r in rows if "logits_error" in r]
    if awq:
        lines += ["", "| variant | logits rel. L2 error | RTN at the same bits |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['logits_error']['awq'][0]:.4f} ± {r['logits_error']['awq'][1]:.4f} | "
                  f"{r['logits_error']['rtn'][0]:.4f} ± {r['logits_error']['rtn'][1]:.4f} |" for r in awq]  # fmt: skip
    note = "Change in accuracy points against each run's float model ('in' split), mean ± s.e. over runs."
    if awq:
        note += " Logits error: relative L2 against the float model on the calibration (source) images."
    text = "\n".join(lines) + f"\n\n{note}\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "study.md", text)
    atomic_write_json(args.out / "study.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
