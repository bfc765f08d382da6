"""Drop-in parity with Liger-Kernel's chunked preference losses on CPU, fp32.

Same constructor arguments, same call, same return tuple: loss, every auxiliary output and the
gradients of input, weight and bias must agree within Liger's own fp32 test tolerances
(atol 1e-5, rtol 5e-4) for every loss type both libraries support. Liger runs eagerly
(``compiled=False``). Skipped when liger-kernel is not installed.
"""

from __future__ import annotations

import pytest
import torch

liger = pytest.importorskip("liger_kernel.chunked_loss")

from test_losses import signature_defaults  # noqa: E402

from hypo_fast.losses import (  # noqa: E402  (after the importorskip)
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)

LIGER_DPO_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                   "apo_zero", "apo_down", "discopop")
TOL = {"atol": 1e-5, "rtol": 5e-4}
B, T, D, V = 3, 9, 16, 40


def make_inputs(seed: int, ignore_index: int, bias: bool):
    """Policy and reference heads; prompt tokens and ragged padding set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5 * 2
    b = torch.randn(V, generator=g) if bias else None
    target = torch.randint(0, V, (2 * B, T), generator=g)
    if ignore_index >= 0:  # a real token id used as ignore_index: keep it out of the labels
        target = torch.where(target == ignore_index, (target + 1) % V, target)
    target[:, :3] = ignore_index
    target[1, -2:] = ignore_index
    target[4, -1] = ignore_index
    ref = (torch.randn(2 * B, T, D, generator=g), torch.randn(V, D, generator=g) / D**0.5 * 2,
           torch.randn(V, generator=g) if bias else None)
    return h, w, b, target, ref


def run(module, h, w, b, target, *extra, requires_grad=(True, True, True)):
    """(loss, aux tuple, gradients of the leaves that require grad)."""
    leaves = [t.clone().requires_grad_(r) if t is not None else None
              for t, r in zip((h, w, b), requires_grad, strict=True)]
    loss, aux = module(leaves[1], leaves[0], target, leaves[2], *extra)
    loss.backward()
    return loss, aux, [t.grad for t in leaves if t is not None and t.requires_grad]


def assert_parity(ours, theirs):
    (loss, aux, grads), (l_loss, l_aux, l_grads) = ours, theirs
    torch.testing.assert_close(loss, l_loss.detach(), **TOL)
    assert len(aux) == len(l_aux)
    for i, (a, b) in enumerate(zip(aux, l_aux, strict=True)):
        torch.testing.assert_close(a, torch.as_tensor(b).detach().to(a.dtype), **TOL,
                                   msg=lambda m, i=i: f"aux[{i}]: {m}")
    assert len(grads) == len(l_grads)
    for i, (a, b) in enumerate(zip(grads, l_grads, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
@pytest.mark.parametrize(
    ("average", "nll", "ignore_index", "bias"),
    [(False, True, -100, True), (True, False, 7, False)],
)
def test_dpo_equals_liger(loss_type, average, nll, ignore_index, bias):
    eps = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    kwargs = dict(ignore_index=ignore_index, beta=0.2, compute_nll_loss=nll,
                  average_log_prob=average, loss_type=loss_type, label_smoothing=eps)
    h, w, b, target, ref = make_inputs(LIGER_DPO_TYPES.index(loss_type), ignore_index, bias)
    assert_parity(run(FusedLinearDPOLoss(**kwargs), h, w, b, target, *ref),
                  run(liger.LigerFusedLinearDPOLoss(compiled=False, **kwargs), h, w, b, target,
                      *ref))


def test_dpo_without_reference_and_frozen_head_equals_liger():
    h, w, b, target, ref = make_inputs(7, -100, True)
    frozen = (True, False, False)
    kwargs = dict(use_ref_model=False, compute_nll_loss=True)
    assert_parity(run(FusedLinearDPOLoss(**kwargs), h, w, b, target, *ref, requires_grad=frozen),
                  run(liger.LigerFusedLinearDPOLoss(compiled=False, **kwargs), h, w, b, target,
                      *ref, requires_grad=frozen))


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (FusedLinearSimPOLoss, "LigerFusedLinearSimPOLoss",
         dict(beta=2.0, gamma=0.6, label_smoothing=0.1, alpha=0.5)),
        (FusedLinearSimPOLoss, "LigerFusedLinearSimPOLoss", dict(compute_nll_loss=False)),
        (FusedLinearCPOLoss, "LigerFusedLinearCPOLoss", dict(beta=0.3, label_smoothing=0.2)),
        (FusedLinearCPOLoss, "LigerFusedLinearCPOLoss", dict(average_log_prob=True, alpha=0.3)),
        (FusedLinearORPOLoss, "LigerFusedLinearORPOLoss", dict(beta=0.3)),
        (FusedLinearORPOLoss, "LigerFusedLinearORPOLoss", dict(compute_nll_loss=False)),
    ],
    ids=["simpo", "simpo-no-nll", "cpo", "cpo-average", "orpo", "orpo-no-nll"],
)
def test_reference_free_losses_equal_liger(ours, theirs, kwargs):
    h, w, b, target, _ = make_inputs(11, -100, True)
    assert_parity(run(ours(**kwargs), h, w, b, target),
                  run(getattr(liger, theirs)(compiled=False, **kwargs), h, w, b, target))


@pytest.mark.parametrize(("ours", "theirs"), [
    (FusedLinearDPOLoss, "LigerFusedLinearDPOLoss"),
    (FusedLinearSimPOLoss, "LigerFusedLinearSimPOLoss"),
    (FusedLinearCPOLoss, "LigerFusedLinearCPOLoss"),
    (FusedLinearORPOLoss, "LigerFusedLinearORPOLoss"),
])
def test_constructor_arguments_and_defaults_are_ligers(ours, theirs):
    """Every argument of Liger's constructor, with its default (ours may add some)."""
    theirs = signature_defaults(getattr(liger, theirs).__init__)
    assert {k: v for k, v in signature_defaults(ours.__init__).items() if k in theirs} == theirs


def test_orpo_nll_target_equals_liger():
    h, w, b, target, _ = make_inputs(12, -100, True)
    nll_target = torch.randint(0, V, target.shape, generator=torch.Generator().manual_seed(3))
    nll_target[:, :1] = -100
    assert_parity(run(FusedLinearORPOLoss(), h, w, b, target, nll_target),
                  run(liger.LigerFusedLinearORPOLoss(compiled=False), h, w, b, target,
                      nll_target))


def test_documented_difference_sigmoid_label_smoothing():
    """cDPO here; Liger ignores label_smoothing for loss_type='sigmoid' (documented)."""
    h, w, b, target, ref = make_inputs(13, -100, True)
    kwargs = dict(loss_type="sigmoid", label_smoothing=0.2)
    ours = run(FusedLinearDPOLoss(**kwargs), h, w, b, target, *ref)[0]
    plain = run(FusedLinearDPOLoss(), h, w, b, target, *ref)[0]
    theirs = run(liger.LigerFusedLinearDPOLoss(compiled=False, **kwargs), h, w, b, target,
                 *ref)[0]
    torch.testing.assert_close(theirs.detach(), plain.detach(), **TOL)
    assert abs(ours.item() - plain.item()) > 1e-3
