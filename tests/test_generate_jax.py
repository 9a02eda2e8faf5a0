"""What only ppo_jax.generate has: the jitted sampling rule, keys and their determinism, log-probs equal
to a full forward, no recompilation (new key, new weights), tracing inside jit, bfloat16. Both cores'
shared tests: tests/test_generate.py."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ppo_jax.models as jm
from ppo_jax.generate import GenerationOutput, SamplingOptions, filter_logits, generate, make_generate_fn, sample_token
from ppo_rlhf import sampling as nz
from ppo_rlhf.testing import count_jax_compilations, make_padded_batch

V = 512
NEG = -np.inf


def _np(out: GenerationOutput):
    return tuple(np.asarray(x) for x in out)


_LOGPROBS: dict = {}


def ref_logprobs(model, q, qm, r, rm, temperature):
    """`response_logprobs` of one full forward, jitted (eager JAX compiles op by op: slow)."""
    graphdef, state = nnx.split(model)
    key = (graphdef, temperature)
    if key not in _LOGPROBS:
        _LOGPROBS[key] = jax.jit(lambda state, *a: jm.response_logprobs(
            nnx.merge(graphdef, state), *a, temperature=temperature))
    return np.asarray(_LOGPROBS[key](state, *(jnp.asarray(x) for x in (q, qm, r, rm))))


# ---- the rule on hand-made logits ---------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6), dict(top_k=7), dict(top_p=0.6),
                                dict(temperature=1.7, top_k=40, top_p=0.9), dict(greedy=True)])
def test_sample_token_matches_numpy_reference(kw):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 100)) * 2).astype(np.float32)
    g = nz.gumbel_noise(1, 64, 1, 100)[:, 0]
    opts = SamplingOptions(max_new_tokens=1, temperature=kw.get("temperature", 1.0),
                           top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0),
                           source="greedy" if kw.get("greedy") else "noise")
    tok, lp = jax.jit(functools.partial(sample_token, **opts.rule()))(jnp.asarray(logits), jnp.asarray(g))
    ref_tok, ref_lp = nz.sample_reference(logits, g, **kw)
    np.testing.assert_array_equal(np.asarray(tok), ref_tok)
    np.testing.assert_allclose(np.asarray(lp), ref_lp, rtol=0, atol=2e-6)
    sub = {k: v for k, v in kw.items() if k != "greedy"}
    got = np.asarray(filter_logits(jnp.asarray(logits) / opts.temperature, opts.top_k, opts.top_p))
    want = nz.filter_logits(logits, **sub)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    # XLA may divide by the temperature as a multiplication by its reciprocal: 1 ulp apart
    np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("kw", [dict(temperature=0.5), dict(temperature=2.0, top_k=3),
                                dict(top_p=0.7)])
def test_key_sampling_follows_the_filtered_distribution(kw):
    """Monte Carlo: 40000 draws with the key path hit each token with frequency softmax(filtered);
    log-probs are those of the UNFILTERED temperature distribution."""
    logits = jnp.asarray([1.0, 0.5, 0.0, -0.5, -1.0, -3.0], jnp.float32)
    n = 40000
    opts = SamplingOptions(max_new_tokens=1, temperature=kw.get("temperature", 1.0),
                           top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    g = jax.random.gumbel(jax.random.key(3), (n, 6), jnp.float32)
    tok, lp = sample_token(jnp.broadcast_to(logits, (n, 6)), g, **opts.rule())
    freq = np.bincount(np.asarray(tok), minlength=6) / n
    f = nz.filter_logits(np.asarray(logits), temperature=opts.temperature, top_k=opts.top_k,
                         top_p=opts.top_p)
    p = np.exp(f - f.max())
    p /= p.sum()
    # binomial standard error <= 0.0025; 5 sigma
    np.testing.assert_allclose(freq, p, atol=0.0125)
    assert np.all(freq[p == 0] == 0)
    full = np.asarray(jax.nn.log_softmax(logits / opts.temperature))
    np.testing.assert_allclose(np.asarray(lp), full[np.asarray(tok)], atol=1e-6)


# ---- with a model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    return jm.load_pretrained(tiny_checkpoint("gpt2"))


def _batch(seed=0, B=4, P=7):
    q, qm, _, _ = make_padded_batch(seed, B, P, 1, V)  # mixed prompt lengths, row 1 has 1 token
    return q, qm


def test_logprobs_equal_full_forward_and_key_determinism(gpt2):
    q, qm = _batch()
    kw = dict(max_new_tokens=12, temperature=0.7, top_k=50, eos_token_id=None)
    a = _np(generate(gpt2, q, qm, key=jax.random.key(1), **kw))
    b = _np(generate(gpt2, q, qm, key=jax.random.key(1), **kw))
    c = _np(generate(gpt2, q, qm, key=jax.random.key(2), **kw))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert (a[0] != c[0]).mean() > 0.5
    ids, mask, lps = a
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and lps.dtype == np.float32
    assert ids.shape == mask.shape == lps.shape == (4, 12) and mask.all()
    # the sampling log-probs are the policy's log-probs of the response at the same temperature
    # (the cache path vs one full forward: float32 rounding only)
    ref = ref_logprobs(gpt2, q, qm, ids, mask, temperature=0.7)
    np.testing.assert_allclose(lps, ref, rtol=0, atol=1e-5)


def test_no_recompilation_new_key_and_new_weights(tiny_checkpoint):
    lm = jm.load_pretrained(tiny_checkpoint("gpt2"))
    q, qm = _batch(seed=4)
    keys = [jax.random.key(i) for i in range(3)]
    kw = dict(max_new_tokens=8, temperature=0.9, eos_token_id=2)
    _, state = nnx.split(lm)
    new_state = jax.tree.map(lambda x: x * 1.05 + 0.01, state)  # an "updated" policy
    jax.block_until_ready(new_state)
    lm2 = jm.load_pretrained(tiny_checkpoint("gpt2"))  # another instance, same graphdef
    with count_jax_compilations() as first:
        a = _np(generate(lm, q, qm, key=keys[0], **kw))
    assert len(first) >= 1  # the counter sees compilations
    with count_jax_compilations() as again:
        b = _np(generate(lm, q, qm, key=keys[1], **kw))  # new key
        nnx.update(lm, new_state)  # new weights, same structure
        c = _np(generate(lm, q, qm, key=keys[0], **kw))
        d = _np(generate(lm2, q, qm, key=keys[0], **kw))
    assert again == []
    assert (a[0] != b[0]).any()
    assert np.abs(c[2] - a[2]).max() > 1e-3  # the new weights were used
    np.testing.assert_array_equal(d[0], a[0])
    graphdef, _ = nnx.split(lm)
    opts = SamplingOptions(max_new_tokens=8, temperature=0.9, eos_token_id=2, source="random")
    fn = make_generate_fn(graphdef, opts)
    assert fn is make_generate_fn(nnx.split(lm2)[0], opts) and fn._cache_size() == 1
    # another prompt length is another shape: one more compilation, then cached too
    q2, qm2 = _batch(seed=4, P=9)
    generate(lm, q2, qm2, key=keys[0], **kw)
    assert fn._cache_size() == 2


def test_generate_traces_inside_jit(gpt2):
    """A jitted PPO iteration can call generate on a merged model."""
    q, qm = _batch(seed=6)
    graphdef, state = nnx.split(gpt2)

    @jax.jit
    def outer(state, q, qm, key):
        return generate(nnx.merge(graphdef, state), q, qm, max_new_tokens=6, key=key, eos_token_id=2)

    a = _np(outer(state, jnp.asarray(q), jnp.asarray(qm), jax.random.key(0)))
    b = _np(generate(gpt2, q, qm, max_new_tokens=6, key=jax.random.key(0), eos_token_id=2))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("arch", ["llama"])  # grouped-query attention, RoPE
def test_bfloat16(tiny_checkpoint, arch):
    """bf16 weights, activations and KV cache; float32 logits, sampling math and log-probs."""
    lm = jm.load_pretrained(tiny_checkpoint(arch), dtype="bfloat16")
    q, qm = _batch(seed=7)
    out = generate(lm, q, qm, max_new_tokens=10, temperature=0.8, key=jax.random.key(0))
    assert out.logprobs.dtype == jnp.float32 and out.response_ids.dtype == jnp.int32
    ids, mask, lps = _np(out)
    assert np.isfinite(lps).all() and (lps < 0).all()
    # Recomputed by one full bf16 forward with the same bf16 weights: XLA:CPU evaluates a bf16
    # dot as float32 products and sums rounded once to bf16, so the cached [B, 1] decode steps
    # and the [B, P + N] forward round identically and agree to float32 rounding (observed
    # <= 1e-6). On an accelerator the reduction order differs between the two shapes, hidden
    # states differ by bf16 ulps (2^-8 relative), and through 2 layers the log-probs by up to a
    # few 1e-2 (as the bf16 model-parity test); a wrong cache slot or mask shifts them by O(1).
    ref = ref_logprobs(lm, q, qm, ids, mask, temperature=0.8)
    np.testing.assert_allclose(lps, ref, rtol=0, atol=1e-5 if jax.default_backend() == "cpu" else 0.05)
    # and the run really was bf16: the float32 model gives other log-probs for these tokens
    lm32 = jm.load_pretrained(tiny_checkpoint(arch))
    assert np.abs(ref_logprobs(lm32, q, qm, ids, mask, temperature=0.8) - lps).max() > 1e-3


def test_generate_needs_a_random_source(gpt2):
    """JAX has no global RNG: sampling without greedy, noise or a key is an error naming the key
    (the other bad arguments, both cores: tests/test_generate.py)."""
    q, qm = _batch()
    with pytest.raises(ValueError, match="key=jax.random.key"):
        generate(gpt2, q, qm, max_new_tokens=4)


def test_a_persistent_cache_hit_still_counts_as_a_compilation():
    """The suite runs with JAX's persistent compilation cache on (conftest.py). A retrace whose
    program is read back from that cache must still show up in `count_jax_compilations`, or the
    no-recompilation tests would pass on a warm cache whatever the code does."""
    import jax.numpy as jnp
    from jax._src import compilation_cache

    if os.environ.get("PPO_RLHF_TEST_JAX_CACHE") == "0":
        pytest.skip("the persistent compilation cache is off (PPO_RLHF_TEST_JAX_CACHE=0)")
    assert compilation_cache.is_cache_used(jax.devices()[0].client)  # conftest turned it on

    def f(x):
        return jnp.tanh(x) * 3.0 + 0.123456  # a program no other test compiles

    x = jnp.arange(7.0)
    # conftest writes only programs of >= 0.1 s to the cache; this one takes milliseconds
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        jax.jit(f)(x).block_until_ready()  # compiled, and written to the persistent cache
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    jax.clear_caches()  # the in-memory caches only: the next call reads the file back
    hits = []

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    try:
        with count_jax_compilations() as events:
            jax.jit(f)(x).block_until_ready()
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    assert hits and len(events) == 1
