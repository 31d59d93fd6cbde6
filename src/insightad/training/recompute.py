"""Activation recomputation for a backbone being trained: each block keeps only its input during the forward
pass and recomputes its activations in the backward pass (PyTorch's non-reentrant checkpointing).

Why: fine-tuning a backbone keeps every block's activations of the whole batch for the backward pass; at
256 px and 32 CutPaste triples that is most of an 11 GB peak on the CPU. Recomputing them costs one more
forward pass per step. Batch-norm running statistics are put back after the recomputation, so they move
once per step, exactly as without it (PyTorch's checkpointing alone would update them twice).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def blocks_of(body: nn.Module) -> list[nn.Module]:
    """The blocks of a backbone: the members of its sequential stages (timm's EfficientNet ``blocks`` stages,
    ResNet ``layer1``-``layer4``), found through nested ``nn.Sequential`` below the body's own children."""
    out: list[nn.Module] = []

    def walk(seq: nn.Sequential) -> None:
        for m in seq:
            if isinstance(m, nn.Sequential):
                walk(m)
            else:
                out.append(m)

    for child in body.children():
        if isinstance(child, nn.Sequential):
            walk(child)
    return out


@contextmanager
def _batchnorm_statistics_kept(block: nn.Module) -> Iterator[None]:
    """Put every batch-norm buffer of ``block`` back as it was on exit (around a recomputation)."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for b, old in zip(m.buffers(), buffers):
                    b.copy_(old)


def _recomputed(block: nn.Module, forward: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if not (block.training and torch.is_grad_enabled()):
        return forward(x)
    return checkpoint(forward, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _batchnorm_statistics_kept(block)))


@contextmanager
def recomputed_activations(body: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, ``body``'s blocks (``blocks_of``) recompute their activations in the backward pass
    when training; the module, its parameters and its state dict are unchanged, and so is everything after.
    Yields how many blocks recompute (0 when not ``enabled`` or the body has no sequential stages)."""
    blocks = blocks_of(body) if enabled else []
    for b in blocks:
        b.forward = functools.partial(_recomputed, b, type(b).forward.__get__(b))  # type: ignore[method-assign]
    try:
        yield len(blocks)
    finally:
        for b in blocks:
            del b.forward
