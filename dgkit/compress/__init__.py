"""Compression as links of the model-transform chain: quantisation (RTN, AWQ, int8) and pruning, calibrated on
the source domains only. See ``docs/compression.md``."""
