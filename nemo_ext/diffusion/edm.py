"""EDM formulation used by the Cosmos-1 diffusion WFMs (Karras et al. 2022, sigma_data = 0.5).

The network ``F`` sees ``c_in(sigma) * x_t`` and ``c_noise(sigma)`` and predicts
``x0 = c_skip(sigma) * x_t + c_out(sigma) * F``. Training samples ``log sigma ~ N(p_mean, p_std)``
and weights the x0 error by ``(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``, which makes the
effective target of ``F`` unit-variance at every noise level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class EDMConfig:
    sigma_data: float = 0.5
    p_mean: float = 0.0
    p_std: float = 1.0
    sigma_min: float = 0.0002
    sigma_max: float = 80.0


class EDM:
    """Stateless EDM math; every random draw takes an explicit generator (reproducible, rank-safe)."""

    def __init__(self, cfg: EDMConfig):
        self.cfg = cfg

    def sample_sigma(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training noise levels, log-normal; drawn on the generator's device."""
        log_sigma = torch.randn(batch, generator=generator, device=generator.device) * self.cfg.p_std + self.cfg.p_mean
        return log_sigma.exp().clamp(self.cfg.sigma_min, self.cfg.sigma_max)

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        sd = self.cfg.sigma_data
        denom = sigma**2 + sd**2
        c_skip = sd**2 / denom
        c_out = sigma * sd / denom.sqrt()
        c_in = 1.0 / denom.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.cfg.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def noisy_input(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x0 + broadcast_to(sigma, x0) * noise

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, net_out: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, _, _ = self.preconditioning(sigma)
        return broadcast_to(c_skip, x_t) * x_t + broadcast_to(c_out, x_t) * net_out

    def loss(self, x0: torch.Tensor, x0_pred: torch.Tensor, sigma: torch.Tensor, mask=None) -> torch.Tensor:
        """Per-sample weighted MSE, shape [B]; with ``mask`` (broadcastable to x0, 1 = counts) the
        mean is over the masked elements only."""
        err = (x0_pred.float() - x0.float()) ** 2
        if mask is None:
            per_sample = err.flatten(1).mean(1)
        else:
            mask = mask.float().expand_as(err)
            per_sample = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
        return per_sample * self.loss_weight(sigma.float())

    @property
    def log_sigma_range(self) -> tuple[float, float]:
        return math.log(self.cfg.sigma_min), math.log(self.cfg.sigma_max)


def broadcast_to(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)
