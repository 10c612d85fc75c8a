"""The DataModule: per-domain training batches, every domain's in/out split for evaluation.

Training yields ``{domain: (x, y)}`` with one batch from every source domain per step (Lightning's
``CombinedLoader`` in ``max_size_cycle`` mode), so every method sees domain labels; ``batch_size`` is per
domain. Validation yields, in :func:`eval_splits` order, the ``in`` and ``out`` split of every domain,
sources and held-out ones alike, so any selection rule can be applied after training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

from dgkit.backbones.base import DataConfig
from dgkit.data.benchmark import Benchmark, eval_splits, resolve_test_domains, split_indices
from dgkit.data.transforms import build_transform


class TransformedDataset(Dataset):
    """Applies an albumentations pipeline to ``(uint8 image, label)`` items."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image=image)["image"], label


class DGDataModule(pl.LightningDataModule):
    """Domain-generalisation data: sources for training, all domains for evaluation.

    Args:
        benchmark: the domains and their datasets.
        test_domains: held-out domain names (or indices); the rest are sources.
        data_config: the backbone's preprocessing (input size, mean, std).
        name: dataset name recorded with the results (defaults to the benchmark's).
        root: where the data lives (for messages only).
        image_size: the benchmark's native image side, used when no ``data_config`` is given (backbone
            configs default their input size to it).
        holdout_fraction: fraction of each domain in its ``out`` split (DomainBed: 0.2).
        split_seed: seed of the in/out shuffle (DomainBed's trial seed).
        batch_size: training batch size per source domain.
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader worker processes.
        augment: training augmentation policy (see ``dgkit.data.transforms``).
    """

    def __init__(
        self,
        benchmark: Benchmark,
        test_domains: Sequence[str | int] | str,
        data_config: DataConfig | None = None,
        name: str | None = None,
        root: str | None = None,
        image_size: int | None = None,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        augment: str = "none",
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} must be >= 1")
        self.benchmark = benchmark
        self.name = name or benchmark.name
        self.root = root
        self.domains = list(benchmark.domains)
        self.test_domains = resolve_test_domains(test_domains, self.domains)
        self.source_domains = [d for d in self.domains if d not in self.test_domains]
        self.data_config = data_config or (DataConfig((image_size, image_size)) if image_size else DataConfig())
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.augment = num_workers, augment
        build_transform(self.data_config, augment, train=True)  # validate the policy name now
        self.splits: dict[tuple[str, str], np.ndarray] = {}
        for d in self.domains:
            n = len(benchmark.datasets[d])
            if n == 0:
                raise ValueError(f"domain {d!r} of {self.name} is empty")
            self.splits[(d, "in")], self.splits[(d, "out")] = split_indices(n, split_seed, d, holdout_fraction)

    @property
    def num_classes(self) -> int:
        """Number of classes of the benchmark."""
        return self.benchmark.num_classes

    @property
    def eval_names(self) -> list[tuple[str, str]]:
        """``(domain, split)`` of each validation dataloader, in order."""
        return eval_splits(self.domains)

    def split(self, domain: str, split: str, train: bool = False) -> Dataset:
        """One split of one domain with the training or evaluation pipeline."""
        transform = build_transform(self.data_config, self.augment, train=train)
        subset = Subset(self.benchmark.datasets[domain], self.splits[(domain, split)].tolist())
        return TransformedDataset(subset, transform)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        batch = self.batch_size if train else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            drop_last=train and len(dataset) > batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> CombinedLoader:
        """One loader per source domain (``in`` split), combined so each step has a batch from each."""
        loaders = {d: self._loader(self.split(d, "in", train=True), train=True) for d in self.source_domains}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        """The ``in`` and ``out`` split of every domain, in :attr:`eval_names` order."""
        return [self._loader(self.split(d, s), train=False) for d, s in self.eval_names]

    def test_dataloader(self) -> list[DataLoader]:
        """Every image of every domain, one loader per domain in benchmark order."""
        transform = build_transform(self.data_config, self.augment, train=False)
        return [self._loader(TransformedDataset(self.benchmark.datasets[d], transform), False) for d in self.domains]
