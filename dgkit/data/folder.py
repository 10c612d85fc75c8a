"""Image-folder benchmarks: ``root/<domain>/<class>/<image>``, the layout DomainBed uses for PACS, VLCS,
OfficeHome, TerraIncognita and DomainNet (see ``datasets/README.md``).

Domains and classes are discovered from the folders (sorted) unless the preset names the domains. Every
problem is reported before training starts, with the path and the expected tree; an unreadable image is
reported with its file name when it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dgkit.data.benchmark import Benchmark

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


class ImageFileDataset(Dataset):
    """Images read lazily from files, returned as ``uint8 (H, W, 3)`` with their label."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int]) -> None:
        self.files = list(files)
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
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from e


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


def folder_benchmark(root: str | Path, domains: Sequence[str] | None = None, name: str = "folder") -> Benchmark:
    """Read a ``root/<domain>/<class>/<image>`` tree.

    Args:
        root: the benchmark folder.
        domains: domain folder names in canonical order; ``None`` discovers them (sorted).
        name: benchmark name recorded with results.
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
    datasets = {}
    for d in domains:
        files, labels = [], []
        for label, c in enumerate(classes):
            for f in sorted((root / d / c).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    files.append(f)
                    labels.append(label)
        if not files:
            raise _tree_error(f"dataset {name!r}: no image files under {root / d}", root)
        datasets[d] = ImageFileDataset(files, labels)
    return Benchmark(name=name, domains=domains, classes=classes, datasets=datasets)
