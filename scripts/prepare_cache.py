"""Build the decoded cache of a folder benchmark: every image decoded once, resized, stored as ``uint8`` rows.

Usage::

    python scripts/prepare_cache.py ROOT [--size 256] [--workers N] [--on-bad-image error|skip]

then train with ``data.cache=256``. For trees where JPEG decoding dominates the loader's CPU time (large photos,
many workers' worth of decoding per step): a training image is then one row copied out of a memory-mapped file.

Layout (``ROOT/.dgkit_cache/<size>/``): one ``<domain>.npy`` per domain, ``uint8 (N, size, size, 3)`` RGB, rows
in :func:`dgkit.data.folder.list_tree` order (classes in order, files sorted: the order ``folder_benchmark``
gives), and ``index.json``: the format version, the size, the classes, the tree's fingerprint as
:func:`~dgkit.data.folder.tree_fingerprint` computes it, and per domain its rows' relative paths and labels, the
files left out as unreadable and a stamp of its files (:func:`~dgkit.data.folder.cache_stamp`: path, size,
modification time, label), which a run checks before reading. The cache is built in a temporary folder beside
it, the index written last, and the folder renamed into place: an interrupted build leaves no folder that looks
like a cache (a folder without its index is refused).

Resizing squashes every image to ``size x size`` (area averaging, ``cv2.INTER_AREA``: antialiased when
shrinking); the aspect ratio is not kept. That is what dgkit's evaluation pipeline already does (``A.Resize`` to
the square input size), so evaluated images keep their geometry (up to a second resampling), and the
``imagenet`` policy's random resized crop draws crops of aspect 3/4 to 4/3 and resizes them to the square input,
so training already sees squashed content; a centre crop would instead cut off borders that evaluation sees.
Choose ``size`` at least the backbone's input side (224 for the ResNets and ViTs: 256 leaves room for the crop).

Why hand-written: no library caches a DomainBed folder tree as plain ``uint8`` arrays that dgkit's seeded
per-image pipeline can index and that are checked against the tree (FFCV and DALI bring their own loaders and
augmentations; WebDataset shards keep the encoded JPEGs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgkit.data.folder import (  # noqa: E402
    BAD_IMAGE_POLICIES,
    CACHE_FORMAT,
    CACHE_INDEX,
    cache_dir,
    cache_stamp,
    drop_bad_images,
    list_tree,
    read_image,
    tree_fingerprint,
)
from dgkit.utils.io import atomic_write_json  # noqa: E402

_CHUNK = 64  # images per task: large enough to amortise a task, small enough to spread over the workers


def decode_resized(path: str | Path, size: int) -> np.ndarray:
    """One image as dgkit decodes it (:func:`~dgkit.data.folder.read_image`), resized to ``uint8 (size, size, 3)``
    by area averaging (the aspect ratio is not kept; see the module docstring)."""
    return cv2.resize(read_image(path), (size, size), interpolation=cv2.INTER_AREA)


def _fill(file: str, start: int, paths: list[str], size: int) -> None:
    """Decode ``paths`` into rows ``start...`` of the ``.npy`` at ``file`` (each worker maps the file itself)."""
    cv2.setNumThreads(1)  # one image per process at a time: OpenCV's pool would fight the other workers
    rows = np.load(file, mmap_mode="r+")
    for k, p in enumerate(paths):
        rows[start + k] = decode_resized(p, size)
    rows.flush()


def _write_domain(file: Path, files: list[Path], size: int, pool: ProcessPoolExecutor | None) -> None:
    """The ``(N, size, size, 3)`` array of one domain's ``files``, decoded in chunks (in ``pool`` when given)."""
    if not files:  # every image of the domain was unreadable (skipped): an empty array, not an empty mapping
        np.save(file, np.zeros((0, size, size, 3), np.uint8))
        return
    np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3)).flush()
    chunks = [(str(file), i, [str(f) for f in files[i : i + _CHUNK]], size) for i in range(0, len(files), _CHUNK)]
    if pool is None:
        for chunk in chunks:
            _fill(*chunk)
    else:
        for done in [pool.submit(_fill, *chunk) for chunk in chunks]:
            done.result()  # re-raises a worker's error (an unreadable image, named)


def build_cache(
    root: str | Path, size: int = 256, workers: int = 0, on_bad_image: str = "error", domains: list[str] | None = None
) -> Path:
    """Decode every image of the tree at ``root`` into ``root/.dgkit_cache/<size>/`` and return that folder.

    Args:
        root: the ``root/<domain>/<class>/<image>`` tree.
        size: the side of the stored (square) images.
        workers: decoding processes (0: decode in this process).
        on_bad_image: ``error`` (list the unreadable images and stop) or ``skip`` (leave them out, recorded).
        domains: the domain folders to cache (``None``: every one found).

    Raises:
        FileNotFoundError: the tree does not have the expected layout.
        ValueError: unreadable images with ``on_bad_image=error`` (all listed), or a bad ``size``/policy.
    """
    if size < 1 or on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"size={size} (>= 1), on_bad_image={on_bad_image!r} (one of {list(BAD_IMAGE_POLICIES)})")
    root, domains, classes, listing = list_tree(root, domains, name=Path(root).name)
    # stamped before decoding: a file changed during the build makes the cache stale rather than silently old
    stamps = {d: cache_stamp(root, files, labels) for d, (files, labels) in listing.items()}
    fingerprint = tree_fingerprint(root, listing)
    try:
        kept, skipped = drop_bad_images(listing, root, root.name, on_bad_image)
    except ValueError as e:
        raise ValueError(f"{e}\n(here: --on-bad-image skip builds the cache without them)") from None
    skipped = set(skipped)
    final = cache_dir(root, size)
    _remove_dead_builds(final.parent, size)
    tmp = final.parent / f".building-{size}-{os.getpid()}"
    tmp.mkdir(parents=True)
    index = {"format": CACHE_FORMAT, "size": size, "classes": classes, "fingerprint": fingerprint, "domains": {}}
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    try:
        for d, (files, labels) in kept.items():
            _write_domain(tmp / f"{d}.npy", files, size, pool)
            index["domains"][d] = {
                "file": f"{d}.npy",
                "stamp": stamps[d],
                "paths": [f.relative_to(root).as_posix() for f in files],
                "labels": labels,
                "skipped": [f.relative_to(root).as_posix() for f in listing[d][0] if str(f) in skipped],
            }
        atomic_write_json(tmp / CACHE_INDEX, index)  # last: the folder is a cache only from here on
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return final


def _remove_dead_builds(parent: Path, size: int) -> None:
    """Delete the temporary folders of builds of this size whose process is gone (killed before cleaning up)."""
    for folder in parent.glob(f".building-{size}-*"):
        try:
            os.kill(int(folder.name.rsplit("-", 1)[1]), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``tmp``. Between the two renames there is no cache at ``final`` (a run
    then asks for a build), never a mix of the old and the new one."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> Path:
    """Build the cache from the command line; print where it is and how to use it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the folder benchmark: ROOT/<domain>/<class>/<image>")
    p.add_argument("--size", type=int, default=256, help="side of the stored square images (default 256)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--on-bad-image", default="error", choices=list(BAD_IMAGE_POLICIES))
    p.add_argument("--domains", nargs="+", default=None, help="cache only these domain folders")
    args = p.parse_args(argv)
    folder = build_cache(args.root, args.size, args.workers, args.on_bad_image, args.domains)
    rows = sum(np.load(f, mmap_mode="r").shape[0] for f in folder.glob("*.npy"))
    gb = sum(f.stat().st_size for f in folder.glob("*.npy")) / 1e9
    print(f"{folder}: {rows} images, {gb:.2f} GB; train with data.cache={args.size}")
    return folder


if __name__ == "__main__":
    main()
