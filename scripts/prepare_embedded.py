"""Generate (or load) the embedded benchmarks and draw one sample grid per benchmark.

    python scripts/prepare_embedded.py                           # into datasets/, no sample grids
    python scripts/prepare_embedded.py --grid docs/img           # and redraw the grids the docs show
    python scripts/prepare_embedded.py --root /data --grid /tmp  # another data root, grids elsewhere
    python scripts/prepare_embedded.py --only sam_corpus          # SAM's pre-training corpus (only when named)

Prints each domain's image count, image size and checksum (the same SHA-256 the manifest stores). With
``--grid DIR`` it also writes ``DIR/<benchmark>_samples.png``: one row per domain, one column per class
(hist_maps: tiles and their masks).
Grids are drawn only when asked, because ``docs/img/*_samples.png`` are tracked: a plain run (``make data``)
must leave the checkout clean. Nothing is
downloaded: everything is built from data that installs with scikit-learn, scikit-image, Pillow and
matplotlib. Running it again only reads the cache.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from dgkit.data.embedded import digits_dg, hist_maps, rotated_digits, sam_corpus
from dgkit.data.embedded.cache import array_checksum
from dgkit.utils.io import atomic_write

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def sample_grid(arrays: Arrays, path: Path, title: str, num_classes: int = 10, seed: int = 0, unit: str = "") -> Path:
    """Write a PNG with one row per domain (labelled ``domain + unit``) and one random image per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows = len(arrays)
    fig, axes = plt.subplots(rows, num_classes, figsize=(num_classes * 0.8 + 0.6, rows * 0.8 + 0.5), squeeze=False)
    for r, (domain, (images, labels)) in enumerate(arrays.items()):
        for c in range(num_classes):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            candidates = np.flatnonzero(labels == c)
            if len(candidates):
                ax.imshow(images[rng.choice(candidates)], interpolation="nearest")
            if r == 0:
                ax.set_title(str(c), fontsize=9)
        axes[r, 0].set_ylabel(domain + unit, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
    return path


def mask_grid(arrays: Arrays, path: Path, title: str, per_domain: int = 2, seed: int = 0, vmax: int = 2) -> Path:
    """Write a PNG with one row per domain: ``per_domain`` (tile, mask) pairs, masks in grey levels ``0..vmax``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows, cols = len(arrays), 2 * per_domain
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3 + 0.6, rows * 1.3 + 0.5), squeeze=False)
    for r, (domain, (images, masks)) in enumerate(arrays.items()):
        for j, i in enumerate(rng.choice(len(images), per_domain, replace=False)):
            axes[r, 2 * j].imshow(images[i], interpolation="nearest")
            axes[r, 2 * j + 1].imshow(masks[i], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            if r == 0:
                axes[r, 2 * j].set_title("tile", fontsize=9)
                axes[r, 2 * j + 1].set_title("mask", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(domain, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
    return path


def report(name: str, arrays: Arrays, seconds: float) -> None:
    """Print one line per domain: count, image shape, label counts and checksum."""
    total = sum(len(y) for _, y in arrays.values())
    print(f"{name}: {len(arrays)} domains, {total} images, ready in {seconds:.1f} s")
    for d, (x, y) in arrays.items():
        counts = np.bincount(y.ravel(), minlength=3 if y.ndim > 1 else 10).tolist()  # pixels per class (or id)
        print(f"  {d:>7}  n={len(y):5d}  {x.shape[1]}x{x.shape[2]}x{x.shape[3]}  classes={counts}")
        print(f"           sha256={array_checksum(x, y)}")


def main(argv: list[str] | None = None) -> None:
    """Generate or load ``digits_dg``, ``rotated_digits`` and ``hist_maps`` under ``--root``; draw their grids into
    ``--grid``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="datasets", help="data root (default: datasets)")
    parser.add_argument("--grid", default=None, help="draw the sample grids into this folder (default: none)")
    parser.add_argument("--n-per-domain", type=int, default=1797, help="digits_dg images per domain")
    parser.add_argument("--hist-maps-per-domain", type=int, default=400, help="hist_maps tiles per domain")
    parser.add_argument("--sam-corpus-per-domain", type=int, default=1000, help="sam_corpus images per domain")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="only these benchmarks (default: all but sam_corpus)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    benchmarks = {
        "digits_dg": lambda: digits_dg.load(args.root, n_per_domain=args.n_per_domain, seed=args.seed),
        "rotated_digits": lambda: rotated_digits.load(args.root, seed=args.seed),
        "hist_maps": lambda: hist_maps.load(args.root, n_per_domain=args.hist_maps_per_domain, seed=args.seed),
        "sam_corpus": lambda: sam_corpus.load(args.root, n_per_domain=args.sam_corpus_per_domain, seed=args.seed),
    }
    on_request = {"sam_corpus"}  # a pre-training corpus, not a DG benchmark: `make data` does not build it
    titles = {
        "digits_dg": "digits_dg: ink, photo, font, street (32x32)",
        "rotated_digits": "rotated_digits: RotatedMNIST protocol on scikit-learn digits (28x28)",
        "hist_maps": "hist_maps (128 px; mask: background, linear, areal)",
        "sam_corpus": "sam_corpus (128 px; instance masks, one grey level per object)",
    }
    for name, load in benchmarks.items():
        if (args.only and name not in args.only) or (not args.only and name in on_request):
            continue
        start = time.perf_counter()
        arrays = load()
        report(name, arrays, time.perf_counter() - start)
        if args.grid and name in ("hist_maps", "sam_corpus"):
            levels = 2 if name == "hist_maps" else sam_corpus.MAX_OBJECTS
            grid = mask_grid(arrays, Path(args.grid) / f"{name}_samples.png", titles[name], seed=args.seed, vmax=levels)
            print(f"  grid: {grid}")
        elif args.grid:
            unit = "°" if name == "rotated_digits" else ""
            path = sample_grid(arrays, Path(args.grid) / f"{name}_samples.png", titles[name], seed=args.seed, unit=unit)
            print(f"  grid: {path}")


if __name__ == "__main__":
    main()
