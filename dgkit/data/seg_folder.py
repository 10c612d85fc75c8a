"""Segmentation folders: ``root/<domain>/images/<stem>.png`` with ``root/<domain>/masks/<stem>.png``.

A mask is a single-channel image of integer class ids (``0 .. num_classes - 1``), 255 marking unlabelled pixels
(:data:`~dgkit.tasks.segmentation.IGNORE`). Domains are discovered from the folders (sorted) unless named, and
are split into ``in``/``out`` exactly like classification folders (:mod:`dgkit.data.benchmark`); a dataset item
is ``(image uint8 (H, W, 3), mask uint8 (H, W))``, and the DataModule passes the mask through the same
albumentations call as the image (``mask=``), so both get the same geometric transform.

Problems are reported with the file names: an image without a mask, a mask whose size differs from its image,
a mask holding a class id outside ``0 .. num_classes - 1`` (and not 255). With ``verify`` (the preset's
default) every pair is checked at setup and all problems are listed at once; the same checks run again when an
item is loaded, so a file changed later still fails with its name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dgkit.data.benchmark import Benchmark
from dgkit.data.folder import IMAGE_EXTENSIONS, read_image

IGNORE = 255  # the mask value of unlabelled pixels (dgkit.tasks.segmentation.IGNORE; data does not import tasks)

EXPECTED_TREE = """expected layout:
  {root}/
    <domain_1>/
      images/  <stem>.png ...   (RGB or grey)
      masks/   <stem>.png ...   (one channel: class ids 0..num_classes-1, 255 = ignore; same stem and size)
    <domain_2>/
      ..."""


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as ``uint8 (H, W)`` class ids.

    Raises:
        RuntimeError: unreadable, or not a single-channel image (the file is named).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise RuntimeError(f"mask {path} has mode {img.mode}: masks are single-channel class-id images")
            mask = np.asarray(img)
    except OSError as e:
        raise RuntimeError(f"cannot read mask {path}: {e}") from e
    if mask.max(initial=0) > 255:
        raise RuntimeError(f"mask {path} holds class id {int(mask.max())} (above 255)")
    return mask.astype(np.uint8)


def mask_problem(image: Path, mask: Path, num_classes: int, image_size: tuple[int, int] | None = None) -> str | None:
    """What is wrong with an image/mask pair (size mismatch, class id out of range), or ``None``.

    Args:
        image, mask: the two files.
        num_classes: the declared number of classes.
        image_size: the image's ``(W, H)`` when already known (else read from its header).
    """
    if image_size is None:
        with Image.open(image) as img:
            image_size = img.size
    values = read_mask(mask)
    mask_size = (values.shape[1], values.shape[0])
    if tuple(image_size) != mask_size:
        return (
            f"mask {mask} is {mask_size[0]}x{mask_size[1]} px but its image {image} is "
            f"{image_size[0]}x{image_size[1]} px"
        )
    ids = np.unique(values)
    bad = ids[(ids >= num_classes) & (ids != IGNORE)]
    if len(bad):
        return (
            f"mask {mask} holds class id {int(bad[0])} (ids found: {ids.tolist()}); data.num_classes={num_classes} "
            f"allows 0..{num_classes - 1} and {IGNORE} (ignore)"
        )
    return None


class SegmentationFileDataset(Dataset):
    """Image/mask pairs read lazily from files: ``(uint8 (H, W, 3), uint8 (H, W))``, each pair checked on load."""

    def __init__(self, images: Sequence[Path], masks: Sequence[Path], num_classes: int) -> None:
        self.images, self.masks, self.num_classes = list(images), list(masks), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.images[i])
        problem = mask_problem(self.images[i], self.masks[i], self.num_classes, (image.shape[1], image.shape[0]))
        if problem:
            raise ValueError(problem)
        return image, read_mask(self.masks[i])


def _pairs(domain_dir: Path) -> tuple[list[Path], list[Path]]:
    """The images of one domain and their masks (same stem), sorted by stem."""
    images_dir, masks_dir = domain_dir / "images", domain_dir / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no folder {d}\n{EXPECTED_TREE.format(root=domain_dir.parent)}")
    images = sorted(f for f in images_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    masks = {f.stem: f for f in masks_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS}
    missing = [f for f in images if f.stem not in masks]
    if missing:
        listed = "\n".join(f"  {f} (expected {masks_dir / (f.stem + '.png')})" for f in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise FileNotFoundError(f"{len(missing)} image(s) without a mask:\n{listed}{more}")
    if not images:
        raise FileNotFoundError(f"no image files under {images_dir}\n{EXPECTED_TREE.format(root=domain_dir.parent)}")
    return images, [masks[f.stem] for f in images]


def seg_folder_benchmark(
    root: str | Path,
    num_classes: int,
    domains: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "seg_folder",
    verify: bool = True,
) -> Benchmark:
    """Read a ``root/<domain>/{images,masks}/`` tree (see the module docstring).

    Args:
        root: the benchmark folder.
        num_classes: the number of classes (background included); mask ids must lie below it (or be 255).
        domains: domain folder names in canonical order; ``None`` discovers them (sorted).
        class_names: names of the classes (``None``: ``class0``, ``class1``...).
        name: benchmark name recorded with results.
        verify: check every pair now (sizes, class ids), listing every problem at once.

    Raises:
        FileNotFoundError: missing folders or masks (named).
        ValueError: bad masks with ``verify`` (all listed), or inconsistent arguments.
    """
    if num_classes < 2:
        raise ValueError(f"data.num_classes={num_classes}: segmentation needs at least 2 classes (with background)")
    classes = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"data.class_names has {len(classes)} names but data.num_classes={num_classes}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {name!r}: no folder at {root.resolve()}\n{EXPECTED_TREE.format(root=root)}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    domains = list(domains) if domains else found
    absent = [d for d in domains if d not in found]
    if absent or not domains:
        raise FileNotFoundError(
            f"dataset {name!r}: missing domain folders {[str(root / d) for d in absent] or 'under ' + str(root)}\n"
            + EXPECTED_TREE.format(root=root)
        )
    listing = {d: _pairs(root / d) for d in domains}
    if verify:
        pairs = [(i, m) for images, masks in listing.values() for i, m in zip(images, masks)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = [p for p in pool.map(lambda pair: mask_problem(*pair, num_classes), pairs) if p]
        if problems:
            raise ValueError(f"dataset {name!r}: {len(problems)} bad mask(s) under {root}:\n  " + "\n  ".join(problems))
    return Benchmark(
        name=name,
        domains=domains,
        classes=classes,
        datasets={d: SegmentationFileDataset(*listing[d], num_classes) for d in domains},
        fingerprint=_fingerprint(root, listing),
    )


def _fingerprint(root: Path, listing: dict[str, tuple[list[Path], list[Path]]]) -> str:
    """A hash of every image and mask path relative to ``root`` with its size."""
    digest = hashlib.sha1()
    for images, masks in listing.values():
        for f in (*images, *masks):
            digest.update(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
