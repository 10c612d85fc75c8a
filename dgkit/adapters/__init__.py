"""Parameter-efficient adapters on a built backbone: the mechanism and the adapter specs.

``conf/adapter/*.yaml`` instantiates a spec (:class:`FullFineTuning`, :class:`Freeze`, :class:`LoRA`,
:class:`DoRA`, :class:`DoRASAM`, :class:`SoMA`, :class:`PEGO`, :class:`SALT`); the composition root calls its
``apply(backbone)`` before the method is built. See ``docs/adapters.md``.
"""

from dgkit.adapters.core import AdapterLinear, inject, linear_names, mark_trainable, merge, regularizers
from dgkit.adapters.dora_sam import DoRALinear, DoRASAM, InputMagnitudeDoRALinear
from dgkit.adapters.lora import DoRA, LoRA
from dgkit.adapters.pego import PEGO, LoRAGroupLinear, orthogonality_penalty
from dgkit.adapters.qkv import SplitQKV, split_qkv
from dgkit.adapters.salt import SALT, SALTLinear
from dgkit.adapters.soma import AnnealedWeightDecay, SoMA, SVDLinear
from dgkit.adapters.spec import Adapter, Freeze, FullFineTuning, count_parameters

__all__ = [
    "PEGO",
    "SALT",
    "SALTLinear",
    "Adapter",
    "AdapterLinear",
    "AnnealedWeightDecay",
    "DoRA",
    "DoRALinear",
    "DoRASAM",
    "Freeze",
    "FullFineTuning",
    "InputMagnitudeDoRALinear",
    "LoRA",
    "LoRAGroupLinear",
    "SVDLinear",
    "SoMA",
    "SplitQKV",
    "count_parameters",
    "inject",
    "linear_names",
    "mark_trainable",
    "merge",
    "orthogonality_penalty",
    "regularizers",
    "split_qkv",
]
