"""LoRA (Hu et al., ICLR 2022) and DoRA (Liu et al., ICML 2024) through peft's own layers.

peft implements both exactly (``peft.tuners.lora.layer.Linear``; DoRA with ``use_dora=True``: one magnitude per
output feature, weight norm over the input dimension, detached in backprop as DoRA §4.3 prescribes), so dgkit
only chooses the layers: each matched ``nn.Linear`` becomes a peft LoRA layer (adapter name ``default``);
``dgkit.adapters.merge`` folds it with peft's ``merge``.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from dgkit.adapters.qkv import SLICES
from dgkit.adapters.spec import DEFAULT_TARGET, Adapter


class LoRA(Adapter):
    """``y = W x + (alpha / r) B A x`` with ``A`` Kaiming-uniform and ``B = 0`` (output unchanged at init).

    Args:
        rank, target, start_block, split_qkv, qkv_slices, train_bias, trainable: as in
            :class:`~dgkit.adapters.spec.Adapter`.
        alpha: the scale numerator (scale ``alpha / rank``).
        dropout: dropout on the adapter's input.
    """

    name = "lora"
    use_dora = False

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        target: str = DEFAULT_TARGET,
        start_block: int | None = 0,
        split_qkv: bool = False,
        qkv_slices: Sequence[str] = SLICES,
        train_bias: bool = False,
        trainable: Sequence[str] = (),
    ) -> None:
        super().__init__(target, rank, start_block, split_qkv, qkv_slices, train_bias, trainable)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter.dropout={dropout}: must be in [0, 1)")
        if alpha <= 0:
            raise ValueError(f"adapter.alpha={alpha}: must be > 0")
        self.alpha = float(alpha)
        self.dropout = float(dropout)

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        """peft's LoRA (or DoRA) layer around ``layer``."""
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=self.use_dora)
        return PeftLoraLinear(layer, "default", config=config, r=self.rank, lora_alpha=self.alpha)


class DoRA(LoRA):
    """``W' = m ⊙ (W + s B A) / ‖W + s B A‖`` per output feature, norm detached (peft's DoRA).

    Args: as :class:`LoRA`.
    """

    name = "dora"
    use_dora = True
