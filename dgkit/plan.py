"""Plan a sweep before running it: its jobs, what each selection rule needs, and what it will cost.

:func:`expand` turns a multirun's overrides into its jobs with Hydra's own expansion (the basic sweeper's), so
the count is the number of jobs ``train.py -m`` launches. :func:`plan` then says

- which jobs each selection rule needs: training-domain validation and the test-domain oracle use the runs
  with one held-out domain; leave-one-domain-out also needs, for each of them, the runs holding out every pair
  ``{t, v}`` with the same other overrides, and the plan gives the multirun command that adds the missing ones;
- with a probe (a few training steps of the first job, timed), the estimated CPU hours of the sweep.

``scripts/plan_sweep.py`` is its command.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from dgkit.compose import build, build_trainer
from dgkit.config import register_resolvers
from dgkit.data.benchmark import resolve_test_domains

CONF = Path(__file__).resolve().parents[1] / "conf"
TEST_DOMAINS = "data.test_domains"


@dataclass
class SweepPlan:
    """What :func:`plan` found (see the module docstring)."""

    jobs: list[list[str]]
    domains: list[str]
    single: list[list[str]]
    pairs_needed: list[list[str]]
    pairs_present: int
    seconds_per_step: float | None = None
    seconds_per_evaluation: float | None = None
    steps_per_job: int | None = None
    evaluations_per_job: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_hours(self) -> float | None:
        """Estimated CPU hours of the sweep (its jobs), from the probe; ``None`` without one."""
        if self.seconds_per_step is None or self.steps_per_job is None:
            return None
        per_job = self.seconds_per_step * self.steps_per_job + self.seconds_per_evaluation * self.evaluations_per_job
        return per_job * len(self.jobs) / 3600


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun, each as its list of overrides, in Hydra's order."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_job(job: list[str]) -> DictConfig:
    """The training config of one job (``conf/train.yaml`` composed with its overrides)."""
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=job)


def _data_overrides(job: list[str]) -> tuple[str, ...]:
    """The overrides that can change a job's data node (its dataset and held-out domains): ``data*`` and
    experiment presets. Jobs that share them share their held-out domains, so one composition serves them all."""
    return tuple(o for o in job if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in ("data", "exp"))


def held_out_domains(jobs: list[list[str]], domains: list[str]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Each job's held-out domains, composing the config once per distinct set of data overrides (a sweep of
    1,440 jobs over 4 folds composes 4 configs, not 1,440)."""
    register_resolvers()
    cache: dict[tuple[str, ...], tuple[str, ...]] = {}
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for job in jobs:
            key = _data_overrides(job)
            if key not in cache:
                composed = compose("train", overrides=list(key))
                cache[key] = tuple(resolve_test_domains(composed.data.test_domains, domains))
    return {tuple(job): cache[_data_overrides(job)] for job in jobs}


def _with_test_domains(job: list[str], held_out: tuple[str, ...]) -> list[str]:
    rest = [o for o in job if not o.split("=", 1)[0].lstrip("+") == TEST_DOMAINS]
    return [*rest, f"{TEST_DOMAINS}=[{','.join(held_out)}]"]


def plan(overrides: list[str], probe_steps: int = 0) -> SweepPlan:
    """Plan the multirun ``train.py -m <overrides>`` (see the module docstring).

    Args:
        overrides: the multirun's overrides, as on the command line.
        probe_steps: train the first job this many steps to time it (0: no probe, no cost estimate).
    """
    jobs = expand(overrides)
    first = compose_job(jobs[0])
    data = instantiate(first.data, _partial_=True)(data_config=None, split_seed=0)
    domains = list(data.domains)
    held = held_out_domains(jobs, domains)
    single = [job for job in jobs if len(held[tuple(job)]) == 1]
    present = {(tuple(sorted(_others(job))), frozenset(held[tuple(job)])) for job in jobs}
    required: dict[tuple, list[str]] = {}  # every pair run leave-one-domain-out needs, once
    for job in single:
        (t,) = held[tuple(job)]
        for v in (d for d in domains if d != t):
            pair = tuple(sorted((t, v), key=domains.index))
            required.setdefault((tuple(sorted(_others(job))), frozenset(pair)), _with_test_domains(job, pair))
    needed = [job for key, job in required.items() if key not in present]
    have = len(required) - len(needed)
    result = SweepPlan(jobs=jobs, domains=domains, single=single, pairs_needed=needed, pairs_present=have)
    if probe_steps > 0:
        result.steps_per_job = int(first.trainer.max_steps)
        interval = int(first.trainer.val_check_interval)
        result.evaluations_per_job = result.steps_per_job // interval + (result.steps_per_job % interval > 0)
        result.seconds_per_step, result.seconds_per_evaluation = probe(first, probe_steps)
    return result


def _others(job: list[str]) -> list[str]:
    return [o for o in job if o.split("=", 1)[0].lstrip("+") != TEST_DOMAINS]


def _pair_of(job: list[str]) -> tuple[str, ...]:
    value = next(o.split("=", 1)[1] for o in job if o.split("=", 1)[0].lstrip("+") == TEST_DOMAINS)
    return tuple(value.strip("[]").split(","))


class _StepClock(pl.Callback):
    """Wall-clock times: the end of every training step, and the evaluation's start and end."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.evaluation: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_validation_start(self, *args: Any) -> None:
        self.evaluation = [time.perf_counter()]

    def on_validation_end(self, *args: Any) -> None:
        self.evaluation.append(time.perf_counter())


def probe(cfg: DictConfig, steps: int) -> tuple[float, float]:
    """``(seconds per training step, seconds per evaluation)`` of ``cfg``, timed over a ``steps``-step fit with
    one evaluation, in a temporary folder; the first step (start-up) is left out."""
    if steps < 2:
        raise ValueError(f"--probe-steps={steps}: needs at least 2 steps (the first one is not timed)")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))  # as train() does: the jobs' own thread count
    with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
        cfg.trainer.max_steps, cfg.trainer.val_check_interval = steps, steps
        cfg.trainer.enable_progress_bar, cfg.logger = False, None
        datamodule, method = build(cfg)
        trainer = build_trainer(cfg, Path(tmp), {}, method)
        clock = _StepClock()
        trainer.callbacks.append(clock)
        trainer.fit(method, datamodule=datamodule)
    return (clock.ends[-1] - clock.ends[0]) / (len(clock.ends) - 1), clock.evaluation[1] - clock.evaluation[0]


def pair_command(needed: list[list[str]]) -> str | None:
    """Multirun commands that train the missing pair runs, or ``None``.

    Jobs are grouped by their other overrides; groups that miss the same pairs and whose other overrides form a
    cartesian product (the usual sweep: draws x seeds x methods) become one command with comma-separated values,
    so the command count does not grow with the sweep."""
    if not needed:
        return None
    by_pairs: dict[str, list[list[str]]] = {}
    for others, group in itertools.groupby(sorted(needed, key=_others), key=_others):
        pairs = ",".join(f"[{','.join(_pair_of(j))}]" for j in group)
        by_pairs.setdefault(pairs, []).append(others)
    lines = []
    for pairs, others_lists in by_pairs.items():
        for others in _cartesian(others_lists):
            lines.append(f"python train.py -m {' '.join(_quote(o) for o in others)} '{TEST_DOMAINS}={pairs}'")
    return "\n".join(lines)


def _cartesian(others_lists: list[list[str]]) -> list[list[str]]:
    """``others_lists`` as multirun overrides: one list with ``key=v1,v2`` when the lists are exactly the product of
    their keys' values (same keys in the same order, no value holding a comma), else the lists unchanged."""
    keys = [[o.split("=", 1)[0] for o in others] for others in others_lists]
    if len(others_lists) < 2 or any(k != keys[0] for k in keys):
        return others_lists
    values: list[list[str]] = [[] for _ in keys[0]]
    for others in others_lists:
        for i, o in enumerate(others):
            value = o.split("=", 1)[1] if "=" in o else None
            if value is None or "," in value:
                return others_lists
            if value not in values[i]:
                values[i].append(value)
    if math.prod(len(v) for v in values) != len({tuple(o) for o in others_lists}):
        return others_lists
    return [[f"{k}={','.join(sorted(v, key=_natural))}" for k, v in zip(keys[0], values, strict=True)]]


def _natural(value: str) -> tuple[int, float, str]:
    """Sort key: numbers by value, before anything else by text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _quote(override: str) -> str:
    return f"'{override}'" if any(c in override for c in "[](),*") else override


def describe(result: SweepPlan) -> str:
    """The plan as text."""
    lines = [
        f"{len(result.jobs)} jobs over domains {result.domains}",
        f"training-domain validation and test-domain oracle: the {len(result.single)} jobs with one held-out domain",
        f"leave-one-domain-out: also {result.pairs_present + len(result.pairs_needed)} pair runs "
        f"({result.pairs_present} in this sweep, {len(result.pairs_needed)} missing)",
    ]
    command = pair_command(result.pairs_needed)
    if command:
        lines += ["the missing pair runs (same sweep folder):", command]
    if result.cpu_hours is not None:
        lines.append(
            f"probe: {result.seconds_per_step:.3f} s per step x {result.steps_per_job} steps + "
            f"{result.seconds_per_evaluation:.1f} s per evaluation x {result.evaluations_per_job}, "
            f"x {len(result.jobs)} jobs = about {result.cpu_hours:.2f} process hours (start-up not counted)"
        )
    return "\n".join(lines)
