"""Predict with a trained checkpoint, or its export folder, on image files, with the stored preprocessing.

Usage::

    python scripts/predict.py ckpt=outputs/runs/<run>/checkpoints/best.ckpt images=path/to/folder
    python scripts/predict.py ckpt=... 'images=photos/*.png' out=preds.csv batch_size=32
    python scripts/predict.py ckpt=outputs/runs/<run>/exports/onnx images=path/to/folder   # an export folder
    python scripts/predict.py ckpt=<segmentation run>/checkpoints/best.ckpt images=tiles/ out_dir=masks/

Writes ``predictions.csv`` (``path, class, probability``; default: next to the run folder's ``checkpoints/``, or
``predictions-<export>.csv`` beside an export folder) atomically. No dataset is needed: the checkpoint (or the
export's ``manifest.json``, see ``scripts/export.py``) holds the class names and the preprocessing.

What a row holds is the task's prediction record. A segmentation model writes one mask PNG per image (class ids as
``uint8``, at the image's original size, sub-folders of ``images`` kept) into ``out_dir`` (default:
``<csv stem>_masks/`` beside the CSV) and the CSV lists ``path, mask_path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.errors import EXIT_USER_ERROR  # noqa: E402
from dgkit.predict import predict_checkpoint  # noqa: E402
from dgkit.utils.allocator import tune_allocator  # noqa: E402

USAGE = (
    "usage: python scripts/predict.py ckpt=CHECKPOINT_OR_EXPORT_FOLDER images=DIR_OR_GLOB [out=predictions.csv] "
    "[batch_size=64] [out_dir=MASK_FOLDER]"
)
KEYS = ("ckpt", "images", "out", "batch_size", "out_dir")


def default_out(ckpt: Path) -> Path:
    """``<run folder>/predictions.csv`` for a run's checkpoint; ``predictions-<name>.csv`` beside an export folder."""
    if ckpt.is_dir():
        return ckpt.resolve().parent / f"predictions-{ckpt.resolve().name}.csv"
    return ckpt.resolve().parents[1] / "predictions.csv"


def main(argv: list[str] | None = None) -> int:
    """Parse ``key=value`` arguments, predict, print where the CSV went; return the exit status."""
    args = OmegaConf.to_container(OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    unknown = sorted(set(args) - set(KEYS))
    if unknown or "ckpt" not in args or "images" not in args:
        print(f"error: {'unknown keys ' + str(unknown) if unknown else 'ckpt= and images= are required'}\n{USAGE}",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.get("out") or default_out(Path(args["ckpt"])))
    try:
        path = predict_checkpoint(
            args["ckpt"], args["images"], out, int(args.get("batch_size", 64)), out_dir=args.get("out_dir")
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    tune_allocator()  # glibc: reuse freed buffers across batches (DGKIT_MALLOC=default: off)
    sys.exit(main())
