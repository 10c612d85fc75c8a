"""The DataModule: per-domain training batches, every domain's in/out split for evaluation.

Training yields ``{domain: (x, y)}`` with one batch from every source domain per step (Lightning's
``CombinedLoader``), so every method sees domain labels; ``batch_size`` is per domain.

Training is reproducible and resumes exactly. Each source domain's images come from an endless stream
(:class:`DomainStream`): pass ``e`` over the domain is a permutation seeded by ``(seed, domain, e)``, and the
``k``-th image of the stream is augmented by a generator seeded by ``(seed, domain, k, view)``, in the main
process and in workers alike. Step ``s`` takes stream positions ``[s·B, (s+1)·B)``, so a run resumed at step
``s`` (``trainer.global_step`` restored from the checkpoint) draws exactly the batches and augmentations the
uninterrupted run drew. In-memory domains (the embedded benchmarks) are augmented as whole batches instead
(:mod:`dgkit.data.batch_augment`): the batch at stream positions ``[p, p+B)`` draws from one generator seeded by
``(seed, domain, "batch", p, view)``; the path is chosen from the dataset type (``batch_augment``). Validation
yields, in :func:`eval_splits` order, the ``in`` and ``out`` split of every domain, sources and held-out ones
alike, so any selection rule can be applied after training.

Self-supervised methods ask for ``views`` > 1: each training image then comes as ``views`` independent draws
of the training augmentation and a domain's batch is ``(x (V, B, C, H, W), y)``. ``labels_per_class`` keeps
only ``k`` training images per class and source domain (few-label linear probes); ``shots`` keeps only ``k``
training images per source domain whatever their labels (few-shot training, segmentation tiles included). Both
draw with a seed keyed on ``(seed, domain)``; the rest of the ``in`` split is not trained on, and evaluation is
unchanged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from dgkit.backbones.base import DataConfig
from dgkit.data.batch_augment import BatchAugment, BatchLoader, consume_loader_seed
from dgkit.data.benchmark import Benchmark, eval_splits, resolve_test_domains, seed_hash, split_indices
from dgkit.data.crafted import CraftedShiftDataset, check_families
from dgkit.data.subsets import few_labels, few_shots, labels_of
from dgkit.data.transforms import build_transform

CRAFTED = "crafted"
"""The split name of crafted-shift validation sets in records (``<metric>/<domain>/crafted``)."""

log = logging.getLogger(__name__)


class DomainStream(Sampler):
    """An endless, seeded stream of ``(index, draw)`` keys over one domain's ``n`` training images.

    Pass ``e`` over the images follows ``RandomState(seed_hash(seed, domain, "pass", e)).permutation(n)``;
    ``draw`` is the key's position in the stream, which seeds its augmentation. ``start`` skips the first keys
    (a resumed run starts where the interrupted one stopped).

    With several processes (DDP), the stream is cut into blocks of ``block`` keys (a process's batch) and process
    ``rank`` of ``world`` takes blocks ``rank, rank + world, ...``: the processes see disjoint images, and
    together one step of ``world`` processes consumes what ``world`` steps of one process would.
    """

    def __init__(
        self, n: int, seed: int, domain: str, start: int = 0, rank: int = 0, world: int = 1, block: int = 1
    ) -> None:
        if n < 1:
            raise ValueError(f"domain {domain!r} has no training images")
        if not 0 <= rank < world or block < 1:
            raise ValueError(f"rank={rank}, world={world}, block={block}: need 0 <= rank < world and block >= 1")
        self.n, self.seed, self.domain, self.start = n, seed, domain, start
        self.rank, self.world, self.block = rank, world, block

    def permutation(self, epoch: int) -> np.ndarray:
        """The image order of pass ``epoch``."""
        return np.random.RandomState(seed_hash(self.seed, self.domain, "pass", epoch)).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = self.start
        epoch, position = divmod(draw, self.n)
        order = self.permutation(epoch)
        while True:
            if (draw // self.block) % self.world == self.rank:
                yield int(order[position]), draw
            draw, position = draw + 1, position + 1
            if position == self.n:
                epoch, position = epoch + 1, 0
                order = self.permutation(epoch)

    def blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        """This process's blocks of :meth:`__iter__`, vectorised: ``(indices (block,), first draw)`` per block (a
        batch of the batch-augmentation path). ``start`` must fall on a block boundary, as a step's position does."""
        if self.start % self.block:
            raise ValueError(f"stream start {self.start} is not a multiple of the block size {self.block}")
        orders: dict[int, np.ndarray] = {}
        block = self.start // self.block
        block += (self.rank - block) % self.world  # this process's first block
        while True:
            draw = block * self.block
            positions = np.arange(draw, draw + self.block)
            epochs = positions // self.n
            for e in set(epochs.tolist()) - set(orders):
                orders[e] = self.permutation(e)
            for e in [e for e in orders if e < epochs[0]]:
                del orders[e]  # passes already consumed
            if epochs[0] == epochs[-1]:
                yield orders[int(epochs[0])][positions % self.n], draw
            else:
                yield np.array([orders[int(e)][q] for e, q in zip(epochs, positions % self.n)]), draw
            block += self.world


class TransformedDataset(Dataset):
    """Applies an albumentations pipeline to ``(uint8 image, label)`` items; a label that is an array (a
    segmentation mask ``(H, W)``) goes through the same call as ``mask=`` and comes back as int64 ``(H, W)``.

    Indexed by an int (evaluation: deterministic pipelines) or by a :class:`DomainStream` key ``(index, draw)``:
    then every random transform draws from generators seeded by ``(seed, domain, draw, view)``. With ``views`` > 1
    the image is transformed ``views`` times independently and stacked ``(V, C, H, W)``.
    """

    def __init__(self, dataset: Dataset, transform, views: int = 1, seed: int = 0, domain: str = "") -> None:
        self.dataset = dataset
        self.transform = transform
        self.views = views
        self.seed, self.domain = seed, domain

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        i, draw = key if isinstance(key, tuple) else (key, None)
        image, label = self.dataset[i]
        if isinstance(label, np.ndarray):  # a dense target (segmentation mask (H, W)): transformed with the image
            if self.views != 1:
                raise ValueError(f"data.views={self.views}: multi-view training is for per-image labels, not masks")
            out = self._apply(image, draw, 0, mask=label)
            return out["image"], out["mask"].long()  # (C, H, W), (H, W) int64
        views = [self._apply(image, draw, v)["image"] for v in range(self.views)]
        return (views[0] if self.views == 1 else torch.stack(views)), label

    def _apply(self, image: np.ndarray, draw: int | None, view: int, **targets: np.ndarray) -> dict:
        """One call of the pipeline on the image and its dense targets (``mask=``): albumentations draws every
        random parameter once per call, so a mask gets exactly the image's geometric transform."""
        if draw is not None:
            s = seed_hash(self.seed, self.domain, draw, view)
            self.transform.set_random_state(np.random.default_rng(s), random.Random(s))
        return self.transform(image=image, **targets)


def _collate_views(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate multi-view items into ``(x (V, B, C, H, W), y (B,))``: ``x[v]`` is one view column."""
    x, y = default_collate(items)  # x: (B, V, C, H, W)
    return x.transpose(0, 1), y


class SourceDomains(Dataset):
    """Every source domain's training split (:class:`TransformedDataset`), indexed by ``(domain, index, draw)``."""

    def __init__(self, splits: dict[str, TransformedDataset]) -> None:
        self.splits = splits
        self.views = max((s.views for s in splits.values()), default=1)

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def __getitem__(self, key: tuple[str, int, int]):
        domain, index, draw = key
        return self.splits[domain][(index, draw)]


class StepSampler(Sampler):
    """One training step's keys per item: ``batch_size`` keys of every domain's :class:`DomainStream`, domains in
    order. One loader (and one pool of ``data.num_workers`` workers) then serves all source domains, each worker
    building whole steps."""

    def __init__(self, streams: dict[str, DomainStream], batch_size: int) -> None:
        self.streams, self.batch_size = streams, batch_size

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        keys = {d: iter(stream) for d, stream in self.streams.items()}
        while True:
            yield [(d, *next(it)) for d, it in keys.items() for _ in range(self.batch_size)]


class _GlobalDraws:
    """Iterates ``loader`` after ``draws`` draws of torch's global generator (:func:`consume_loader_seed`)."""

    def __init__(self, loader: DataLoader, draws: int) -> None:
        self.loader, self.draws = loader, draws

    def __iter__(self) -> Iterator:
        consume_loader_seed(self.draws)
        return iter(self.loader)


def collate_step(items: list, domains: Sequence[str], batch_size: int, views: int = 1) -> dict:
    """A step's items (:class:`StepSampler` order) as ``{domain: (x, y)}``, each collated like a domain's batch."""
    collate = _collate_views if views > 1 else default_collate
    return {d: collate(items[k * batch_size : (k + 1) * batch_size]) for k, d in enumerate(domains)}


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
        views: augmented views per training image (SSL methods ask for 2; the composition root sets it from
            the method's ``train_views``).
        labels_per_class: keep only this many training images per class and source domain (``None``: all),
            drawn with a seed keyed on ``(split_seed, domain)``; every class of the benchmark must have as many.
        shots: keep only this many training images per source domain (``None``: all), drawn from its ``in`` split
            with a seed keyed on ``(split_seed, domain)`` (:func:`~dgkit.data.subsets.few_shots`); the rest of the
            ``in`` split is not trained on (it is still evaluated). Exclusive with ``labels_per_class``.
        verify: whether the benchmark checked its image files at setup (``data.verify``; the folder presets pass
            it to their benchmark factory, which does the checking).
        on_bad_image: ``error`` or ``skip`` (``data.on_bad_image``, likewise passed to the factory).
        cache: the side of the decoded cache the folder presets' factory reads (``data.cache``; ``None``: files
            are decoded); recorded in the run's identity (:attr:`data_cache`).
        crafted_families: augmentation families for crafted-shift validation (:mod:`dgkit.data.crafted`): each
            source domain's ``out`` images under them become a third evaluation split, ``crafted``
            (``+validation=crafted``); ``None``: none.
        batch_augment: how training images are augmented: ``None`` (automatic) augments whole batches as tensors
            (:mod:`dgkit.data.batch_augment`) for in-memory class-labelled domains (datasets declaring
            ``in_memory``, such as the embedded benchmarks) and each image with albumentations otherwise (folders,
            segmentation masks); ``False`` forces the per-image path; ``True`` requires the batch path.
        num_classes, class_names: what a preset declared (segmentation folders pass them to their benchmark
            factory); checked against the benchmark, else unused.
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
        views: int = 1,
        labels_per_class: int | None = None,
        shots: int | None = None,
        verify: bool = False,
        on_bad_image: str = "error",
        cache: int | None = None,
        crafted_families: Sequence[str] | None = None,
        batch_augment: bool | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes != benchmark.num_classes:
            raise ValueError(
                f"data.num_classes={num_classes} but benchmark {benchmark.name} has {benchmark.num_classes}"
            )
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} must be >= 1")
        if views < 1:
            raise ValueError(f"data.views={views} must be >= 1")
        if labels_per_class is not None and labels_per_class < 1:
            raise ValueError(f"data.labels_per_class={labels_per_class} must be >= 1 (or null for every label)")
        if shots is not None and shots < 1:
            raise ValueError(f"data.shots={shots} must be >= 1 (or null for the whole 'in' split)")
        if shots is not None and labels_per_class is not None:
            raise ValueError(
                f"data.shots={shots} and data.labels_per_class={labels_per_class}: set one of them (shots per "
                "domain, or labels per class and domain)"
            )
        self.benchmark = benchmark
        self.verify, self.on_bad_image, self.cache = verify, on_bad_image, cache
        self.name = name or benchmark.name
        self.root = root
        self.domains = list(benchmark.domains)
        self.test_domains = resolve_test_domains(test_domains, self.domains)
        self.source_domains = [d for d in self.domains if d not in self.test_domains]
        self.data_config = data_config or (DataConfig((image_size, image_size)) if image_size else DataConfig())
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.augment = num_workers, augment
        self.views, self.labels_per_class, self.shots = views, labels_per_class, shots
        self.split_seed = split_seed
        build_transform(self.data_config, augment, train=True)  # validate the policy name now
        self.crafted_families = check_families(crafted_families, augment) if crafted_families is not None else None
        self.splits: dict[tuple[str, str], np.ndarray] = {}
        for d in self.domains:
            n = len(benchmark.datasets[d])
            if n == 0:
                raise ValueError(f"domain {d!r} of {self.name} is empty")
            self.splits[(d, "in")], self.splits[(d, "out")] = split_indices(n, split_seed, d, holdout_fraction)
            if d in self.source_domains and len(self.splits[(d, "out")]) == 0:
                raise ValueError(
                    f"source domain {d!r} ({n} images) gets an empty 'out' split with data.holdout_fraction="
                    f"{holdout_fraction}: training-domain validation needs one; raise data.holdout_fraction"
                )
        self.train_indices = {d: self.splits[(d, "in")] for d in self.source_domains}
        self.batch_augment = self._choose_path(batch_augment)
        self._prepared: dict[str, np.ndarray] = {}
        self._warn_on_rescaling()
        if labels_per_class is not None:
            for d in self.source_domains:
                labels = labels_of(benchmark.datasets[d])
                self.train_indices[d] = few_labels(self.train_indices[d], labels, labels_per_class, split_seed, d)
        if shots is not None:
            for d in self.source_domains:
                self.train_indices[d] = few_shots(self.train_indices[d], shots, split_seed, d)

    @property
    def augment_path(self) -> str:
        """``batch`` when training images are augmented as whole batches of tensors, else ``per_image`` (with
        ``augment=none`` both paths train identically, so it is ``per_image``): part of a run's identity."""
        return "batch" if self.batch_augment and self.augment != "none" else "per_image"

    @property
    def data_cache(self) -> str:
        """``none``, or the decoded cache's side (``256px``): its pixels were resized once before augmentation, so a
        run on it is not resumed from an uncached run's folder (part of a run's identity)."""
        return "none" if self.cache is None else f"{self.cache}px"

    def _choose_path(self, requested: bool | None) -> bool:
        """Whether training augments whole batches: every source domain in memory with class labels."""
        capable = all(getattr(self.benchmark.datasets[d], "in_memory", False) for d in self.source_domains)
        if requested and not capable:
            raise ValueError(
                f"data.batch_augment=true but {self.name}'s source domains are not all in-memory class-labelled "
                "arrays (folders and segmentation masks are augmented per image); use null (automatic) or false"
            )
        if capable and requested is not False and self.num_workers > 0:
            log.info("%s: batches are augmented in the main process; data.num_workers applies to evaluation", self.name)
        return capable if requested is None else requested

    def _warn_on_rescaling(self) -> None:
        """Warn once when training resizes the benchmark's images by more than 2x (read from its first image):
        a 64 px folder trained at 224 px costs 12x the compute for no information."""
        first = self.benchmark.datasets[self.domains[0]]
        native = tuple(int(v) for v in first[0][0].shape[:2])  # (H, W)
        size = tuple(int(v) for v in self.data_config.input_size)
        ratio = max(size[0] / native[0], size[1] / native[1], native[0] / size[0], native[1] / size[1])
        if ratio > 2:
            log.warning(
                "%s: images are %dx%d px (first image of %r) but training resizes them to %dx%d px (%.1fx); set "
                "data.image_size (and a backbone whose input fits) to train nearer the native size",
                self.name, native[1], native[0], self.domains[0], size[1], size[0], ratio,
            )  # fmt: skip

    @property
    def num_classes(self) -> int:
        """Number of classes of the benchmark."""
        return self.benchmark.num_classes

    @property
    def eval_names(self) -> list[tuple[str, str]]:
        """``(domain, split)`` of each validation dataloader, in order: ``in`` and ``out`` of every domain, then
        ``crafted`` of every source domain when crafted-shift validation is on."""
        crafted = [(d, CRAFTED) for d in self.source_domains] if self.crafted_families else []
        return eval_splits(self.domains) + crafted

    def split(self, domain: str, split: str, train: bool = False) -> Dataset:
        """One split of one domain with the training or evaluation pipeline (``crafted``: the ``out`` images
        under the crafted-shift families, frozen)."""
        transform = build_transform(self.data_config, self.augment, train=train)
        if split == CRAFTED:
            subset = Subset(self.benchmark.datasets[domain], self.splits[(domain, "out")].tolist())
            return CraftedShiftDataset(subset, self.crafted_families, transform, self.split_seed, domain)
        subset = Subset(self.benchmark.datasets[domain], self.splits[(domain, split)].tolist())
        return TransformedDataset(subset, transform)

    def train_split(self, domain: str) -> Dataset:
        """A source domain's training images (its ``in`` split, or ``labels_per_class`` / ``shots`` of it), ``views``
        each, augmented with per-image seeds (index it with :class:`DomainStream` keys)."""
        transform = build_transform(self.data_config, self.augment, train=True)
        subset = Subset(self.benchmark.datasets[domain], self.train_indices[domain].tolist())
        return TransformedDataset(subset, transform, views=self.views, seed=self.split_seed, domain=domain)

    def _loader(self, dataset: Dataset, train: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,  # evaluation workers are not kept between runs
            pin_memory=False,
            collate_fn=_collate_views if getattr(dataset, "views", 1) > 1 else None,
        )

    def train_dataloader(self) -> CombinedLoader:
        """Endless training batches ``{domain: (x, y)}``, every source domain's :class:`DomainStream` in step;
        a resumed run starts at its restored step's stream position. In-memory domains: one
        :class:`~dgkit.data.batch_augment.BatchLoader` per domain; others: one loader over every source domain
        (:meth:`train_split` items, :class:`StepSampler` keys), so ``data.num_workers`` is the number of worker
        processes whatever the number of domains."""
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        streams = {d: self.stream(d, step * self.batch_size * world, rank, world) for d in self.source_domains}
        if self.batch_augment:
            loaders = {d: self.batch_loader(d, streams[d]) for d in self.source_domains}
            return CombinedLoader(loaders, mode="max_size_cycle")
        dataset = SourceDomains({d: self.train_split(d) for d in self.source_domains})
        loader = DataLoader(
            dataset,
            batch_sampler=StepSampler(streams, self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=partial(collate_step, domains=self.source_domains, batch_size=self.batch_size,
                               views=self.views),
        )  # fmt: skip
        # one loader: its batch is already {domain: (x, y)}; the draws keep the global random stream of the
        # one-loader-per-domain layout this replaced
        return CombinedLoader(_GlobalDraws(loader, len(self.source_domains) - 1), mode="max_size_cycle")

    def batch_loader(self, domain: str, stream: DomainStream | None = None) -> BatchLoader:
        """A source domain's training batches augmented as tensors (:mod:`dgkit.data.batch_augment`), over
        ``stream`` (default: :meth:`stream` from position 0); the prepared images are kept for later calls."""
        augment = BatchAugment(self.data_config, self.augment)
        dataset = self.benchmark.datasets[domain]
        indices = self.train_indices[domain]
        if domain not in self._prepared:
            self._prepared[domain] = augment.prepare(np.asarray(dataset.images)[indices])
        labels = np.asarray(dataset.labels)[indices]
        stream = stream if stream is not None else self.stream(domain)
        return BatchLoader(augment, self._prepared[domain], labels, stream, self.split_seed, domain, self.views)

    def stream(self, domain: str, start: int = 0, rank: int = 0, world: int = 1) -> DomainStream:
        """The training stream of a source domain from position ``start``; process ``rank`` of ``world`` takes
        every ``world``-th batch of it (DDP)."""
        n = len(self.train_indices[domain])
        return DomainStream(n, self.split_seed, domain, start, rank=rank, world=world, block=self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        """The ``in`` and ``out`` split of every domain, in :attr:`eval_names` order."""
        return [self._loader(self.split(d, s), train=False) for d, s in self.eval_names]
