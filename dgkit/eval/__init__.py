"""Model selection, result collection, tables and plots: DomainBed's protocol applied to a sweep's run folders.

``load_runs(root)`` reads every run below a sweep root, ``summarise(runs)`` applies the three selection rules
and aggregates over seeds, and ``to_markdown`` / ``to_csv`` / ``write_report`` render the tables.
"""

from dgkit.eval.records import (
    RecordsError,
    Run,
    check_consistency,
    dataset_metrics,
    find_run_dirs,
    load_run,
    load_runs,
    split_finished,
)
from dgkit.eval.selection import (
    RULES,
    Choice,
    CraftedShiftValidation,
    LeaveOneDomainOut,
    SelectionRule,
    TestDomainOracle,
    TrainingDomainValidation,
    group_runs,
)
from dgkit.eval.tables import (
    Cell,
    Summary,
    format_cell,
    mean_se,
    plot_dataset,
    row_average,
    summarise,
    to_csv,
    to_markdown,
    write_report,
)

__all__ = [
    "RULES",
    "Cell",
    "Choice",
    "CraftedShiftValidation",
    "LeaveOneDomainOut",
    "RecordsError",
    "Run",
    "SelectionRule",
    "Summary",
    "TestDomainOracle",
    "TrainingDomainValidation",
    "check_consistency",
    "dataset_metrics",
    "find_run_dirs",
    "format_cell",
    "group_runs",
    "load_run",
    "load_runs",
    "mean_se",
    "plot_dataset",
    "row_average",
    "split_finished",
    "summarise",
    "to_csv",
    "to_markdown",
    "write_report",
]
