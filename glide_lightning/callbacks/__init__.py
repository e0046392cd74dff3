"""Lightning callbacks: the run's checkpoints, graceful interruption, the non-finite guard, sample grids
and generation metrics during training, EMA with a warm-up of its decay, plain progress lines for logs, the
training statistics logged to wandb (and the run's wandb logger, :mod:`~glide_lightning.callbacks.wandb_logging`)."""

from glide_lightning.callbacks.checkpoint import BestCheckpoint, RunCheckpoint
from glide_lightning.callbacks.ema import WarmupEMA
from glide_lightning.callbacks.interrupt import GracefulInterrupt
from glide_lightning.callbacks.metrics import GenerationMetrics
from glide_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from glide_lightning.callbacks.progress import ProgressLog
from glide_lightning.callbacks.samples import SampleGrid
from glide_lightning.callbacks.steps import OptimizerStepCallback
from glide_lightning.callbacks.wandb_logging import TrainingStats

__all__ = ["BestCheckpoint", "GenerationMetrics", "GracefulInterrupt", "NonFiniteGuard", "NonFiniteLossError", "OptimizerStepCallback",
           "ProgressLog", "RunCheckpoint", "SampleGrid", "TrainingStats", "WarmupEMA"]
