"""Tasks: what a learning problem owns (head, loss, metric, prediction rule); see :mod:`dgkit.tasks.base`.

``conf/task/*.yaml`` instantiates one; checkpoints store its target so a model is rebuilt without its dataset.
"""

from dgkit.tasks.base import Task
from dgkit.tasks.classification import Classification
from dgkit.tasks.segmentation import Segmentation

__all__ = ["Classification", "Segmentation", "Task"]
