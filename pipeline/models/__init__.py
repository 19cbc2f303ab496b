"""ViT wave functions."""
from .attention import KINDS
from .symmetry import MODES, group, project
from .vit import ViT, n_params

__all__ = ["KINDS", "MODES", "ViT", "group", "n_params", "project"]
