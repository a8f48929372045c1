"""dsv4: DeepSeek-V4 in readable PyTorch (model, training, serving)."""

from .checkpoint import load, load_checkpoint, save_checkpoint
from .config import Config, preset
from .model import Transformer

__all__ = ["Config", "Transformer", "load", "load_checkpoint", "preset", "save_checkpoint"]
