"""Lightning callbacks: graceful interruption, sample grids and generation metrics during training."""

from glide_lightning.callbacks.interrupt import GracefulInterrupt
from glide_lightning.callbacks.metrics import GenerationMetrics
from glide_lightning.callbacks.samples import SampleGrid

__all__ = ["GenerationMetrics", "GracefulInterrupt", "SampleGrid"]
