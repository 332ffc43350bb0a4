"""The state of a batch of Langevin chains and its two moves: the unadjusted step (ULA) and the
Metropolis-adjusted one (MALA); :func:`ebflow.mcmc.langevin.langevin` drives them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import EBFlowError
from ..utils import sum_except_batch

__all__ = ["Chain", "per_chain", "potential_and_grad"]


def potential_and_grad(potential: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        u = potential(xg)
        (g,) = torch.autograd.grad(u.sum(), xg)
    return u.detach(), g.detach()


def per_chain(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


class Chain:
    r"""The state of a batch of Langevin chains: positions :math:`x`, potentials :math:`U(x)`,
    gradients :math:`\nabla U(x)`, each chain's adaptive step factor and accept count."""

    def __init__(
        self,
        potential: Callable[[Tensor], Tensor],
        x: Tensor,
        mask: Tensor | None,
        generator: torch.Generator | None,
    ) -> None:
        self.potential, self.x, self.mask, self.generator = potential, x, mask, generator
        self.chains = x.shape[0]
        self.scale = torch.ones(self.chains, dtype=x.dtype, device=x.device)
        self.accepted = torch.zeros(self.chains, dtype=torch.float64, device=x.device)
        # first ULA iteration with a non-finite state or energy (-1: none), kept on the device
        self.first_divergence = torch.full((), -1, dtype=torch.long, device=x.device)
        self.u, self.g = potential_and_grad(potential, x)

    def movable(self, t: Tensor) -> Tensor:
        return t if self.mask is None else torch.where(self.mask, t, torch.zeros_like(t))

    def propose(self, eta: Tensor, *, allow_nonfinite: bool, iteration: int) -> tuple[Tensor, Tensor]:
        r"""The Langevin proposal :math:`x' = x - \eta\nabla U + \sqrt{2\eta}\,\xi` on the moving
        coordinates, and which chains it keeps finite (a non-finite ULA proposal raises)."""
        x = self.x
        eta_b = per_chain(eta, x)
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=self.generator)
        step = self.movable(-eta_b * self.g + torch.sqrt(2 * eta_b) * noise)
        proposal = x + step if self.mask is None else torch.where(self.mask, x + step, x)
        finite = torch.isfinite(proposal.reshape(self.chains, -1)).all(dim=1)
        if allow_nonfinite:
            proposal = torch.where(per_chain(finite, x), proposal, x)  # rejected below
        else:
            self._note_divergence(~finite.all(), iteration)
        return proposal, finite

    def _note_divergence(self, bad: Tensor, iteration: int) -> None:
        """Remember the first iteration at which ``bad`` held, without reading the device."""
        first = (self.first_divergence < 0) & bad
        self.first_divergence = torch.where(
            first, torch.full_like(self.first_divergence, iteration), self.first_divergence
        )

    def raise_if_diverged(self) -> None:
        """Raise :class:`EBFlowError` if a ULA state or energy went non-finite (one device read)."""
        first = int(self.first_divergence)
        if first >= 0:
            raise EBFlowError(
                f"unadjusted Langevin diverged at iteration {first} (non-finite states or energies); "
                "use a smaller step size or MALA"
            )

    def accept_all(self, proposal: Tensor, *, iteration: int) -> None:
        """ULA: move every chain to its proposal (:func:`~ebflow.mcmc.langevin.langevin` checks
        divergence every few iterations with :meth:`raise_if_diverged`)."""
        u_new, g_new = potential_and_grad(self.potential, proposal)
        self._note_divergence(~torch.isfinite(u_new).all(), iteration)
        self.x, self.u, self.g = proposal, u_new, g_new

    def metropolis_step(self, proposal: Tensor, finite: Tensor, eta: Tensor) -> Tensor:
        r"""MALA: accept each chain's proposal with probability
        :math:`\min(1, e^{U(x) - U(x')} q(x \mid x') / q(x' \mid x))`; returns that probability."""
        x, g = self.x, self.g
        eta_b = per_chain(eta, x)
        u_new, g_new = potential_and_grad(self.potential, proposal)
        # log q(x | x') - log q(x' | x), restricted to the moving coordinates.
        forward_res = self.movable(proposal - x + eta_b * g)
        backward_res = self.movable(x - proposal + eta_b * g_new)
        log_q_ratio = (sum_except_batch(forward_res.pow(2)) - sum_except_batch(backward_res.pow(2))) / (
            4 * eta
        )
        log_alpha = self.u - u_new + log_q_ratio
        ok = finite & torch.isfinite(log_alpha)
        log_alpha = torch.where(ok, log_alpha, torch.full_like(log_alpha, -math.inf))
        alpha = torch.exp(log_alpha.clamp(max=0.0))
        uniform = torch.rand(self.chains, dtype=x.dtype, device=x.device, generator=self.generator)
        accept = uniform < alpha
        self.accepted += accept.to(torch.float64)
        a = per_chain(accept, x)
        self.x = torch.where(a, proposal, x)
        self.u = torch.where(accept, u_new, self.u)
        self.g = torch.where(a, g_new, g)
        return alpha
