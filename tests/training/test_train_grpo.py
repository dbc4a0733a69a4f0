"""ptd_train.grpo: advantages, clipped loss, k3, PTD-set selection and the PTD-PO total,
against hand-computed numbers."""

import math

import pytest
import torch

from ptd_train import grpo


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    a = grpo.group_advantages(r, "group")
    s = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1): sqrt(Σ(x−0.5)²/3)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # all-correct group: no signal
    s3 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    assert torch.allclose(a[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s3 + 1e-6))
    none = grpo.group_advantages(r, "none")
    assert torch.allclose(none[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages(r, "batch")


def test_clipped_loss_hand_computed():
    # ρ = 1.5, 0.5, 1.1, 0.7 with A = +1, +1, −1, −1 ; ε_low = 0.2, ε_high = 0.3
    logp_old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = grpo.clipped_pg_loss(logp, logp_old, adv, 0.2, 0.3)
    # A>0: −min(ρA, clip(ρ)A): ρ=1.5 → −1.3 (clipped); ρ=0.5 → −0.5 (unclipped is the min)
    # A<0: ρ=1.1 → −min(−1.1, −1.1) = 1.1; ρ=0.7 → −min(−0.7, −0.8) = 0.8 (clipped)
    assert torch.allclose(loss, torch.tensor([-1.3, -0.5, 1.1, 0.8]), atol=1e-6)
    assert clipped.tolist() == [True, False, False, True]
    # the gradient vanishes exactly where the clipped branch is active
    lp = logp.clone().requires_grad_(True)
    grpo.clipped_pg_loss(lp, logp_old, adv, 0.2, 0.3)[0].sum().backward()
    assert lp.grad[0] == 0 and lp.grad[3] == 0
    assert torch.allclose(lp.grad[1], torch.tensor(-0.5)) and torch.allclose(lp.grad[2], torch.tensor(1.1))


def test_k3_hand_computed():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    d = ref - logp  # 0, 1, −1
    expect = torch.exp(d) - d - 1
    assert torch.allclose(grpo.k3(logp, ref), expect)
    assert grpo.k3(logp, ref)[0] == 0 and (grpo.k3(logp, ref) >= 0).all()


@pytest.mark.parametrize(
    "rewards, hint, threshold, groups, members",
    [
        ([1, 1, 1, 1], True, 1.0, True and False, [0, 0, 0, 0]),  # all-correct: not a PTD group
        ([1, 0, 1, 0], True, 1.0, True, [0, 1, 0, 1]),  # mixed: the failed ones
        ([0, 0, 0, 0], True, 1.0, True, [1, 1, 1, 1]),  # all-fail: included
        ([1, 0, 0, 0], False, 1.0, False, [0, 0, 0, 0]),  # no hint: never
        ([1, 1, 1, 0], True, 0.5, False, [0, 0, 0, 0]),  # mean 0.75 ≥ threshold 0.5
        ([1, 0, 0, 0], True, 0.5, True, [0, 1, 1, 1]),  # mean 0.25 < 0.5
        ([0.5, 1, 0, 1], True, 1.0, True, [1, 0, 1, 0]),  # partial reward counts as failed
    ],
)
def test_ptd_set_table(rewards, hint, threshold, groups, members):
    r = torch.tensor([rewards], dtype=torch.float32)
    h = torch.tensor([hint])
    assert grpo.ptd_groups(r, h, threshold).tolist() == [groups]
    assert grpo.ptd_set(r, h, threshold).int().tolist() == [members]


def test_ptd_set_batch_of_groups():
    r = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([True, True, True, False])
    assert grpo.ptd_set(r, h).tolist() == [[False, False], [False, True], [True, True], [False, False]]


def _parts(ptd_coef=1.0, kl_coef=0.1, drop=True):
    # 2 groups × 2 rollouts × 3 positions; group 0 mixed (PTD group), group 1 all-correct
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    has_hint = torch.tensor([True, True])
    f = grpo.ptd_set(rewards, has_hint).reshape(-1)
    groups = grpo.ptd_groups(rewards, has_hint).repeat_interleave(2)
    ref_kl_mask = ~groups if drop else torch.ones(4, dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    logp = torch.log(torch.tensor([[0.5, 0.6, 1.0], [0.3, 0.2, 0.4], [0.9, 1.0, 1.0], [0.7, 0.8, 0.6]]))
    logp_ref = logp - 0.1 * torch.arange(12.0).view(4, 3) / 12
    jsd = torch.tensor([[0, 0, 0], [0.2, 0.4, 0.6], [0, 0, 0], [0, 0, 0.0]])
    adv = grpo.group_advantages(rewards).reshape(-1)
    out = grpo.ptd_po_loss(
        logp, logp.detach(), logp_ref, adv, mask, jsd, f, ref_kl_mask, kl_coef=kl_coef, ptd_coef=ptd_coef
    )
    return out, dict(logp=logp, logp_ref=logp_ref, mask=mask, adv=adv, jsd=jsd, f=f, ref_kl_mask=ref_kl_mask)


def test_total_loss_matches_spec_formula():
    out, t = _parts(ptd_coef=0.7, kl_coef=0.1)
    n_tok = t["mask"].sum()  # 9 response tokens
    pg = -(t["adv"][:, None] * t["mask"]).sum() / n_tok  # ρ = 1 on-policy
    k = grpo.k3(t["logp"], t["logp_ref"]) * t["mask"] * t["ref_kl_mask"][:, None]
    kl = k.sum() / n_tok
    ptd = (0.2 + 0.4 + 0.6) / 3  # rollout 1 is the only member of F, |y| = 3
    assert torch.allclose(out.pg, pg)
    assert torch.allclose(out.kl, kl)
    assert torch.allclose(out.ptd, torch.tensor(ptd))
    assert torch.allclose(out.loss, pg + 0.1 * kl + 0.7 * ptd)


def test_ref_kl_dropped_exactly_for_ptd_groups():
    out, t = _parts()
    assert t["ref_kl_mask"].tolist() == [False, False, True, True]  # group 0 is a PTD group

    def kl_with(logp_ref):
        return grpo.ptd_po_loss(t["logp"], t["logp"].detach(), logp_ref, t["adv"], t["mask"], t["jsd"], t["f"],
                                t["ref_kl_mask"], kl_coef=0.1, ptd_coef=1.0).kl

    # the k3 term only sees rows 2 and 3: changing logp_ref of group 0 changes nothing
    logp_ref2 = t["logp_ref"].clone()
    logp_ref2[:2] -= 5.0
    assert torch.equal(out.kl, kl_with(logp_ref2))
    logp_ref2[2:] -= 5.0
    assert kl_with(logp_ref2) > out.kl
    # with the flag off every rollout gets its k3 term
    out_all, _ = _parts(drop=False)
    assert out_all.kl > out.kl


def test_ptd_coef_zero_is_plain_grpo():
    out, t = _parts(ptd_coef=0.0)
    assert out.ptd == 0
    assert torch.allclose(out.loss, out.pg + 0.1 * out.kl)


def test_ptd_term_hand_computed():
    """Σ_{F,t} D / Σ_F |y|; a given denominator is used as it is (a fraction of a token included: the
    gradient-accumulation rescale); no F token gives 0 with a finite, zero gradient."""
    jsd = torch.tensor([[0.2, 0.4, 9.0], [1.0, 3.0, 5.0], [7.0, 7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    in_f = torch.tensor([True, True, False])
    assert grpo.ptd_term(jsd, mask, in_f).item() == pytest.approx((0.2 + 0.4 + 1.0) / 3)
    assert grpo.ptd_term(jsd, mask, in_f, torch.tensor(0.75)).item() == pytest.approx(1.6 / 0.75)
    none = grpo.ptd_term(jsd, mask, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(jsd.grad, torch.zeros_like(jsd))


def test_ptd_set_leaves_unscored_rollouts_out():
    """A NaN reward (no reward function scored it) is out of its group's mean and never in F."""
    rewards = torch.tensor([[1.0, float("nan"), 0.0, 1.0], [1.0, 1.0, float("nan"), 1.0]])
    has_hint = torch.tensor([True, True])
    assert grpo.ptd_groups(rewards, has_hint).tolist() == [True, False]  # means 2/3 and 1
    assert grpo.ptd_set(rewards, has_hint).tolist() == [[False, False, True, False], [False] * 4]


def test_left_pad():
    from ptd_train.prompts import left_pad

    ids, mask = left_pad([[5, 6], [], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 0], [0, 7]] and mask.tolist() == [[1, 1], [0, 0], [0, 1]]
    ids, mask = left_pad([], pad_id=0)
    assert ids.shape == mask.shape == (0, 0)
