"""The nn.Module wrappers call the functional API with their configuration."""

import torch

import ptd_kernels as ptd


def _inputs():
    torch.manual_seed(0)
    hidden = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(5, 6, dtype=torch.float64)
    teacher_weight = torch.randn(30, 6, dtype=torch.float64)
    targets = torch.tensor([1, 2, -100, 4, 29])
    return hidden, weight, teacher_hidden, teacher_weight, targets


def test_modules_match_functions():
    hidden, weight, teacher_hidden, teacher_weight, targets = _inputs()
    logp, entropy = ptd.LinearLogprobs(temperature=0.7, with_entropy=True, backend="torch")(hidden, weight, targets)
    ref_logp, ref_entropy = ptd.reference.linear_logprobs(hidden, weight, targets, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)

    terms = ptd.LinearPTDTerms(k=3, beta=0.3, backend="torch")(hidden, weight, targets, teacher_hidden, teacher_weight)
    ref = ptd.reference.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, 3, beta=0.3)
    for ours, theirs in zip(terms, ref):
        torch.testing.assert_close(ours, theirs)

    loss = ptd.LinearJSDLoss(beta=0.2, backend="torch")(hidden, weight, teacher_hidden, teacher_weight)
    torch.testing.assert_close(loss, ptd.reference.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight,
                                                                  beta=0.2))
    loss = ptd.LinearTopKJSDLoss(k=4, support="teacher", tail=False, backend="torch")(
        hidden, weight, teacher_hidden, teacher_weight)
    torch.testing.assert_close(loss, ptd.reference.linear_topk_jsd_loss(
        hidden, weight, teacher_hidden, teacher_weight, 4, support="teacher", tail=False))
    loss.backward()
    assert hidden.grad is not None and weight.grad.abs().sum() > 0
