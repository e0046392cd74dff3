"""Lightning callbacks: graceful interruption, sample grids (and generation metrics) during training."""

from glide_lightning.callbacks.interrupt import GracefulInterrupt
from glide_lightning.callbacks.samples import SampleGrid

__all__ = ["GracefulInterrupt", "SampleGrid"]
