"""torchmhc: Manifold-Constrained Hyper-Connections (mHC) for PyTorch.

The small public API. ``mhc_coefficients``, ``hc_coefficients``, ``pre_mix`` and ``post_res`` run
the fused Triton kernels on CUDA tensors of the shapes they handle and the plain-PyTorch reference
elsewhere (``torchmhc.kernels``: same arguments, same values within the tested tolerances);
``torchmhc.functional`` is the reference itself, ``torchmhc.manifolds`` the H_res constraints and
``torchmhc.analysis`` the stability measures.
"""

from importlib import metadata as _metadata

from .functional import Coefficients, amax_gain, head_mix, sinkhorn_knopp
from .kernels import hc_coefficients, mhc_coefficients, post_res, pre_mix
from .layers import HyperConnection, StreamHead, expand_streams
from .manifolds import Manifold, get_manifold, register

try:  # pyproject.toml is the one place the version is written
    __version__ = _metadata.version("torchmhc")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Coefficients",
    "HyperConnection",
    "Manifold",
    "StreamHead",
    "amax_gain",
    "expand_streams",
    "get_manifold",
    "hc_coefficients",
    "head_mix",
    "mhc_coefficients",
    "post_res",
    "pre_mix",
    "register",
    "sinkhorn_knopp",
]
