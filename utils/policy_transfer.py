"""Start a factorised policy on a richer action grid from a policy trained on one axis of it.

Issue 15's joint grid (κ × ρ × bits) is learned from scratch in every joint recipe, and no joint policy has found the
MLP placement that the prune policy (κ 1, ρ {0.4, 1}, 16 bits) learns on its own axis. This module hands that
placement over: a joint policy with a factorised head (one logit per axis level) starts from the prune policy, so
that at its first update its ρ decision is the prune policy's, whatever κ and bits it is asked for, and GRPO only
has to add the other two axes.

How (`transfer_policy`):
* every tensor whose name and shape agree is copied (the trunk: observation projection, positions, blocks, final
  norm);
* the source's single-level axes were constant inputs in its training: their budget was their one level's usage and
  their deviation 0. The weights that read those scalar columns (`scalar_proj`'s first layer, the budget head's
  first layer) are folded into the biases at those constants and zeroed, so the new κ and bits requests and
  deviations do not move the transferred features at the start;
* the learned axis's level logits (`pi`, the budget head's last layer) and the previous-action embeddings come from
  the source's, a destination level the source lacks (s80 between s40 and s100) by linear interpolation in usage
  between its neighbours (held at the ends), plus the destination's own initial bias
  (`policy_middle_level_bias`);
* the other axes' level logits keep the destination's fresh initialisation (near uniform with
  `policy_head_init_scale` 0.01).

After the transfer, GRPO on the whole network wears the transferred placement down (results/joint_from_prune: 112
updates took the dev gain from −0.058 to −0.021 nats at κ 0.5 / ρ 0.7 / 8 bits). `train_only_axes`
(`policy_train_axes`) trains only the head rows that write the named axes' level logits, on the frozen trunk, so
the transferred axis cannot move.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from utils.actions import ActionSpace
from utils.config import AXIS_NAMES
from utils.policy import SOLPolicy
from utils.records import StepScalars


class TransferError(ValueError):
    """The source policy cannot start the destination policy (grid, head or layer shapes)."""


def interpolation_weights(src: Tensor, dst: Tensor) -> Tensor:
    """[len(dst), len(src)]: each destination value as a linear interpolation of the two source values around it
    (`src` strictly increasing; values outside its range take the nearest end). Rows sum to 1."""
    src, dst = src.double(), dst.double()
    if src.ndim != 1 or dst.ndim != 1 or len(src) < 1 or not bool((src[1:] > src[:-1]).all()):
        raise TransferError("interpolation_weights: src must be a strictly increasing 1-d tensor")
    w = torch.zeros(len(dst), len(src), dtype=torch.float64)
    if len(src) == 1:
        w[:, 0] = 1.0
        return w.float()
    x = dst.clamp(src[0], src[-1])
    hi = torch.searchsorted(src, x).clamp(1, len(src) - 1)
    lo = hi - 1
    t = (x - src[lo]) / (src[hi] - src[lo])
    rows = torch.arange(len(dst))
    w[rows, lo] = 1.0 - t
    w[rows, hi] += t
    return w.float()


def _learned_axis(actions: ActionSpace) -> int:
    sizes = actions.axis_sizes()
    varied = [i for i, n in enumerate(sizes) if n > 1]
    if len(varied) != 1:
        raise TransferError(f"the source policy must vary exactly one axis (levels per axis {sizes})")
    return varied[0]


def transfer_policy(src_state: Mapping[str, Tensor], src_actions: ActionSpace, dst: SOLPolicy,
                    dst_actions: ActionSpace) -> None:
    """Overwrite `dst` (a factorised policy on `dst_actions`) in place from the state dict of a policy with a joint
    head on `src_actions`, a grid with one varied axis (module docstring). Raises TransferError if they do not fit."""
    if dst.level_map is None:
        raise TransferError("the destination policy needs policy_head: factorised (one logit per axis level)")
    if dst.n_actions != len(dst_actions):
        raise TransferError(f"the destination policy has {dst.n_actions} actions, its grid {len(dst_actions)}")
    j = _learned_axis(src_actions)
    n_src = len(src_actions)
    if "pi.weight" not in src_state or src_state["pi.weight"].shape[0] != n_src:
        raise TransferError(f"the source policy must have one logit per action of its {n_src}-action grid "
                            "(policy_head: joint)")
    src_usage, dst_usage = src_actions.nominal_usage(), dst_actions.nominal_usage()
    # the destination's levels on axis j in its grid order (the order of the factorised head's logits)
    lvl = dst_actions.level_indices()[:, j]
    dst_levels = torch.stack([dst_usage[lvl == i, j][0] for i in range(dst_actions.axis_sizes()[j])])
    order = torch.argsort(src_usage[:, j])  # the source's actions differ on axis j only
    w_sorted = interpolation_weights(src_usage[order, j], dst_levels)
    w_level = torch.zeros_like(w_sorted)
    w_level[:, order] = w_sorted  # [n_dst_levels, n_src]: columns back in the source's action order
    level_offset = sum(dst_actions.axis_sizes()[:j])
    level_rows = torch.arange(level_offset, level_offset + len(dst_levels))
    w_action = w_level[dst_actions.level_indices()[:, j]]  # [A_dst, n_src]

    const_axes = [i for i in range(3) if i != j]
    const_budget = {i: float(src_usage[0, i]) for i in const_axes}  # a single-level axis can only meet its level
    new = {k: v.detach().clone() for k, v in dst.state_dict().items()}
    special = {"scalar_proj.0.weight", "scalar_proj.0.bias", "budget_head.0.weight", "budget_head.0.bias",
               "budget_head.2.weight", "budget_head.2.bias", "pi.weight", "pi.bias", "action_emb.weight"}
    missing = sorted(set(new) - set(src_state))
    if missing:
        raise TransferError(f"the source policy lacks {missing[:4]}: another architecture")
    for k in new:
        if k in special:
            continue
        if src_state[k].shape != new[k].shape:
            raise TransferError(f"{k}: source {tuple(src_state[k].shape)} vs destination {tuple(new[k].shape)}")
        new[k] = src_state[k].detach().to(new[k].dtype).clone()

    def fold(w: Tensor, b: Tensor, columns: Mapping[int, float]) -> tuple[Tensor, Tensor]:
        w, b = w.detach().double().clone(), b.detach().double().clone()
        for c, value in columns.items():
            b += w[:, c] * value
            w[:, c] = 0.0
        return w, b

    sw, sb = src_state["scalar_proj.0.weight"], src_state["scalar_proj.0.bias"]
    if sw.shape != new["scalar_proj.0.weight"].shape:
        raise TransferError(f"scalar_proj: source reads {sw.shape[1]} scalars, destination "
                            f"{new['scalar_proj.0.weight'].shape[1]} (policy_scalar_dim)")
    cols = {StepScalars.BUDGETS.start + i: const_budget[i] for i in const_axes}
    cols.update({StepScalars.DEVIATIONS.start + i: 0.0 for i in const_axes})
    w, b = fold(sw, sb, {c: v for c, v in cols.items() if c < sw.shape[1]})
    new["scalar_proj.0.weight"], new["scalar_proj.0.bias"] = w.to(sw.dtype), b.to(sb.dtype)
    bw, bb = src_state["budget_head.0.weight"], src_state["budget_head.0.bias"]
    if bw.shape != new["budget_head.0.weight"].shape:
        raise TransferError("budget_head: the layer sizes differ")
    w, b = fold(bw, bb, {i: const_budget[i] for i in const_axes})
    new["budget_head.0.weight"], new["budget_head.0.bias"] = w.to(bw.dtype), b.to(bb.dtype)

    for name in ("pi", "budget_head.2"):
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            src = src_state[key].detach().double()
            if src.shape[1:] != new[key].shape[1:]:
                raise TransferError(f"{key}: source {tuple(src.shape)} vs destination {tuple(new[key].shape)}")
            moved = (w_level.double() @ src.reshape(n_src, -1)).reshape(len(level_rows), *src.shape[1:])
            if key == "pi.bias":  # keep the destination's own initial preference (policy_middle_level_bias)
                moved = moved + new[key][level_rows].double()
            new[key][level_rows] = moved.to(new[key].dtype)

    emb = src_state["action_emb.weight"].detach().double()
    if emb.shape != (n_src + 1, new["action_emb.weight"].shape[1]):
        raise TransferError("action_emb: the action embedding sizes differ (policy_action_dim)")
    dst_emb = torch.cat([w_action.double() @ emb[:n_src], emb[n_src:]])  # BOS last in both
    new["action_emb.weight"] = dst_emb.to(new["action_emb.weight"].dtype)
    dst.load_state_dict(new)


def transfer_from_checkpoint(path: str, dst: SOLPolicy, dst_actions: ActionSpace, trust: bool = False) -> ActionSpace:
    """`transfer_policy` from an exported policy directory or a run directory (`utils.checkpoint.load_checkpoint`);
    returns the source's action grid."""
    from utils.checkpoint import checkpoint_config, load_checkpoint

    ckpt = load_checkpoint(path, "latest", trust=trust)
    src_cfg = checkpoint_config(ckpt)
    if getattr(src_cfg, "policy_head", "joint") != "joint":
        raise TransferError(f"{path}: the source policy must have policy_head: joint")
    src_actions = ActionSpace.from_config(src_cfg)
    transfer_policy(ckpt["policy_state_dict"], src_actions, dst, dst_actions)
    return src_actions


def train_only_axes(policy: SOLPolicy, actions: ActionSpace, axes: Sequence[str]) -> list[Tensor]:
    """Freeze `policy` (factorised head) except the rows of `pi` and of the budget head's last layer that write the
    level logits of `axes` (names from AXIS_NAMES). Every other parameter gets `requires_grad` False; the four
    head tensors keep it, with a gradient hook that zeroes their other rows. Returns those four tensors: give them
    no weight decay (AdamW would otherwise shrink the frozen rows; with zero gradients and no decay Adam leaves
    them exactly as they are)."""
    if policy.level_map is None:
        raise TransferError("policy_train_axes needs policy_head: factorised (one logit per axis level)")
    unknown = sorted(set(axes) - set(AXIS_NAMES))
    if unknown or not axes:
        raise TransferError(f"policy_train_axes: expected a non-empty list of {list(AXIS_NAMES)}, got {list(axes)}")
    sizes = actions.axis_sizes()
    single = [a for a in axes if sizes[AXIS_NAMES.index(a)] < 2]
    if single:
        raise TransferError(f"policy_train_axes: {single} has one level on this grid, nothing to learn")
    rows = torch.zeros(sum(sizes), dtype=torch.bool)
    for a in axes:
        i = AXIS_NAMES.index(a)
        rows[sum(sizes[:i]): sum(sizes[: i + 1])] = True
    for p in policy.parameters():
        p.requires_grad_(False)
    head = [policy.pi.weight, policy.pi.bias, policy.budget_head[-1].weight, policy.budget_head[-1].bias]
    for p in head:
        p.requires_grad_(True)
        mask = rows.to(p.device).reshape(-1, *([1] * (p.ndim - 1)))
        p.register_hook(lambda g, m=mask: torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)))
    return head
