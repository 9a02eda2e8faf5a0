"""The options of the critic-free math (group advantages, REINFORCE++, sequence-level ratios, KL in
the loss) that both backends check their arguments against, in one place.

`LOSS_AGG_MODES` is `config.LOSS_AGGS` plus the aggregation the math computes before `PPOConfig`
accepts it; once `LOSS_AGGS` lists "seq-mean-token-sum-norm" the two are the same tuple.
"""

from __future__ import annotations

from ppo_rlhf.config import LOSS_AGGS

GROUP_ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")
"""`group_advantages` kinds: group-normalised (GRPO), group-centred (Dr. GRPO), leave-one-out (RLOO)."""

IMPORTANCE_LEVELS = ("token", "sequence")
"""`policy_loss(importance_level=...)`: one ratio per token (PPO), or one per sequence (GSPO)."""

KL_LOSS_KINDS = ("k1", "k2", "k3", "k1+", "k3+")
"""`kl_loss` estimators; "k1+" / "k3+" take k1's / k3's value and k2's gradient (straight-through)."""

LOSS_AGG_MODES = LOSS_AGGS + tuple(m for m in ("seq-mean-token-sum-norm",) if m not in LOSS_AGGS)
"""Every loss aggregation `aggregate_loss` computes."""

__all__ = ["GROUP_ADVANTAGE_KINDS", "IMPORTANCE_LEVELS", "KL_LOSS_KINDS", "LOSS_AGG_MODES"]
