"""The PPO trainers on a tiny checkpoint, in both backends: the Python API of the README and no
recompilation after the first iteration. The CLI runs, crashes, signals, NaN rewards and
non-finite updates are in the fault suite, tests/test_faults.py."""

from __future__ import annotations

import numpy as np
import pytest

from ppo_rlhf import PPOConfig
from tests.helpers import length_reward, make_trainer

BACKENDS = ["jax", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_api_ten_lines(backend, tiny_checkpoint, tmp_path):
    """The README's ten-line example, in each backend."""
    ckpt = tiny_checkpoint("llama")
    if backend == "jax":
        from ppo_jax.ppo import PPOTrainer
    else:
        from ppo_torch.ppo import PPOTrainer
    config = PPOConfig(batch_size=4, max_new_tokens=6, max_prompt_len=8, num_iterations=2)
    trainer = PPOTrainer(policy=str(ckpt), reward=length_reward, prompts=["hi there", "a b", "c"],
                         config=config, out_dir=tmp_path / "run")
    history = trainer.train(progress=False)
    trainer.save_policy(tmp_path / "run" / "policy")
    assert len(history) == 2 and all(np.isfinite(h["objective/scores"]) for h in history)
    assert (tmp_path / "run" / "policy" / "tokenizer.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_jax_trainer_compiles_nothing_after_the_first_iteration(tiny_checkpoint):
    from ppo_rlhf.testing import count_jax_compilations

    t = make_trainer("jax", tiny_checkpoint("gpt2"), adaptive_kl=True, grad_accum_steps=2)
    with count_jax_compilations() as first:
        t.step()
    assert len(first) >= 3  # generate, rollout forward, advantages, update (+ small eager ops)
    with count_jax_compilations() as later:
        for _ in range(3):
            t.step()
    assert later == [], f"{len(later)} compilations after the first iteration"


@pytest.mark.parametrize("backend", BACKENDS)
def test_critic_starts_on_the_reward_models_scale(backend, tiny_checkpoint, tmp_path):
    """A normalised reward model (gain 5, bias -15: far from 1 / 0) as the reward and, by default,
    the critic's initialisation: at iteration 0 the critic's value at the last real token is the
    reward model's score of the same sequence (not its raw head), and a saved critic keeps it."""
    from ppo_rlhf.testing import make_padded_batch

    ckpt = tiny_checkpoint("gpt2")
    rm = tiny_checkpoint("gpt2", kind="scalar", seed=7, reward_gain=5.0, reward_bias=-15.0)
    t = make_trainer(backend, ckpt, reward=str(rm))
    q, qm, r, rm_mask = make_padded_batch(3, 4, 8, 6, vocab_size=500)
    ids, mask = np.concatenate([q, r], 1), np.concatenate([qm, rm_mask], 1)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)

    def critic_and_scores(critic):
        if backend == "jax":
            return np.asarray(critic.values(ids, mask)), np.asarray(t.reward_model().score(ids, mask))
        import torch

        with torch.no_grad():
            v = critic.values(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            return v, t.reward_model().score(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    values, scores = critic_and_scores(t.critic_model())
    assert np.abs(scores).mean() > 5  # the normalisation really moves the scores
    np.testing.assert_allclose(values[np.arange(4), last], scores, rtol=1e-5, atol=1e-5)
    t.save_critic(tmp_path / "critic")
    if backend == "jax":
        from ppo_jax.models import load_scalar_model
    else:
        from ppo_torch.models import load_scalar_model
    reloaded, _ = critic_and_scores(load_scalar_model(tmp_path / "critic"))
    np.testing.assert_allclose(reloaded, values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_given_as_the_policy_object_is_a_frozen_copy(backend, tiny_checkpoint):
    """reference=<the policy module itself> must not move with the policy: torch would freeze
    the policy (caught here), JAX would donate the reference's arrays in the first update (on
    accelerators; CPU ignores donation, so here JAX passes either way). The trainer takes a
    frozen copy."""
    ckpt = tiny_checkpoint("gpt2")
    if backend == "jax":
        from ppo_jax.models import load_pretrained, model_tensors
    else:
        from ppo_torch.models import load_pretrained, model_tensors
    policy = load_pretrained(ckpt)
    before = model_tensors(policy)
    t = make_trainer(backend, ckpt, policy=policy, reference=policy, tokenizer=str(ckpt),
                     learning_rate=1e-2)
    t.step()
    t.step()
    after = model_tensors(t.policy_model())
    assert max(float(np.abs(after[k] - before[k]).max()) for k in before) > 1e-4  # policy trained
    ref = model_tensors(t.reference.model() if backend == "jax" else t.reference)
    for k in before:
        np.testing.assert_array_equal(ref[k], before[k], err_msg=k)  # the reference stayed put


@pytest.mark.parametrize("backend", BACKENDS)
def test_warns_once_when_a_reward_model_scores_responses_without_eos(backend, tiny_checkpoint):
    import warnings

    ckpt = tiny_checkpoint("gpt2")
    rm = tiny_checkpoint("gpt2", kind="scalar", seed=7)
    # EOS is a token the tiny model never samples in 6 steps: every response runs to full length
    t = make_trainer(backend, ckpt, reward=str(rm), eos_token_id=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.step()
        t.step()
    msgs = [str(w.message) for w in caught if "without EOS" in str(w.message)]
    assert len(msgs) == 1 and "missing_eos_penalty" in msgs[0], msgs
    t = make_trainer(backend, ckpt, reward=str(rm), eos_token_id=2, missing_eos_penalty=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.step()
    assert not [w for w in caught if "without EOS" in str(w.message)]


@pytest.mark.parametrize("compile_with", ["eager", pytest.param(True, marks=pytest.mark.slow, id="inductor")])
def test_torch_compiled_iteration_matches_the_uncompiled_one(compile_with, tiny_checkpoint):
    """`PPOTrainer(compile=...)` (the `torch-compile` program of `benchmarks.run`) compiles every
    role -- policy, reference, critic and a reward model -- and two iterations give the metrics of
    the uncompiled trainer. "eager" traces with dynamo and runs the captured graphs with the same
    kernels: bit for bit equal (observed). Inductor generates its own kernels, whose fused
    reductions sum in another order: float32 rounding, carried through two updates (observed
    <= 2e-6 absolute on these metrics; bound 1e-4)."""
    import torch

    ckpt = tiny_checkpoint("gpt2")
    rm = tiny_checkpoint("gpt2", kind="scalar", seed=7)
    torch._dynamo.reset()
    compiled = make_trainer("torch", ckpt, reward=str(rm), compile=compile_with)
    roles = [compiled.policy, compiled.reference, compiled.critic, compiled.reward]
    assert all(type(m.forward).__name__ != "method" for m in roles), "a role's forward was not compiled"
    plain = make_trainer("torch", ckpt, reward=str(rm))
    for _ in range(2):
        a, b = compiled.step(), plain.step()
    tol = 0.0 if compile_with == "eager" else 1e-4
    for key in ("objective/scores", "loss/policy_avg", "loss/value_avg", "objective/kl", "val/ratio_var"):
        np.testing.assert_allclose(a[key], b[key], rtol=tol, atol=tol, err_msg=key)


@pytest.mark.parametrize("compile_with", ["eager", pytest.param(True, marks=pytest.mark.slow, id="inductor")])
def test_torch_compiled_lora_iteration_matches_the_uncompiled_one(compile_with, tiny_checkpoint):
    """As above with LoRA on policy and critic: the compiled policy also serves as the reference
    with its adapters switched off (peft's switch, guarded by dynamo: a second graph, see
    tests/test_lora.py), so its log-probs and the KL must match the uncompiled trainer's after
    the adapters have moved (KL != 0). Tolerances as above."""
    import torch

    ckpt = tiny_checkpoint("gpt2")
    rm = tiny_checkpoint("gpt2", kind="scalar", seed=7)
    kw = dict(lora_rank=4, lora_alpha=8.0, lora_roles=("policy", "critic"), learning_rate=1e-2)
    torch._dynamo.reset()
    compiled = make_trainer("torch", ckpt, reward=str(rm), compile=compile_with, **kw)
    assert compiled.reference_is_policy
    assert all(type(m.forward).__name__ != "method" for m in (compiled.policy, compiled.critic, compiled.reward))
    plain = make_trainer("torch", ckpt, reward=str(rm), **kw)
    for _ in range(2):
        a, b = compiled.step(), plain.step()
    assert abs(b["objective/kl"]) > 1e-3, "the adapters did not move: the reference check is vacuous"
    tol = 0.0 if compile_with == "eager" else 1e-4
    for key in ("objective/scores", "loss/policy_avg", "loss/value_avg", "objective/kl", "val/ratio_var"):
        np.testing.assert_allclose(a[key], b[key], rtol=tol, atol=tol, err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_roles_are_built_with_the_configs_model_options(backend, tiny_checkpoint):
    """`ppo_rlhf.runtime.roles`: every model is built with the config's options -- the
    differentiated ones (policy, critic) with its remat, the frozen ones (reference, reward
    model) without -- and a model given to the trainer must have been built with them: a
    UsageError names the option, and the given model is never changed."""
    from ppo_rlhf.config import ModelOptions
    from ppo_rlhf.errors import UsageError

    if backend == "jax":
        import ppo_jax.models as models
    else:
        import ppo_torch.models as models
    ckpt = tiny_checkpoint("gpt2")
    rm = tiny_checkpoint("gpt2", kind="scalar", seed=7)
    options = ModelOptions(remat="dots", compute_dtype="bfloat16")
    t = make_trainer(backend, ckpt, reward=str(rm), remat="dots", compute_dtype="bfloat16")
    if backend == "jax":
        built = {"policy": t.policy_model(), "critic": t.critic_model(),
                 "reference": t.reference.model(), "reward": t.reward_model()}
    else:
        built = {"policy": t.policy, "critic": t.critic, "reference": t.reference, "reward": t.reward}
    got = {role: models.model_options(m) for role, m in built.items()}
    assert got == {"policy": options, "critic": options, "reference": options.frozen(),
                   "reward": options.frozen()}

    plain = models.load_pretrained(ckpt)
    with pytest.raises(UsageError, match=r"policy model was built with remat='none' \(config: 'dots'\), "
                                         r"compute_dtype=None \(config: 'bfloat16'\)"):
        make_trainer(backend, ckpt, policy=plain, tokenizer=str(ckpt), remat="dots", compute_dtype="bfloat16")
    assert models.model_options(plain) == ModelOptions()  # refused, not changed
    # a frozen role's remat does not matter (it is never differentiated); its compute dtype does
    given = models.load_pretrained(ckpt, options=options)
    reference = models.load_pretrained(ckpt, options=ModelOptions(remat="full", compute_dtype="bfloat16"))
    make_trainer(backend, ckpt, policy=given, reference=reference, tokenizer=str(ckpt), remat="dots",
                 compute_dtype="bfloat16")
    with pytest.raises(UsageError, match=r"reference model was built with compute_dtype=None"):
        make_trainer(backend, ckpt, policy=given, reference=plain, tokenizer=str(ckpt), remat="dots",
                     compute_dtype="bfloat16")
    assert models.model_options(given) == options and models.model_options(reference).remat == "full"


@pytest.mark.parametrize("backend", BACKENDS)
def test_critic_free_estimator_builds_no_critic_and_samples_groups(backend, tiny_checkpoint, tmp_path):
    """advantage_estimator="grpo" with num_generations=G: no critic is built, trained, saved or
    checkpointed; each prompt is sampled G times in adjacent rows and every group's advantages
    are centred; a checkpointed run resumes to the uninterrupted one's weights exactly."""
    from ppo_rlhf.errors import UsageError

    if backend == "jax":
        from ppo_jax.models import load_pretrained, model_tensors
    else:
        from ppo_torch.models import load_pretrained, model_tensors
    ckpt = tiny_checkpoint("gpt2")
    kw = dict(advantage_estimator="grpo", num_generations=3, num_minibatches=3, kl_coef=0.0,
              kl_loss_coef=0.1)
    t = make_trainer(backend, ckpt, **kw)
    assert t.critic_model() is None and not t.shared_trunk
    if backend == "jax":
        assert set(t.params) == {"policy"}
    else:
        assert {id(p) for p in t._trainable()} == {id(p) for p in t.policy.parameters()}
    with pytest.raises(UsageError, match="trains no critic: there is none to save"):
        t.save_critic(tmp_path / "critic")
    prompts, q, qm = t._prompts_for(0, None, None, None)
    assert q.shape == (12, 8) and prompts[0] == prompts[1] == prompts[2] != prompts[3]
    assert (q.reshape(4, 3, 8) == q[::3][:, None]).all() and (qm.reshape(4, 3, 8) == qm[::3][:, None]).all()
    batch = t.rollout(q, qm, iteration=0)
    adv = t.compute_advantages(batch.arrays(), 0.0)
    per_seq = np.asarray(adv["advantages"])[:, 0].reshape(4, 3)  # every response has a first token
    np.testing.assert_allclose(per_seq.sum(1), 0.0, atol=1e-5)
    stats = t.step()
    assert stats["episode"] == 12 and "loss/kl_avg" in stats and "loss/value_avg" not in stats
    # no critic to give, nor a value head to carry
    with pytest.raises(UsageError, match="critic given, but advantage_estimator='grpo' trains no critic"):
        make_trainer(backend, ckpt, critic=str(ckpt), **kw)
    with pytest.raises(UsageError, match="trains no critic, but the policy is a PolicyWithValueHead"):
        make_trainer(backend, ckpt, policy=load_pretrained(ckpt, with_value_head=True),
                     tokenizer=str(ckpt), **kw)
    # exact resume
    straight = make_trainer(backend, ckpt, **kw)
    straight.train(2, progress=False)
    make_trainer(backend, ckpt, out_dir=tmp_path / "run", checkpoint_every=1, **kw).train(1, progress=False)
    resumed = make_trainer(backend, ckpt, out_dir=tmp_path / "run", **kw)
    resumed.train(2, resume=True, progress=False)
    a, b = model_tensors(straight.policy_model()), model_tensors(resumed.policy_model())
    assert all(np.array_equal(a[k], b[k]) for k in a)
