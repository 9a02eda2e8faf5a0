"""`PPOConfig.frozen_dtype`: the reference and the reward model stored (and run) in their own dtype,
in both backends. bfloat16 frozen models hold bfloat16 weights; the policy and the critic (copied
from the reward model) keep float32; the rollout's reference log-probs and scores move by bf16
rounding only, the policy's log-probs and values not at all. The JAX-vs-torch agreement of the
same setting is `parity_tests/test_precision_parity.py::test_frozen_dtype_parity`."""

from __future__ import annotations

import numpy as np
import pytest

from ppo_rlhf import PPOConfig
from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch

B, P, N, V = 4, 6, 5, 512
BF16_ATOL = 0.1  # the bf16 log-prob tolerance of the mixed-precision parity tests (LOW)


def _trainer(backend, lm, rm, frozen_dtype):
    cfg = PPOConfig(batch_size=B, max_prompt_len=P, max_new_tokens=N, frozen_dtype=frozen_dtype)
    kw = dict(config=cfg, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if backend == "jax":
        from ppo_jax.ppo import PPOTrainer

        return PPOTrainer(str(lm), str(rm), **kw)
    from ppo_torch.ppo import PPOTrainer

    return PPOTrainer(str(lm), str(rm), device="cpu", **kw)


def _dtypes(trainer, backend):
    """{role: set of floating dtype names of its weights}."""
    if backend == "jax":
        import jax

        def names(tree):
            return {str(x.dtype) for x in jax.tree.leaves(tree)}
        return {"policy": names(trainer.params["policy"]), "critic": names(trainer.params["critic"]),
                "reference": names(trainer.reference.params), "reward": names(trainer.reward.params)}

    def names(m):
        return {str(p.dtype).removeprefix("torch.") for p in m.parameters()}
    return {"policy": names(trainer.policy), "critic": names(trainer.critic),
            "reference": names(trainer.reference), "reward": names(trainer.reward)}


def _rollout(trainer, batch):
    q, qm = batch[0], batch[1]
    noise = np.random.default_rng(1).gumbel(size=(B, N, V)).astype(np.float32)
    return trainer.rollout(q, qm, noise=noise)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_frozen_models_in_bfloat16(tiny_checkpoint, backend):
    lm = tiny_checkpoint("qwen2")
    rm = tiny_checkpoint("qwen2", kind="scalar", seed=1, reward_gain=2.0, reward_bias=0.5)
    batch = make_padded_batch(0, B, P, N, V)
    t32, t16 = _trainer(backend, lm, rm, None), _trainer(backend, lm, rm, "bfloat16")
    d32, d16 = _dtypes(t32, backend), _dtypes(t16, backend)
    assert all(d == {"float32"} for d in d32.values()), d32
    assert d16 == {"policy": {"float32"}, "critic": {"float32"}, "reference": {"bfloat16"},
                   "reward": {"bfloat16"}}, d16
    r32, r16 = _rollout(t32, batch), _rollout(t16, batch)
    np.testing.assert_array_equal(r32.response_ids, r16.response_ids)  # the policy is untouched
    np.testing.assert_array_equal(r32.logprobs, r16.logprobs)
    np.testing.assert_array_equal(r32.values, r16.values)  # the critic keeps float32
    m = r32.response_mask.astype(bool)
    # the frozen models: bf16 rounding, and not nothing (else the setting did not reach them)
    d_ref = np.abs(r32.ref_logprobs - r16.ref_logprobs)[m]
    assert d_ref.max() < BF16_ATOL and d_ref.max() > 0, d_ref.max()
    d_score = np.abs(r32.scores - r16.scores)
    assert d_score.max() < 0.05 * max(1.0, np.abs(r32.scores).max()) and d_score.max() > 0, d_score


def test_frozen_dtype_is_checked():
    with pytest.raises(ValueError, match="frozen_dtype"):
        PPOConfig(frozen_dtype="float16")
    assert PPOConfig().frozen_dtype is None
