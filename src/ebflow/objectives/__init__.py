r"""Training objectives. Each takes ``(model, x)`` and returns a scalar to minimise.

With :math:`s(x) = -\nabla_x E(x)` the model score:

* ``ml``    -- :math:`\mathbb{E}[-\log p(x)]`; needs every linear log-determinant.
* ``sml``   -- surrogate with gradient :math:`\mathbb{E}_{data}\nabla E - \mathbb{E}_{model}\nabla E`,
  model samples drawn by exact inversion (no gradient through them).
* ``ssm``   -- sliced score matching, variance reduced:
  :math:`\mathbb{E}[v^\top \nabla_x s\, v + \tfrac12\|s\|^2]`.
* ``dsm``   -- denoising score matching: :math:`\mathbb{E}\,\tfrac12\|s(x+\sigma\epsilon) + \epsilon/\sigma\|^2`.
* ``fdssm`` -- finite-difference SSM from energies at :math:`x, x \pm v`, :math:`\|v\| = \varepsilon`.
* ``esm``   -- exact score matching :math:`\mathbb{E}[\operatorname{tr}\nabla_x s + \tfrac12\|s\|^2]`
  (``D`` Hessian-vector products: small ``D`` only).

The score-matching objectives (``ssm``, ``dsm``, ``fdssm``, ``esm``) only evaluate the energy
(:meth:`EBFlow.energy`, :meth:`EBFlow.energy_and_grad`, or the split :meth:`EBFlow.linear_prefix`
/ :meth:`EBFlow.tail_energy`): never a determinant, inverse or factorisation of a linear layer.

**Writing an objective.** The built-in ones use only public API: the model's methods above
(with ``check=False`` after one :func:`~ebflow.objectives.toolkit.checked_batch`) and the
helpers of :mod:`ebflow.objectives.toolkit`; :func:`register_objective` adds one by name.
``examples/custom_objective.py`` writes and registers one outside the package.

**A plain** ``loss.backward()`` **is the fast path.** The derivatives in the data are taken
without making the data an autograd leaf (``torch.func`` for the leading linear layers, autograd
with respect to their output for the rest): the loss's graph reaches the parameters only, so
``loss.backward()`` does exactly the work of ``loss.backward(inputs=params)``.

**Checks.** Every objective checks its inputs once, on entry: the model (an :class:`EBFlow`), the
batch (:class:`~ebflow.errors.InputError`: type, floating dtype, shape, device, NaN/Inf, as
:meth:`EBFlow.energy` does), the noise and the options (:class:`~ebflow.errors.ConfigError`).
Parametrized weights (a spectrally normalised :class:`~ebflow.layers.Conv2d`) are evaluated once
per call.

**Loss scale.** ``ml`` and ``sml`` are in nats per example. The score-matching objectives are
*per dimension*: the per-example sums above divided by ``D`` (FDSSM: the finite-difference sum
divided by :math:`\varepsilon^2`, which estimates the same quantity). This is the scale of the
paper's reference recipes, so a gradient-clipping threshold taken from them means the same here,
and loss curves compare across data sizes. The energy regulariser ``energy_reg`` adds
:math:`\lambda\,\mathbb{E}[E]/D` (``E`` at ``x``; DSM: at the perturbed input, as the
reference does). Converting a reference :math:`\lambda`: on image batches ``(B, C, H, W)`` the
reference adds :math:`\lambda\,\mathbb{E}[E]` to each of the ``H W`` per-pixel SSM/DSM terms
before dividing by ``B D``, so its weight is :math:`\lambda H W` here (CIFAR: ``0.001 * 1024``;
on flat vectors it is :math:`\lambda`); for FDSSM it adds it once per example and divides by
:math:`\varepsilon^2`, so its weight is :math:`\lambda D/\varepsilon^2` here.

**Inputs outside the model's domain.** A model trained without MaP holds a logit, defined on
``(0, 1)`` only; DSM's and FDSSM's perturbed inputs can leave it. With
``drop_out_of_domain=True`` those examples contribute 0 to the batch mean (the reference
replaces their NaN loss by 0) and are counted in :attr:`Objective.dropped_examples`; by default
they raise :class:`~ebflow.errors.InputError`.
"""

from . import toolkit
from .losses import dsm_loss, esm_loss, fdssm_loss, ml_loss, sml_loss, ssm_loss
from .registry import (
    DEFAULTS,
    NOISE_KINDS,
    OBJECTIVES,
    NoiseKind,
    Objective,
    ObjectiveSpec,
    make_objective,
    register_objective,
)
from .toolkit import LossTerms

__all__ = [
    "DEFAULTS",
    "LossTerms",
    "NOISE_KINDS",
    "NoiseKind",
    "ObjectiveSpec",
    "Objective",
    "OBJECTIVES",
    "make_objective",
    "register_objective",
    "toolkit",
    "ml_loss",
    "sml_loss",
    "ssm_loss",
    "dsm_loss",
    "fdssm_loss",
    "esm_loss",
]
