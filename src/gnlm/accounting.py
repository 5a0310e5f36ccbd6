"""Compute accounting: the floating-point operations of a unit of work, counted on the real step functions with
``torch.utils.flop_counter.FlopCounterMode``. The trainers count each unit of a run once (a baseline step; a GN
inner step, line-search forward, surrogate gradient or GGN-vector product) and multiply: the shapes of a run's steps
do not change, and counting every call would slow the Python dispatch of each op. Next to FLOPs, runs measure time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

T = TypeVar("T")


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)


# FlopCounterMode knows the fused attention kernels of CUDA but not the one fused SDPA runs on CPU: without these,
# a baseline's attention (sdpa) would go uncounted on CPU while GN's (math attention, plain matmuls) is counted.
# Both count the products of the math backend: the full T×T scores and their product with V, and in the backward
# the two gradients of each (the fused backward also recomputes the scores; that is not counted).
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(fn: Callable[[], T]) -> tuple[int, T]:
    """Run ``fn()`` and count the floating-point operations of its matrix products (matmuls, attention,
    convolutions; 2 per multiply-add) with ``torch.utils.flop_counter.FlopCounterMode``: the forward, backward,
    jvp and transposed-jvp products, and an optimizer's own (Muon's Newton–Schulz, SOAP's eigenbases); elementwise
    work is not counted. Returns (FLOPs, fn's result)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        result = fn()
    return counter.get_total_flops(), result
