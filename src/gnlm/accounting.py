"""Compute accounting, in one place: FLOPs counted on the real step functions (:func:`count_flops`; each unit of
a run — a baseline step, a GN inner step, a line-search forward, a GGN-vector product — once per run, by
:class:`FlopMeter`), and the older forward-pass equivalents of each kind of step.

One forward-pass equivalent (F) is the cost of one no-grad forward pass of the model over one token. The numbers
are measured constants, not FLOP counts: how they were measured, and what each covers, is in BENCHMARKS.md
("Compute accounting: forward-pass equivalents"). An optimizer's own update (Adam moments, Newton-Schulz) is not
included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

T = TypeVar("T")


class FlopMeter:
    """FLOPs of a run's repeated units of work, each counted once (the first time it runs) and then reused: the
    shapes of a run's steps do not change, and counting every call would slow the Python dispatch of each op."""

    def __init__(self) -> None:
        self.per_call: dict[str, int] = {}

    def __call__(self, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn()``; the first call of each ``key`` is counted."""
        if key in self.per_call:
            return fn()
        self.per_call[key], result = count_flops(fn)
        return result


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

# F per token of each operation, measured on the micro preset (BENCHMARKS.md, "Compute accounting").
FORWARD_BACKWARD = 3.0  # a baseline step's gradient: forward + backward
GN_INNER_STEP = {"gn": 5.0, "prox_linear": 5.5}  # a full-GN inner step: jvp + transposed jvp + logit-space work
LAYERWISE_BLOCK = 2.0  # one block of a layerwise inner step (micro's 6 blocks averaged, shared prefix included)
GGN_VECTOR_PRODUCT = 5.0  # one CG iteration of full GN
LAYERWISE_PRODUCT_PER_BLOCK = 0.4  # a layerwise GGN-vector product ≈ 0.4 · n_blocks full ones


def baseline_step(tokens: int) -> float:
    """One baseline optimizer step on ``tokens`` tokens."""
    return FORWARD_BACKWARD * tokens


def gn_inner_steps(tokens: int, surrogate: str, n_blocks: int) -> float:
    """First-order inner steps over ``tokens`` tokens in all; ``n_blocks`` > 1 is layerwise GN."""
    per_token = n_blocks * LAYERWISE_BLOCK if n_blocks > 1 else GN_INNER_STEP[surrogate]
    return tokens * per_token


def cg_solve(tokens: int, products: int, layerwise_blocks: int) -> float:
    """A CG solve over ``tokens`` tokens: one gradient (a GN step's work) plus ``products`` GGN-vector products;
    ``layerwise_blocks`` is 0 for full GN."""
    per_block = LAYERWISE_PRODUCT_PER_BLOCK * layerwise_blocks if layerwise_blocks else 1.0
    return tokens * (GN_INNER_STEP["gn"] + GGN_VECTOR_PRODUCT * products * per_block)


def line_search(tokens: int, candidates: int) -> float:
    """A line search: ``candidates`` forward passes over its ``tokens`` tokens."""
    return float(tokens * candidates)
