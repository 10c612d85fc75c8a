"""Data: multi-domain benchmarks, DomainBed splits, albumentations pipelines and the DataModule."""

from dgkit.data.benchmark import ArrayDataset, Benchmark, eval_splits, split_indices
from dgkit.data.datamodule import DGDataModule

__all__ = ["ArrayDataset", "Benchmark", "DGDataModule", "eval_splits", "split_indices"]
