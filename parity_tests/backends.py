"""Run the same numpy inputs through `ppo_jax` and `ppo_torch`; get numpy values and gradients.

Each adapter takes float64 or float32 numpy arrays, runs the backend in that precision (JAX in a
scoped `jax.enable_x64(True)` for float64, so the rest of the test process keeps JAX's float32
default) and returns numpy results, so a test can compare the two backends and the plain-numpy
reference with one line.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

import ppo_jax.advantages as jadv
import ppo_jax.losses as jl
import ppo_jax.masked as jm
import ppo_torch.advantages as tadv
import ppo_torch.losses as tl
import ppo_torch.masked as tm

_MODULES = {"jax": {"losses": jl, "advantages": jadv, "masked": jm},
            "torch": {"losses": tl, "advantages": tadv, "masked": tm}}


def _x64(dtype) -> contextlib.AbstractContextManager:
    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def _np(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_np(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    return np.asarray(tree)


_JIT_CACHE: dict = {}


def _jit(fn: Callable, static_kw: dict, make: Callable) -> Callable:
    """jax.jit(make), cached per (function, static options)."""
    key = (fn, tuple(sorted((k, repr(v)) for k, v in static_kw.items())))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(make)
    return _JIT_CACHE[key]


class JaxBackend:
    name = "jax"

    # Functions run under jax.jit (the way the trainer runs them), one compilation per function,
    # options and shape; mask-value checks only run eagerly and are tested in tests/.
    def call(self, fn_name: str, module: str, *arrays: np.ndarray, **kw: Any) -> Any:
        """Value of ppo_jax.<module>.<fn_name>(*arrays, **kw) as numpy."""
        fn = getattr(_MODULES["jax"][module], fn_name)
        dtype = next((a.dtype for a in arrays if np.issubdtype(a.dtype, np.floating)), np.float32)
        arr_kw = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
        static_kw = {k: v for k, v in kw.items() if k not in arr_kw}
        with _x64(dtype):
            jitted = _jit(fn, static_kw, lambda *a, **k: fn(*a, **k, **static_kw))
            return _np(jitted(*[jnp.asarray(a) for a in arrays], **{k: jnp.asarray(v) for k, v in arr_kw.items()}))

    def call_eager(self, fn_name: str, module: str, *arrays: np.ndarray, **kw: Any) -> Any:
        """Like `call`, outside jit: concrete inputs, so mask values are checked too."""
        fn = getattr(_MODULES["jax"][module], fn_name)
        dtype = next((a.dtype for a in arrays if np.issubdtype(a.dtype, np.floating)), np.float32)
        with _x64(dtype):
            return _np(fn(*[jnp.asarray(a) for a in arrays],
                          **{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}))

    def value_and_grad(self, fn_name: str, module: str, wrt: int, *arrays: np.ndarray,
                       output: int | None = None, weights: np.ndarray | None = None,
                       **kw: Any) -> tuple[Any, np.ndarray, Any]:
        """(scalar, d scalar / d arrays[wrt], aux) for a function returning (scalar, aux) or a
        scalar (aux None). For a function returning arrays: `output` picks one of a tuple and the
        scalar is sum(weights * it) (weights default to ones)."""
        fn = getattr(_MODULES["jax"][module], fn_name)
        dtype = arrays[wrt].dtype
        with _x64(dtype):
            args = [jnp.asarray(a) for a in arrays]

            arr_kw = {k: jnp.asarray(v) for k, v in kw.items() if isinstance(v, np.ndarray)}
            static_kw = {k: v for k, v in kw.items() if k not in arr_kw}

            def f(x, args, arr_kw, w):
                out = fn(*args[:wrt], x, *args[wrt + 1:], **arr_kw, **static_kw)
                if output is not None:
                    out = out[output]
                if w is not None:
                    return jnp.sum(out * w), None
                return out if isinstance(out, tuple) else (out, None)

            if output is not None and weights is None:
                weights = np.ones(arrays[wrt].shape, dtype)
            w = None if weights is None else jnp.asarray(weights)
            key = ("grad", wrt, output)
            vg = _jit(fn, {**static_kw, "__key": key}, jax.value_and_grad(f, has_aux=True))
            (val, aux), grad = vg(args[wrt], args, arr_kw, w)
            return _np(val), _np(grad), _np(aux)


def _torch(a: Any) -> torch.Tensor:
    """numpy (any rank, 0-d included) -> a torch tensor of the same dtype and shape."""
    return torch.from_numpy(np.array(a, copy=True))


class TorchBackend:
    name = "torch"

    def call_eager(self, *a: Any, **kw: Any) -> Any:
        return self.call(*a, **kw)

    def call(self, fn_name: str, module: str, *arrays: np.ndarray, **kw: Any) -> Any:
        fn = getattr(_MODULES["torch"][module], fn_name)
        return _np(fn(*[_torch(a) for a in arrays], **{k: _torch(v) if isinstance(v, np.ndarray) else v
                                                      for k, v in kw.items()}))

    def value_and_grad(self, fn_name: str, module: str, wrt: int, *arrays: np.ndarray,
                       output: int | None = None, weights: np.ndarray | None = None,
                       **kw: Any) -> tuple[Any, np.ndarray, Any]:
        fn = getattr(_MODULES["torch"][module], fn_name)
        args = [_torch(a) for a in arrays]
        kw = {k: _torch(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        args[wrt] = args[wrt].clone().requires_grad_(True)
        out = fn(*args, **kw)
        if output is not None:
            out = out[output]
        if output is not None or weights is not None:
            w = torch.ones_like(out) if weights is None else _torch(weights)
            val, aux = (out * w).sum(), None
        else:
            val, aux = out if isinstance(out, tuple) else (out, None)
        (grad,) = torch.autograd.grad(val, args[wrt], allow_unused=True)
        grad = torch.zeros_like(args[wrt]) if grad is None else grad
        return _np(val), _np(grad), _np(aux)


BACKENDS = [JaxBackend(), TorchBackend()]

# float64: both backends and the reference do the same arithmetic up to reassociation, so they
# agree to ~1e-12. float32: each op rounds at ~6e-8 relative; a mean over a few hundred tokens and
# an exp() of a log-ratio accumulate to ~1e-6 relative against the float64 reference.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-6, atol=2e-6)}


def tol(dtype) -> dict[str, float]:
    return TOL[np.dtype(dtype).type]


def assert_close(actual: Any, expected: Any, dtype, what: str = "") -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64), err_msg=what, **tol(dtype))


def assert_close_scaled(actual: Any, expected: Any, scale: Any, dtype, what: str = "") -> None:
    """|actual - expected| <= rtol * scale + atol elementwise: for results whose rounding error is
    relative to the size of the intermediate sums (`scale` >= |expected|), not to the result."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    t = tol(dtype)
    bound = t["rtol"] * np.asarray(scale, dtype=np.float64) + t["atol"]
    bad = ~(np.abs(actual - expected) <= bound)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} beyond rtol*scale+atol; worst "
                           f"|diff|/bound {np.max(np.abs(actual - expected)[bad] / bound[bad]):.3g} at "
                           f"{np.argwhere(bad)[0].tolist()}")


def assert_stats_close(actual: dict, expected: dict, dtype, what: str = "") -> None:
    missing = set(expected) - set(actual)
    assert not missing, f"{what}: stats missing {missing}"
    for k in expected:
        assert_close(actual[k], expected[k], dtype, f"{what}: stat {k}")


Fn = Callable[..., Any]


class ModelCore:
    """One core's `models` package as the backend-parametrised unit tests of tests/test_models.py
    see it: arguments go in as numpy, results come back as numpy (tuples and dicts included), run
    without autograd; and the few places where the two cores name a weight differently."""

    def __init__(self, name: str):
        import importlib

        self.name = name
        self.models = importlib.import_module(f"ppo_{name}.models")

    def _in(self, a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        return jnp.asarray(a) if self.name == "jax" else _torch(a)

    def run(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        """fn(*args, **kw) with numpy arrays as the core's arrays; the result as numpy."""
        args = [self._in(a) for a in args]
        kw = {k: self._in(v) for k, v in kw.items()}
        if self.name == "jax":
            return _np(fn(*args, **kw))
        with torch.no_grad():
            return _np(fn(*args, **kw))

    @property
    def generation(self) -> Any:
        """The core's `generate` module (generate, filter_logits, sample_token)."""
        import importlib

        return importlib.import_module(f"ppo_{self.name}.generate")

    def random(self, seed: int) -> dict[str, Any]:
        """generate's keyword for its own random source, seeded: a JAX key or a torch Generator."""
        if self.name == "jax":
            return {"key": jax.random.key(seed)}
        return {"generator": torch.Generator().manual_seed(seed)}

    def generate(self, model: Any, *args: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`generate(model, ...)` (numpy prompts and noise are taken by both): (response ids,
        mask, log-probs) as numpy."""
        return tuple(_np(x) for x in self.generation.generate(model, *args, **kw))

    def score_head(self, model: Any) -> np.ndarray:
        """A scalar model's head as [1, H] (the on-disk `score.weight`)."""
        if self.name == "jax":
            return np.asarray(model.score_head.kernel[...]).T
        return model.hf_model.score.weight.detach().numpy()

    def value_head(self, model: Any) -> np.ndarray:
        """A PolicyWithValueHead's head as [1, H]."""
        if self.name == "jax":
            return np.asarray(model.value_head.kernel[...]).T
        return model.value_head.weight.detach().numpy()

    def scale_value_head(self, model: Any, factor: float) -> None:
        if self.name == "jax":
            model.value_head.kernel[...] = model.value_head.kernel[...] * factor
        else:
            with torch.no_grad():
                model.value_head.weight.mul_(factor)

    def trunk(self, model: Any, ids: np.ndarray) -> np.ndarray:
        """A scalar model's backbone output (last hidden states) on ids."""
        if self.name == "jax":
            return np.asarray(model.backbone(jnp.asarray(ids))[0])
        with torch.no_grad():
            return model.hf_model.base_model(_torch(ids)).last_hidden_state.numpy()

    def q_proj_dtype(self, model: Any) -> str:
        """The dtype of the first layer's query projection (a Llama-family model)."""
        if self.name == "jax":
            return str(model.backbone.layers.stack.self_attn.q_proj.kernel[...].dtype)
        return str(model.hf_model.model.layers[0].self_attn.q_proj.weight.dtype).removeprefix("torch.")


MODEL_CORES = [ModelCore("jax"), ModelCore("torch")]
