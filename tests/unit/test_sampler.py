"""The EDM sampler: Karras schedule, Heun/Euler solver, guidance and kept frames, against denoisers
whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_ext.diffusion.sampler import edm_sample, guided, karras_sigmas


def test_karras_schedule():
    s = karras_sigmas(10, sigma_min=0.002, sigma_max=80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert bool((s[:-1] > s[1:]).all())
    # eq. 5: equally spaced in sigma^(1/rho)
    inv = s[:-1] ** (1 / 7)
    assert torch.allclose(inv[1:] - inv[:-1], (inv[1] - inv[0]).expand(9), atol=1e-12)
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError):
        karras_sigmas(0)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_perfect_denoiser_returns_the_data(solver):
    """D(x, sigma) = x0 exactly: the solver lands on x0 whatever the noise and schedule."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 5, 6, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    calls = []

    def perfect(x, sigma):
        calls.append(sigma)
        assert sigma.shape == (2,)
        return x0

    out = edm_sample(perfect, noise, karras_sigmas(12), solver=solver)
    assert torch.allclose(out, x0, atol=1e-5)
    assert len(calls) == (2 * 12 - 1 if solver == "heun" else 12)  # Heun: the step to 0 is Euler


def test_gaussian_data_follows_the_ode_and_heun_is_second_order():
    """x0 ~ N(mu, s^2): the optimal denoiser is mu + (x - mu) s^2 / (s^2 + sigma^2), and the ODE
    maps x_T to mu + (x_T - mu) * s / sqrt(s^2 + sigma_max^2). Heun's error falls ~4x per doubling
    of the steps (Euler's ~2x)."""
    mu, s, smax = 0.3, 0.5, 80.0
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(1))

    def optimal(x, sigma):
        var = sigma.view(-1, *([1] * (x.dim() - 1))) ** 2
        return mu + (x - mu) * s**2 / (s**2 + var)

    exact = mu + (noise * smax - mu) * s / math.sqrt(s**2 + smax**2)
    err = {}
    for solver in ("heun", "euler"):
        for n in (16, 32):
            out = edm_sample(lambda x, sg: optimal(x[None], sg)[0], noise[None], karras_sigmas(n, 0.002, smax),
                             solver=solver)[0]
            err[solver, n] = (out - exact).abs().max().item()
    # measured (max abs error, data std 0.5): heun 0.14 -> 0.031, euler 0.34 -> 0.17
    assert err["heun", 32] < 0.05
    assert err["heun", 16] / err["heun", 32] > 3.5  # second order: ~4x per doubling
    assert err["euler", 16] / err["euler", 32] < 2.5  # first order: ~2x
    assert err["heun", 32] < err["euler", 32] / 4
    # and the samples have the data's statistics
    out = edm_sample(lambda x, sg: optimal(x[None], sg)[0], noise[None], karras_sigmas(32, 0.002, smax))[0]
    assert out.mean().item() == pytest.approx(mu, abs=0.03) and out.std().item() == pytest.approx(s, rel=0.05)


def test_guidance_and_kept_frames():
    x0 = torch.randn(1, 2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    a, b = torch.full_like(x0, 1.0), torch.full_like(x0, -1.0)
    assert guided(lambda x, s: a, None, 5.0)(x0, torch.ones(1)) is a
    assert guided(lambda x, s: a, lambda x, s: b, 1.0)(x0, torch.ones(1)) is a
    assert torch.equal(guided(lambda x, s: a, lambda x, s: b, 3.0)(x0, torch.ones(1)), torch.full_like(x0, 5.0))

    # Video2World: the given frames come back exactly, the denoiser's estimate fills the rest
    mask = torch.zeros(1, 1, 4, 1, 1)
    mask[:, :, :1] = 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    seen = []
    out = edm_sample(lambda x, s: torch.zeros_like(x), noise, karras_sigmas(8), keep=(mask, x0),
                     callback=lambda i, s, est: seen.append(est[:, :, :1].clone()))
    assert torch.equal(out[:, :, :1], x0[:, :, :1])
    assert torch.allclose(out[:, :, 1:], torch.zeros_like(out[:, :, 1:]), atol=1e-5)
    assert all(torch.equal(e, x0[:, :, :1]) for e in seen)
