"""Fused Triton kernels for mHC and HC, registered as ``torch.ops.torchmhc`` ops, and their dispatch.

One fused operation per file: ``coefficients_op.py`` (projection + RMS + σ + Sinkhorn),
``hc_coefficients_op.py`` (the original HC's coefficients: per-stream RMS + projection + tanh),
``pre_mix_op.py`` (F_pre), ``post_res_op.py`` (F_post,res), and the cross-sub-layer fusion
``post_res_coefficients_op.py`` (post-res of sub-layer l + coefficients of l+1 in one pass over the
streams) with its backward ``transition_backward_op.py`` (x_{l+1}'s gradient formed and used in one
pass). ``dispatch.py`` picks kernels on CUDA, the CPU path (``cpu.py``: the same ops in a few
large PyTorch ops) for fp32 CPU tensors, and the reference (``torchmhc.functional``) elsewhere;
``TORCHMHC_KERNELS=auto|triton|reference`` or :func:`use_kernels` forces a choice. :func:`mhc_pre` runs a sub-layer's coefficients and pre-mix with
chained x-gradients (what ``HyperConnection`` uses); :func:`mhc_post_pre` runs one sub-layer's
post-res fused with the next one's coefficients and pre-mix, chained the same way
(``HyperConnection.post_pre``); :func:`hc_pre` is :func:`mhc_pre` for HC. Importing this package
does not import Triton.
"""

from torchmhc.kernels.dispatch import (
    KernelMode,
    hc_coefficients,
    hc_pre,
    head_mix,
    kernel_mode,
    mhc_coefficients,
    mhc_post_pre,
    mhc_pre,
    post_res,
    post_res_coefficients,
    pre_mix,
    triton_available,
    use_kernels,
)

__all__ = [
    "KernelMode",
    "kernel_mode",
    "use_kernels",
    "triton_available",
    "mhc_coefficients",
    "mhc_pre",
    "mhc_post_pre",
    "hc_coefficients",
    "hc_pre",
    "head_mix",
    "pre_mix",
    "post_res",
    "post_res_coefficients",
]
