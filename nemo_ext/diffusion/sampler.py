"""EDM sampling (Karras et al. 2022, Algorithm 1, deterministic): a Karras sigma schedule and the
Heun (2nd order) or Euler probability-flow ODE solver, with classifier-free guidance and kept
(given) frames for Video2World.

Everything here works on a *denoiser* ``D(x, sigma) -> x0`` (``x`` at noise level ``sigma`` [B] ->
the clean estimate), so the solver knows nothing about the network: the model side (preconditioning,
the conditioning bundle, Video2World inputs) is built by the caller from the training code
(``nemo_ext.eval.generation``). With a perfect denoiser (it returns the data) the solver returns the
data exactly; with the optimal denoiser of Gaussian data it follows the ODE's closed form
(``tests/unit/test_sampler.py``).

The ODE: ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``x = sigma_max * noise`` down to sigma 0.
Heun's method costs two denoiser calls per step except the last (to sigma 0: an Euler step).

Classifier-free guidance: ``D = D_uncond + g * (D_cond - D_uncond)``; ``g = 1`` is no guidance
(one call), the Cosmos-1 scripts' ``guidance=7`` is ``g = 8`` here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SOLVERS = ("heun", "euler")


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """The ``num_steps`` noise levels of Karras et al. (eq. 5), descending from ``sigma_max`` to
    ``sigma_min``, followed by a final 0: shape [num_steps + 1], float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64, device=device)
    else:
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64, device=device)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def guided(cond: Denoiser, uncond: Optional[Denoiser], guidance: float) -> Denoiser:
    """Classifier-free guidance of two denoisers: ``uncond + guidance * (cond - uncond)``.
    ``guidance == 1`` (or no ``uncond``) is ``cond`` alone."""
    if uncond is None or guidance == 1.0:
        return cond

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_c, x_u = cond(x, sigma), uncond(x, sigma)
        return x_u + guidance * (x_c - x_u)

    return denoise


@torch.no_grad()
def edm_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "heun",
    keep: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x = sigmas[0] * noise`` through ``sigmas`` (descending,
    ending at 0, e.g. :func:`karras_sigmas`); returns the sample (float32, the shape of ``noise``).

    ``keep = (mask, values)``: entries where ``mask`` (broadcastable, 1 = given) is set are known
    (Video2World's conditioning latent frames): every x0 estimate takes ``values`` there and the
    result returns them exactly. ``callback(step, sigma, x0_estimate)`` sees each step's estimate.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {list(SOLVERS)}")
    if sigmas.dim() != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas: expected a 1-D descending schedule ending with 0 (karras_sigmas)")
    b = noise.shape[0]
    x = noise.float() * float(sigmas[0])
    mask = values = None
    if keep is not None:
        mask, values = keep[0].to(x), keep[1].to(x)

    def d(x_cur: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        s = torch.full((b,), sigma, dtype=torch.float32, device=x.device)
        x0 = denoiser(x_cur, s).float()
        if mask is not None:
            x0 = mask * values + (1 - mask) * x0
        if callback is not None:
            callback(step, s, x0)
        return (x_cur - x0) / sigma

    for i in range(len(sigmas) - 1):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        slope = d(x, s_cur, i)
        x_next = x + (s_next - s_cur) * slope
        if solver == "heun" and s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (slope + d(x_next, s_next, i))
        x = x_next
    if mask is not None:
        x = mask * values + (1 - mask) * x
    return x
