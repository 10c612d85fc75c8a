"""Export a trained checkpoint to a runnable, checked folder (ONNX Runtime or a ``torch.export`` program).

Usage::

    python scripts/export.py ckpt=outputs/runs/<run>/checkpoints/best.ckpt
    python scripts/export.py ckpt=.../checkpoints/transformed.ckpt export=onnx threads=1   # a compressed model
    python scripts/export.py ckpt=... export=torch out=exports/vit data.root=/new/place/PACS

Writes ``model.onnx`` (or ``model.pt2``), ``manifest.json``, ``parity.json`` and ``bench.json`` into ``out``
(default ``<run folder>/exports/<export>[-<compression links>]``), and only if the export agrees with the
PyTorch model on real images of every domain (the run's dataset is read for that: ``data.root=`` when it moved).
``python scripts/predict.py ckpt=<export folder> images=...`` then predicts with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.errors import EXIT_USER_ERROR, show_tracebacks  # noqa: E402
from dgkit.export.folder import KINDS, export_checkpoint  # noqa: E402
from dgkit.export.parity import ParityThresholds  # noqa: E402

USAGE = (
    "usage: python scripts/export.py ckpt=PATH [export=onnx|torch] [out=DIR] [threads=1] [data.root=DIR] "
    "[images_per_domain=32] [bench_runs=20] [overwrite=false] [aoti=false] [parity.max_abs_diff=1e-4] "
    "[parity.top1=1.0] [parity.quantised_top1=0.99]"
)
KEYS = ("ckpt", "export", "out", "threads", "data.root", "paths.datasets", "images_per_domain", "seed",
        "bench_runs", "overwrite", "aoti", "parity.max_abs_diff", "parity.top1", "parity.quantised_top1",
        "parity.quantised_rel_l2")  # fmt: skip


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"data": {"root": x}}`` as ``{"data.root": x}``."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse ``key=value`` arguments, export, print the folder and its parity; return the exit status."""
    args = _flat(OmegaConf.to_container(OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))))
    unknown = sorted(set(args) - set(KEYS))
    if unknown or "ckpt" not in args:
        print(f"error: {'unknown keys ' + str(unknown) if unknown else 'ckpt= is required'}\n{USAGE}", file=sys.stderr)
        return 2
    kind = str(args.get("export", "onnx"))
    if kind not in KINDS:
        print(f"error: export={kind}: choose one of {list(KINDS)}\n{USAGE}", file=sys.stderr)
        return 2
    overrides = {k: args[k] for k in ("data.root", "paths.datasets") if args.get(k)}
    limits = {k.split(".", 1)[1]: float(v) for k, v in args.items() if k.startswith("parity.") and v is not None}
    try:
        folder = export_checkpoint(
            args["ckpt"], args.get("out"), kind=kind, threads=int(args.get("threads", 1)), overrides=overrides,
            thresholds=ParityThresholds(**limits), images_per_domain=int(args.get("images_per_domain", 32)),
            seed=int(args.get("seed", 0)), bench_runs=int(args.get("bench_runs", 20)),
            overwrite=bool(args.get("overwrite", False)), aoti=bool(args.get("aoti", False)),
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        if show_tracebacks():
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(describe(folder))
    return 0


def describe(folder: Path) -> str:
    """What was written: the folder, each parity check, the file's size and latency, how to predict with it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    bench = json.loads((folder / "bench.json").read_text())
    lines = [f"wrote {folder}"]
    for name, c in manifest["parity"]["checks"].items():
        lines.append(f"  parity {name}: max |dlogit| {c['max_abs_diff']:.2g}, rel L2 {c['rel_l2']:.2g}, "
                     f"top-1 agreement {100 * c['top1_agreement']:.1f} % on {c['images']} images")  # fmt: skip
    latency = ", ".join(f"{k.replace('_', ' ')} {v['wall_ms']:.1f} ms" for k, v in bench["latency"].items())
    lines.append(f"  {bench['file']} {bench['file_mb']:.2f} MB; {bench['threads']} thread(s): {latency}")
    lines.append(f"  predict: python scripts/predict.py ckpt={folder} images=DIR_OR_GLOB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
