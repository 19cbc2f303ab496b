"""ViT wave functions."""
from .symmetry import group, project
from .vit import ViT, n_params

__all__ = ["ViT", "group", "n_params", "project"]
