"""The published saliency model: `from hub import SaliencyUNet`."""

from hub.config import SaliencyConfig
from hub.model import SaliencyUNet

__all__ = ["SaliencyConfig", "SaliencyUNet"]
