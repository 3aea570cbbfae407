"""internvit: InternViT-6B and its siblings for classification and segmentation, in pure PyTorch."""

from internvit.errors import InternViTError
from internvit.model import PRESETS, InternViT, InternViTConfig, build_model, get_config
from internvit.weights import load_model

__version__ = "0.1.0"
__all__ = ["PRESETS", "InternViT", "InternViTConfig", "InternViTError", "build_model", "get_config", "load_model"]
