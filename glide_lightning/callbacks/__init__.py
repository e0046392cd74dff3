"""Lightning callbacks: graceful interruption (and, later, sample grids and FID during training)."""

from glide_lightning.callbacks.interrupt import GracefulInterrupt

__all__ = ["GracefulInterrupt"]
