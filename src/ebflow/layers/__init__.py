"""Flow layers. Linear (constant-Jacobian) layers derive from :class:`LinearFlowLayer`."""

from .affine import ActNorm, FixedAffine
from .base import FlowLayer, LinearFlowLayer
from .cache import ParameterCache
from .conv import Conv1x1, Conv2d, convolution_matrix
from .coupling import CONDITIONER_ACTIVATIONS, AffineCoupling, ChannelScale, cnn_conditioner, mlp_conditioner
from .dense import Dense, random_orthogonal
from .elementwise import LeakyReLU, Logit, ResidualSmoothLeakyReLU, Sigmoid, SmoothLeakyReLU
from .generic import GenericLinear, LinearMap
from .generic_conv import CircularConv2d, DepthwiseConv2d, DilatedConv2d, GroupedConv2d
from .orthogonal import DCT
from .reshape import Flatten, Reshape, Squeeze, Unsqueeze
from .shift_scale_coupling import ShiftScaleCoupling, separate_conditioners
from .silu import SiLU
from .split import on_first_part
from .swish import LearnableSwish

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CONDITIONER_ACTIVATIONS",
    "ChannelScale",
    "Conv1x1",
    "Conv2d",
    "Dense",
    "FixedAffine",
    "Flatten",
    "FlowLayer",
    "LeakyReLU",
    "LinearFlowLayer",
    "Logit",
    "ParameterCache",
    "Reshape",
    "ResidualSmoothLeakyReLU",
    "Sigmoid",
    "SiLU",
    "SmoothLeakyReLU",
    "Squeeze",
    "Unsqueeze",
    "cnn_conditioner",
    "convolution_matrix",
    "mlp_conditioner",
    "on_first_part",
    "random_orthogonal",
    # generic linear layers from a map, and layers built on them
    "CircularConv2d",
    "DCT",
    "DepthwiseConv2d",
    "DilatedConv2d",
    "GenericLinear",
    "GroupedConv2d",
    "LinearMap",
    # the reference code's toy coupling
    "LearnableSwish",
    "ShiftScaleCoupling",
    "separate_conditioners",
]
