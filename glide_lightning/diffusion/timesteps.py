"""Timestep samplers: which t each training example gets, and its importance weight.

``sample(batch_size, device, generator=None) -> (t, weights)`` with E[weights·L_t] equal to the
uniform-t objective, and ``update(t, losses)`` to feed back per-sample losses (gathered from every
rank under DDP, so all ranks keep the same state).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

TimestepSamplerName = Literal["uniform", "loss_aware"]
TIMESTEP_SAMPLERS: tuple[str, ...] = get_args(TimestepSamplerName)


class UniformSampler:
    """t ~ U{0, …, T-1}, weight 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling ignores the losses."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """Improved DDPM's importance sampler (Sec. 3.3): p_t ∝ √E[L_t²] over the last ``history``
    losses seen at each t, mixed with ``uniform_prob`` of the uniform distribution; uniform until
    every t has a full history. Reduces the variance of the L_vlb gradient estimate."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return super().probabilities()
        p = (self.losses**2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each (t, loss) pair to that step's ring of recent losses."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            slot = int(self.counts[step]) % self.history
            self.losses[step, slot] = loss
            self.counts[step] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"loss-aware sampler state has shape {tuple(state['losses'].shape)}, "
                             f"expected {tuple(self.losses.shape)} (diffusion steps × history)")
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def build_timestep_sampler(name: TimestepSamplerName, num_timesteps: int) -> UniformSampler:
    """The timestep sampler called ``name`` (``uniform`` or ``loss_aware``)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss_aware":
        return LossAwareSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
