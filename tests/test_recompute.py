"""Activation recomputation: the same gradients and batch-norm statistics as plain training, the module untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from insightad.backbones.extractor import FeatureExtractor
from insightad.training.recompute import blocks_of, recomputed_activations


def _step(body: torch.nn.Module, x: torch.Tensor, recompute: bool) -> tuple[dict, dict]:
    """One forward/backward pass in training mode: (gradients, state dict after)."""
    body.train()
    body.zero_grad()
    with recomputed_activations(body, recompute) as n:
        assert (n > 0) == recompute
        loss = sum(f.square().mean() for f in body(x))
        loss.backward()
    grads = {k: p.grad.clone() for k, p in body.named_parameters() if p.grad is not None}
    return grads, {k: v.clone() for k, v in body.state_dict().items()}


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet18"])
def test_recomputation_changes_nothing_but_memory(arch):
    torch.manual_seed(0)
    plain = FeatureExtractor(arch, [1, 2, 3]).body
    again = copy.deepcopy(plain)
    x = torch.randn(4, 3, 64, 64)
    g0, s0 = _step(plain, x, recompute=False)
    g1, s1 = _step(again, x, recompute=True)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)
    assert s0.keys() == s1.keys()  # the state dict keeps its names (a backbone file reads the same)
    for k in s0:  # running statistics moved once, as without recomputation (not twice)
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(b) for b in blocks_of(again))  # the blocks are plain again


def test_blocks_of_finds_the_stages_blocks():
    body = FeatureExtractor("tf_efficientnet_lite0", [1, 2, 3]).body
    blocks = blocks_of(body)
    assert blocks and not any(isinstance(b, torch.nn.Sequential) for b in blocks)
    assert len(blocks) == sum(len(stage) for stage in body.blocks)


def test_not_training_runs_plainly():
    body = FeatureExtractor("tf_efficientnet_lite0", [1]).body.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = body(x)[0]
        with recomputed_activations(body):
            got = body(x)[0]
    torch.testing.assert_close(got, ref)
