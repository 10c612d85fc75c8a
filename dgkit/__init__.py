"""dgkit: domain generalisation for computer vision, composed by Hydra config."""

__version__ = "0.1.0"
