"""Tests for utils/policy_transfer.py: a factorised joint policy started from a one-axis (prune) policy."""
from __future__ import annotations

import pytest
import torch

from utils.actions import ActionSpace
from utils.policy import N_SCALARS, SOLPolicy
from utils.policy_transfer import TransferError, interpolation_weights, train_only_axes, transfer_policy
from utils.records import StepScalars

H, E, T, B = 24, 16, 6, 4
SRC = ActionSpace.build([1.0], ["s40", "s100"], ["q16"])
DST = ActionSpace.build([0.1, 0.6, 1.0], ["s40", "s80", "s100"], ["q5", "q7", "q16"])


MIDDLE = 0.7  # the destination's initial bias on its middle levels (policy_middle_level_bias)


def _policy(actions: ActionSpace, factorised: bool, seed: int, bound: float = 0.0, init: float = 1.0) -> SOLPolicy:
    torch.manual_seed(seed)
    pol = SOLPolicy(H, E, len(actions), d_model=32, n_heads=4, n_layers=1, mlp_ratio=2, action_dim=8, max_len=16,
                    scalar_dim=N_SCALARS, action_usage=actions.nominal_usage(), logit_bound=bound,
                    head_init_scale=init, level_map=actions.level_map() if factorised else None,
                    level_bias=actions.middle_levels().float() * MIDDLE if factorised else None)
    if not factorised:  # a trained source has a non-zero bias
        with torch.no_grad():
            pol.pi.bias.normal_()
    return pol.eval()


def test_interpolation_weights_hand_computed() -> None:
    w = interpolation_weights(torch.tensor([0.4, 1.0]), torch.tensor([0.4, 0.8, 1.0, 0.2]))
    expected = torch.tensor([[1.0, 0.0], [1 / 3, 2 / 3], [0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(w, expected)
    assert torch.equal(interpolation_weights(torch.tensor([0.5]), torch.tensor([0.1, 0.9])), torch.ones(2, 1))
    with pytest.raises(TransferError):
        interpolation_weights(torch.tensor([1.0, 0.4]), torch.tensor([0.5]))


def _episode(seed: int):
    g = torch.Generator().manual_seed(seed)
    h, e = torch.randn(T, B, H, generator=g), torch.randn(T, B, E, generator=g)
    s = torch.rand(T, B, N_SCALARS, generator=g)
    prune_level = torch.randint(0, 2, (T, B), generator=g)  # previous actions at the source's levels: s40 / s100
    k, q = torch.randint(0, 3, (T, B), generator=g), torch.randint(0, 3, (T, B), generator=g)
    dst_prev = (k * 3 + prune_level * 2) * 3 + q  # s40 is level 0, s100 level 2 of the destination's ρ axis
    src_prev = prune_level.clone()
    dst_prev[0], src_prev[0] = len(DST), len(SRC)  # BOS
    return h, e, s, src_prev, dst_prev


@pytest.mark.parametrize("bound", [0.0, 2.0])
def test_transferred_policy_takes_the_sources_rho_decision_whatever_kappa_and_bits(bound: float) -> None:
    src = _policy(SRC, False, seed=0, bound=bound)
    dst = _policy(DST, True, seed=1, bound=bound, init=0.01)
    transfer_policy(src.state_dict(), SRC, dst, DST)
    h, e, s, src_prev, dst_prev = _episode(seed=2)
    # the source was trained with κ and bits at their one level: budget 1, deviation 0
    s_src = s.clone()
    for i in (0, 2):
        s_src[..., StepScalars.BUDGETS.start + i] = 1.0
        s_src[..., StepScalars.DEVIATIONS.start + i] = 0.0
    with torch.no_grad():
        ls = src(h, e, s_src, src_prev)  # [T, B, 2]
        ld = dst(h, e, s, dst_prev).view(T, B, 3, 3, 3)  # κ, ρ, bits
    gap_src = ls[..., 0] - ls[..., 1]
    gap_dst = ld[:, :, :, 0, :] - ld[:, :, :, 2, :]  # s40 − s100 at every κ and bits
    torch.testing.assert_close(gap_dst, gap_src[:, :, None, None].expand_as(gap_dst), atol=1e-5, rtol=1e-5)
    if bound == 0.0:  # s80's level logit interpolates the source's s40 and s100 at 1/3, 2/3 in usage, + its bias
        mid = ld[:, :, :, 1, :] - ld[:, :, :, 2, :]
        torch.testing.assert_close(mid, (gap_src / 3 + MIDDLE)[:, :, None, None].expand_as(mid), atol=1e-5, rtol=1e-5)


def test_transfer_copies_the_trunk_and_keeps_the_other_axes_fresh() -> None:
    src, dst = _policy(SRC, False, seed=0), _policy(DST, True, seed=1, init=0.01)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    transfer_policy(src.state_dict(), SRC, dst, DST)
    got = dst.state_dict()
    for k in ("obs_proj.weight", "pos_emb.weight", "blocks.0.q.weight", "ln_f.bias", "scalar_proj.2.weight"):
        assert torch.equal(got[k], src.state_dict()[k])
    keep = [0, 1, 2, 6, 7, 8]  # κ and bits level rows of the factorised head
    assert torch.equal(got["pi.weight"][keep], fresh["pi.weight"][keep])
    assert torch.equal(got["pi.bias"][keep], torch.tensor([0.0, MIDDLE, 0.0, 0.0, MIDDLE, 0.0]))
    assert torch.equal(got["budget_head.2.bias"][keep], fresh["budget_head.2.bias"][keep])
    torch.testing.assert_close(got["pi.weight"][[3, 5]], src.state_dict()["pi.weight"])
    # the folded columns: the κ and bits budgets and deviations
    for c in (2, 4, 5, 7):
        assert not got["scalar_proj.0.weight"][:, c].any()
    assert torch.equal(got["scalar_proj.0.weight"][:, 3], src.state_dict()["scalar_proj.0.weight"][:, 3])


def test_training_only_kappa_and_bits_leaves_the_transferred_rho_decision_exactly() -> None:
    """policy_train_axes [tok, quant] after the transfer: AdamW steps (with weight decay) on a policy-gradient loss
    move the κ and bits level rows, and nothing else: the s40 − s100 gap is still the source's at every step."""
    src = _policy(SRC, False, seed=0)
    dst = _policy(DST, True, seed=1, init=0.01)
    transfer_policy(src.state_dict(), SRC, dst, DST)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    head = train_only_axes(dst, DST, ["tok", "quant"])
    assert {id(p) for p in dst.parameters() if p.requires_grad} == {id(p) for p in head}
    opt = torch.optim.AdamW([{"params": head, "weight_decay": 0.0}], lr=0.05, weight_decay=0.5)
    h, e, s, _, dst_prev = _episode(seed=3)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        logp = torch.log_softmax(dst.train()(h, e, s, dst_prev), -1)
        a = torch.randint(0, len(DST), (T, B, 1), generator=g)
        loss = -(logp.gather(-1, a)[..., 0] * torch.randn(T, B, generator=g)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dst.eval().state_dict()
    moved = [0, 1, 2, 6, 7, 8]  # κ and bits level rows
    for k in before:
        if k in ("pi.weight", "pi.bias", "budget_head.2.weight", "budget_head.2.bias"):
            assert torch.equal(after[k][3:6], before[k][3:6]), k
            assert not torch.equal(after[k][moved], before[k][moved]), k
        else:
            assert torch.equal(after[k], before[k]), k
    s_src = s.clone()
    for i in (0, 2):
        s_src[..., StepScalars.BUDGETS.start + i] = 1.0
        s_src[..., StepScalars.DEVIATIONS.start + i] = 0.0
    with torch.no_grad():
        ls, ld = src(h, e, s_src, _episode(seed=3)[3]), dst(h, e, s, dst_prev).view(T, B, 3, 3, 3)
    gap_dst = ld[:, :, :, 0, :] - ld[:, :, :, 2, :]
    torch.testing.assert_close(gap_dst, (ls[..., 0] - ls[..., 1])[:, :, None, None].expand_as(gap_dst),
                               atol=1e-5, rtol=1e-5)


def test_train_only_axes_refuses_bad_axes() -> None:
    with pytest.raises(TransferError, match="factorised"):
        train_only_axes(_policy(DST, False, seed=1), DST, ["tok"])
    with pytest.raises(TransferError, match="expected"):
        train_only_axes(_policy(DST, True, seed=1), DST, ["kappa"])
    pol = _policy(DST, True, seed=1)
    head = train_only_axes(pol, DST, ["quant"])
    assert head[1] is pol.pi.bias
    w = torch.tensor([float("inf")] * 6 + [2.0] * 3)  # a frozen row's gradient is zeroed, even a non-finite one
    (pol.pi.bias * w).sum().backward()
    assert torch.equal(pol.pi.bias.grad, torch.tensor([0.0] * 6 + [2.0] * 3))
    with pytest.raises(TransferError, match="one level"):
        train_only_axes(_policy(SRC, True, seed=1), SRC, ["tok"])


def test_transfer_refuses_what_does_not_fit() -> None:
    src = _policy(SRC, False, seed=0)
    with pytest.raises(TransferError, match="factorised"):
        transfer_policy(src.state_dict(), SRC, _policy(DST, False, seed=1), DST)
    with pytest.raises(TransferError, match="exactly one axis"):
        transfer_policy(_policy(DST, False, seed=1).state_dict(), DST, _policy(DST, True, seed=2), DST)
    torch.manual_seed(0)
    wide = SOLPolicy(H, E, len(SRC), d_model=64, n_heads=4, n_layers=1, mlp_ratio=2, action_dim=8, max_len=16,
                     scalar_dim=N_SCALARS)
    with pytest.raises(TransferError):
        transfer_policy(wide.state_dict(), SRC, _policy(DST, True, seed=1), DST)


def test_middle_levels_and_their_initial_bias() -> None:
    assert DST.middle_levels().tolist() == [False, True, False] * 3
    assert SRC.middle_levels().tolist() == [False, False, False, False]
    odd = ActionSpace.build([1.0, 0.1, 0.6], ["s100", "s40"], ["q16", "q7", "q5", "q6"])
    assert odd.middle_levels().tolist() == [False, False, True, False, False, False, True, False, True]
    from utils.config import Config

    cfg = Config(policy_d_model=32, policy_n_heads=4, policy_head="factorised", policy_middle_level_bias=1.5)
    pol = SOLPolicy.from_config(cfg, H, E, DST)
    assert pol.pi.bias.tolist() == [0.0, 1.5, 0.0] * 3
    cfg.policy_head = "joint"
    with pytest.raises(ValueError, match="factorised"):
        SOLPolicy.from_config(cfg, H, E, DST)
    from utils.config import ConfigError, validate

    with pytest.raises(ConfigError, match="policy_middle_level_bias"):
        validate(cfg)
