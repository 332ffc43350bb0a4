r"""Markov chain Monte Carlo driven by the energy: Langevin dynamics and MALA.

An EBFlow's energy :math:`E` gives the score :math:`-\nabla E` without the partition
function, so it can drive Langevin dynamics. With step size :math:`\eta`,

.. math:: x' = x - \eta\,\nabla U(x) + \sqrt{2\eta}\,\xi, \qquad \xi \sim \mathcal N(0, I),

where the potential :math:`U = E` (plus an optional smoothness term, below). The unadjusted
chain (ULA) has an :math:`O(\eta)` bias; MALA removes it by accepting :math:`x'` with probability

.. math:: \min\Big(1,\ \exp\big(U(x) - U(x') + \log q(x \mid x') - \log q(x' \mid x)\big)\Big),
    \qquad q(x' \mid x) = \mathcal N\big(x';\ x - \eta\nabla U(x),\ 2\eta I\big),

so that its stationary law is exactly :math:`\propto e^{-U}`. Neither needs :math:`\log Z`.

Options:

* ``mask`` -- boolean, ``True`` where a coordinate may move. The others are carried over
  bit for bit (``torch.where``), so the chain samples the conditional law of the masked
  coordinates given the rest (inpainting).
* ``schedule`` -- step size per iteration: ``constant``, or a ``linear``, ``geometric`` or
  ``cosine`` decay from ``step_size`` to ``final_step_size``; or any callable
  ``(iteration, steps) -> factor`` multiplying ``step_size``.
* ``target_acceptance`` (MALA) -- adapt each chain's step size towards this acceptance rate
  (Robbins-Monro on :math:`\log\eta`); the chain is then exact only once adaptation stops.
* ``smoothness`` :math:`\lambda` (image events ``(C, H, W)`` or ``(H, W)``) -- adds the
  Gaussian smoothness prior :math:`\tfrac{\lambda}{2}\|x - Bx\|^2` to :math:`U`, with
  :math:`B` a Gaussian blur: a pull of every pixel toward the blurred image. It is part of the
  target (MALA samples :math:`\propto e^{-E(x) - \frac\lambda2\|x - Bx\|^2}`).

For image models trained with MaP, chains run on the preprocessed tensor; see
:mod:`ebflow.inpainting` for the map back to pixels.
"""

from .energy import EnergyModel, PreprocessedSpaceEnergy, check_energy_model, gaussian_blur
from .langevin import LangevinResult, default_step_size, langevin, mala, refine_samples, ula
from .schedules import SCHEDULES

__all__ = [
    "EnergyModel",
    "LangevinResult",
    "SCHEDULES",
    "gaussian_blur",
    "langevin",
    "mala",
    "ula",
    "refine_samples",
    "default_step_size",
    "check_energy_model",
    "PreprocessedSpaceEnergy",
]
