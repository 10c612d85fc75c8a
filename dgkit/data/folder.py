"""Image-folder benchmarks: ``root/<domain>/<class>/<image>``, the layout DomainBed uses for PACS, VLCS,
OfficeHome, TerraIncognita and DomainNet (see ``datasets/README.md``).

Domains and classes are discovered from the folders (sorted) unless the preset names the domains. Every
problem is reported before training starts, with the path and the expected tree. With ``verify`` (the folder
presets' default, ``data.verify``) every image header is checked at setup, in parallel, and every bad file is
listed at once; ``on_bad_image=skip`` (``data.on_bad_image``) leaves them out instead (they are logged and
counted in ``run.json``). Without it, an unreadable image is reported with its file name when it is loaded.

The benchmark's fingerprint is a hash of the sorted relative file paths and sizes: a run folder is never
resumed or skipped into with other data, while a moved copy of the same tree keeps its runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dgkit.data.benchmark import Benchmark

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

EXPECTED_TREE = """expected layout:
  {root}/
    <domain_1>/
      <class_a>/  image files ({ext})
      <class_b>/
    <domain_2>/
      <class_a>/
      ...
every domain holds the same class folders (see datasets/README.md)"""


class PathTable(Sequence):
    """File paths packed in one ``uint8`` buffer with ``int64`` offsets: indexing gives the path as a ``str``.

    A Python list of paths is one object per file; every loader worker that reads an entry writes its reference
    count, so the page holding it is copied into the worker (copy-on-access after ``fork``), and over a pass each
    worker holds its own copy of the list. Two numpy arrays have no per-entry objects: workers share them. The
    common directory prefix is stored once.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        names = [os.fspath(p) for p in paths]
        try:  # the deepest folder holding every file (a prefix of each path)
            common = os.path.commonpath([os.path.dirname(n) for n in names]) if names else ""
        except ValueError:  # absolute and relative paths mixed: no common prefix
            common = ""
        self.prefix = common if not common or common.endswith(os.sep) else common + os.sep
        tails = [os.fsencode(n[len(self.prefix) :]) for n in names]
        self.offsets = np.zeros(len(tails) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in tails], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(tails), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"path index {i} out of range for {len(self)} files")
        i %= len(self)
        # a str, not a Path: building a Path per read left about 130 bytes behind in a worker each time (measured)
        return self.prefix + os.fsdecode(self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes())

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays."""
        return self.buffer.nbytes + self.offsets.nbytes


class ImageFileDataset(Dataset):
    """Images read lazily from files, returned as ``uint8 (H, W, 3)`` with their label; the paths are kept in a
    :class:`PathTable` (no per-file Python objects for loader workers to copy)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int]) -> None:
        self.files = PathTable(files)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return read_image(self.files[i]), int(self.labels[i])


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``uint8 (H, W, 3)`` RGB.

    Raises:
        RuntimeError: the file cannot be read as an image (its name is given).
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:  # the header only, until pixels are asked for
            if img.format == "JPEG" and img.mode in _CV2_JPEG_MODES:
                decoded = _decode_jpeg(data)
                if decoded is not None:
                    return decoded
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert() copies even RGB
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from e


_CV2_JPEG_MODES = ("RGB", "L")  # CMYK and YCCK JPEGs: PIL's colour conversion, which OpenCV does not share


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """A JPEG decoded by OpenCV: the same pixels as PIL's decoder (both libjpeg-turbo, integer IDCT, fancy
    upsampling; tested on 4:2:0, 4:4:4, progressive and grayscale files), about twice as fast on our machines.
    EXIF orientation is ignored, as PIL does. ``None`` when OpenCV cannot decode it (PIL then does)."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image (its header, checked without decoding the pixels), or ``None``."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001 (PIL raises many types for broken files; each is a bad image)
        return f"{type(e).__name__}: {e}"
    return None


def find_bad_images(files: Sequence[Path], workers: int = 8) -> list[tuple[Path, str]]:
    """Every unreadable image among ``files`` with the reason, in order (headers checked in parallel threads)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(image_problem, files))
    return [(f, why) for f, why in zip(files, problems) if why is not None]


def _tree_error(message: str, root: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{message}\n{EXPECTED_TREE.format(root=root, ext=', '.join(IMAGE_EXTENSIONS))}")


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(root: Path, per_domain: dict[str, list[str]]) -> list[str]:
    classes = sorted(set().union(*per_domain.values()))
    problems = []
    for domain, found in per_domain.items():
        missing = sorted(set(classes) - set(found))
        if missing:
            problems.append(f"  {root / domain} lacks class folders {missing}")
    if problems:
        raise ValueError("domains do not share one class set:\n" + "\n".join(problems))
    return classes


def list_tree(
    root: str | Path, domains: Sequence[str] | None = None, name: str = "folder"
) -> tuple[Path, list[str], list[str], dict[str, tuple[list[Path], list[int]]]]:
    """The layout of a ``root/<domain>/<class>/<image>`` tree, checked: ``(root, domains, classes, listing)``
    with ``listing[domain] = (files, labels)`` (classes in order, files sorted). Shared by :func:`folder_benchmark`
    and ``scripts/prepare_cache.py``.

    Raises:
        FileNotFoundError: the tree does not have the expected layout (the layout is printed).
        ValueError: the domains do not share one class set.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _tree_error(f"dataset {name!r}: no folder at {root.resolve()}", root)
    found = _subfolders(root)
    domains = list(domains) if domains else found
    absent = [d for d in domains if d not in found]
    if absent:
        raise _tree_error(f"dataset {name!r}: missing domain folders {[str(root / d) for d in absent]}", root)
    if not domains:
        raise _tree_error(f"dataset {name!r}: {root} holds no domain folders", root)
    classes = _check_classes(root, {d: _subfolders(root / d) for d in domains})
    if not classes:
        raise _tree_error(f"dataset {name!r}: the domain folders under {root} hold no class folders", root)
    listing = {d: _list_images(root / d, classes) for d in domains}
    for d, (files, _) in listing.items():
        if not files:
            raise _tree_error(f"dataset {name!r}: no image files under {root / d}", root)
    return root, domains, classes, listing


def drop_bad_images(
    listing: dict[str, tuple[list[Path], list[int]]], root: Path, name: str, on_bad_image: str
) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """Check every image header (in parallel): ``(listing without the bad files, their paths)``.

    Raises:
        ValueError: bad images with ``on_bad_image=error`` (all listed).
    """
    bad = find_bad_images([f for files, _ in listing.values() for f in files])
    if bad and on_bad_image == "error":
        raise _bad_images_error(name, root, [(str(f), why) for f, why in bad])
    skipped = [str(f) for f, _ in bad]
    for f, why in bad:
        log.warning("skipping unreadable image %s (%s)", f, why)
    return {d: _without(files, labels, set(skipped)) for d, (files, labels) in listing.items()}, skipped


def _bad_images_error(name: str, root: Path, bad: list[tuple[str, str]]) -> ValueError:
    lines = "\n".join(f"  {f}: {why}" for f, why in bad)
    return ValueError(
        f"dataset {name!r}: {len(bad)} unreadable image(s) under {root}:\n{lines}\n"
        "remove or replace them, or pass data.on_bad_image=skip to train without them"
    )


def folder_benchmark(
    root: str | Path,
    domains: Sequence[str] | None = None,
    name: str = "folder",
    verify: bool = False,
    on_bad_image: str = "error",
    cache: int | None = None,
) -> Benchmark:
    """Read a ``root/<domain>/<class>/<image>`` tree.

    Args:
        root: the benchmark folder.
        domains: domain folder names in canonical order; ``None`` discovers them (sorted).
        name: benchmark name recorded with results.
        verify: check every image header now (in parallel) rather than when it is first read.
        on_bad_image: with ``verify``, ``error`` (list every bad file and stop) or ``skip`` (leave them out).
        cache: read the images from the decoded cache of this side (``scripts/prepare_cache.py``) instead of
            decoding the files; ``None`` decodes them. The cache's build already decoded (verified) every image,
            so ``verify`` only decides which files the fingerprint covers, as without the cache.

    Raises:
        FileNotFoundError: the tree does not have the expected layout (the layout is printed), or the decoded
            cache is missing, incomplete, stale or of another size (the command that rebuilds it is named).
        ValueError: bad images with ``on_bad_image=error`` (all listed), or an unknown policy.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.on_bad_image={on_bad_image!r}; choose one of {list(BAD_IMAGE_POLICIES)}")
    root, domains, classes, listing = list_tree(root, domains, name)
    skipped: list[str] = []
    if cache is not None:
        datasets, skipped = open_cache(root, cache, classes, listing)
        if skipped and on_bad_image == "error":
            raise _bad_images_error(name, root, [(f, "could not be decoded when the cache was built") for f in skipped])
        if verify:  # the files a verified uncached read keeps: the same fingerprint
            listing = {d: _without(files, labels, set(skipped)) for d, (files, labels) in listing.items()}
    else:
        if verify:
            listing, skipped = drop_bad_images(listing, root, name, on_bad_image)
        datasets = {d: ImageFileDataset(files, labels) for d, (files, labels) in listing.items()}
    return Benchmark(
        name=name,
        domains=domains,
        classes=classes,
        datasets=datasets,
        fingerprint=tree_fingerprint(root, listing),
        skipped=skipped,
    )


def _list_images(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The image files of one domain folder and their labels, classes in order, files sorted."""
    files, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(f)
                labels.append(label)
    return files, labels


def _without(files: list[Path], labels: list[int], skipped: set[str]) -> tuple[list[Path], list[int]]:
    kept = [(f, y) for f, y in zip(files, labels) if str(f) not in skipped]
    return [f for f, _ in kept], [y for _, y in kept]


def tree_fingerprint(root: Path, listing: dict[str, tuple[list[Path], list[int]]]) -> str:
    """A hash of every used file's path relative to ``root``, its size and its label."""
    digest = hashlib.sha1()
    for files, labels in listing.values():
        for f, y in zip(files, labels):
            digest.update(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\t{y}\n".encode())
    return digest.hexdigest()[:16]


# ---- the decoded cache (scripts/prepare_cache.py builds it) -----------------------------------------------------
CACHE_FORMAT = 1
"""Version of the cache layout; a cache of another version is refused (rebuild it)."""
CACHE_DIR = ".dgkit_cache"  # a dot folder: never taken for a domain (_subfolders skips it)
CACHE_INDEX = "index.json"  # written last: a cache folder without it is an interrupted build


def cache_dir(root: str | Path, size: int) -> Path:
    """Where the decoded cache of side ``size`` of the tree at ``root`` lives: ``root/.dgkit_cache/<size>/``."""
    return Path(root).expanduser() / CACHE_DIR / str(size)


def cache_stamp(root: Path, files: Sequence[Path], labels: Sequence[int]) -> str:
    """A hash of one domain's files as the cache saw them: relative path, size, modification time (ns), label.

    The benchmark fingerprint leaves the time out (a moved copy keeps its runs); the cache needs it, since an image
    edited in place at the same byte size would otherwise be served with its old pixels."""
    digest = hashlib.sha1()
    for f, y in zip(files, labels):
        st = f.stat()
        digest.update(f"{f.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\t{y}\n".encode())
    return digest.hexdigest()[:16]


class CachedImageDataset(Dataset):
    """Rows of a decoded cache, a ``uint8 (N, S, S, 3)`` ``.npy`` file, with their labels.

    The file is memory-mapped on first access in each process (a loader worker maps it itself; the pages are the
    OS page cache's, shared by every process), and never pickled: a worker started by ``spawn`` receives the path,
    not the pixels. An item is a private copy of its row, so transforms may write to it.
    """

    def __init__(self, file: str | Path, labels: Sequence[int]) -> None:
        self.file = os.fspath(file)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._images: np.ndarray | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self._images is None or self._pid != os.getpid():
            self._images, self._pid = np.load(self.file, mmap_mode="r"), os.getpid()
        return np.array(self._images[i]), int(self.labels[i])  # (S, S, 3) uint8

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_pid": -1}


def open_cache(
    root: Path, size: int, classes: list[str], listing: dict[str, tuple[list[Path], list[int]]]
) -> tuple[dict[str, CachedImageDataset], list[str]]:
    """The decoded cache's datasets for the domains of ``listing`` (checked against the tree) and the files its
    build left out as unreadable.

    Raises:
        FileNotFoundError: no complete cache of this size, or one of another format, or a stale one (a domain's
            files were added, removed or changed since the build); the message names the rebuild command.
    """
    folder = cache_dir(root, size)
    rebuild = f"(re)build it with: python scripts/prepare_cache.py {root} --size {size}"
    index_file = folder / CACHE_INDEX
    if not index_file.exists():
        built = sorted(p.parent.name for p in (root / CACHE_DIR).glob(f"*/{CACHE_INDEX}"))
        state = "is incomplete (an interrupted build: no index)" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"data.cache={size}: the decoded cache {folder} {state} (built: {built}); {rebuild}")
    index = json.loads(index_file.read_text())
    if index.get("format") != CACHE_FORMAT or index.get("size") != size:
        raise FileNotFoundError(
            f"data.cache={size}: {folder} holds format {index.get('format')}, size {index.get('size')}; dgkit reads "
            f"format {CACHE_FORMAT}; {rebuild}"
        )
    stale = [d for d in listing if d not in index["domains"]] if index["classes"] == classes else list(listing)
    stale += [d for d, (files, labels) in listing.items() if d not in stale
              and cache_stamp(root, files, labels) != index["domains"][d]["stamp"]]  # fmt: skip
    if stale:
        raise FileNotFoundError(
            f"data.cache={size}: the decoded cache {folder} is stale: domain(s) {stale} are not in it or changed since "
            f"it was built (images or classes added, removed or modified); {rebuild}"
        )
    datasets, skipped = {}, []
    for d in listing:
        entry = index["domains"][d]
        datasets[d] = CachedImageDataset(folder / entry["file"], entry["labels"])
        shape = np.load(datasets[d].file, mmap_mode="r").shape  # the header only; the mapping is dropped
        if shape != (len(entry["labels"]), size, size, 3):
            raise FileNotFoundError(f"data.cache={size}: {datasets[d].file} holds {shape}, not its index's; {rebuild}")
        skipped += [str(root / f) for f in entry["skipped"]]
    return datasets, skipped
