"""Image loading and transforms (datasets arrive with the classification and segmentation tasks)."""

from internvit.data.images import load_image
from internvit.data.transforms import build_eval_transform

__all__ = ["build_eval_transform", "load_image"]
