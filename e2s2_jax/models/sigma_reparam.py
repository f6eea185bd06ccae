"""sigmaReparam ("Stabilizing Transformer Training by Preventing Attention Entropy Collapse",
Zhai et al. 2023): every attention and feed-forward kernel `W` of the encoder and decoder
layers is trained as `W_hat = (gamma / sigma(W)) * W`, `sigma(W)` its spectral norm estimated by
one power-iteration step per training step and `gamma` a learned scalar.

Here it is a transformation of the parameter tree, applied by the train step before the model
(`T5Config.sigma_reparam`; the model's modules and param names are untouched):
- the trainable params gain a scalar `gamma` beside each reparametrised `kernel` (with a leading
  layer axis under `scan_layers`); with the option off nothing changes;
- the power-iteration vector `u` of each kernel (over its input axis, `[in]`, sharded like the
  kernel's first axis) is a non-trainable collection, `{"sigma_reparam": {<module path>: {"u":
  ...}}}`, held in `TrainState.model_state`, checkpointed with it, and advanced once per step
  (`power_iteration`), after the gradient accumulation's microbatches, not per microbatch;
- `effective_params` maps the trainable params to the plain model's (`kernel = W_hat`, no
  `gamma`), differentiably: the loss sees W_hat, the gradient reaches W and gamma.

One step, as the authors' reference (apple/ml-sigma-reparam, `SpectralNormedWeight`), for a
kernel `W [in, out]` (their weight is `W^T`): `v = normalize(u W)`, `u' = normalize(W v)`,
`sigma = u'^T W v`, with `u'` and `v` held constant in the gradient; `u'` is stored.

Initialisation (`reparametrise`), as the reference's vision code (`SNLinear`) does for training
from scratch: `u` is the top singular vector of the initial `W` (an SVD), and `gamma = sigma(W)`
as the first step will estimate it, so `W_hat = W` at step 0 (T5's per-kernel init scales, the
folded `1/sqrt(d_kv)` of the queries among them, are kept). (The reference's Flax speech code,
`SNDense`, instead starts `gamma` at 1, every `W_hat` at spectral norm 1.) The same rule applies
to loaded weights (an imported HF model, a plain checkpoint for continued pretraining): the
loaded model's function is unchanged at step 0. A checkpoint trained with sigmaReparam is read
by everything else (eval, infer, probe, SSR, HF export, `initial_checkpoint`) as the plain
model of its `W_hat` (`fold`), one power-iteration step ahead of its stored `u`: the weights
the next training step would use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

COLLECTION = "sigma_reparam"
GAMMA = "gamma"
ATTENTION_MODULES = ("attention", "self_attention", "encoder_decoder_attention")
ATTENTION_KERNELS = ("query", "key", "value", "out")
MLP_KERNELS = ("wi", "wi_0", "wi_1", "wo")
_EPS = 1e-12  # torch.nn.functional.normalize's, as the reference


def enabled(model: nn.Module) -> bool:
    """Whether `model`'s config asks for sigmaReparam (`T5Config.sigma_reparam`)."""
    return bool(getattr(getattr(model, "config", None), "sigma_reparam", False))


def is_reparametrised_kernel(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` is an attention or feed-forward kernel of an encoder or
    decoder layer (SurfaceFusion, EncoderFusion and the heads keep plain kernels)."""
    if len(path) < 4 or path[0] not in ("encoder", "decoder") or path[-1] != "kernel":
        return False
    module, projection = path[-3], path[-2]
    return (module in ATTENTION_MODULES and projection in ATTENTION_KERNELS) or (
        module == "mlp" and projection in MLP_KERNELS
    )


def kernel_paths(params: PyTree) -> list[tuple[str, ...]]:
    """The module paths (without `kernel`) of every reparametrised kernel in `params`."""
    flat = traverse_util.flatten_dict(
        dict(params), is_leaf=lambda _, x: isinstance(x, nn.Partitioned)
    )
    return sorted(path[:-1] for path in flat if is_reparametrised_kernel(path))


def has_gammas(params: PyTree) -> bool:
    """Whether `params` (or a checkpoint's metadata of them) holds sigmaReparam's gammas."""
    flat = traverse_util.flatten_dict(dict(params))
    return any(
        path[-1] == GAMMA and is_reparametrised_kernel(path[:-1] + ("kernel",)) for path in flat
    )


# ----------------------------------------------------------------------------- one kernel


def _normalize(x: Array) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x), _EPS)


def _over_layers(fn, num_leading: int):
    for _ in range(num_leading):
        fn = jax.vmap(fn)
    return fn


def power_step(kernel: Array, u: Array) -> tuple[Array, Array]:
    """`(u', v)`: one power-iteration step for the kernel `[..., in, out]` from `u [..., in]`
    (leading layer axes mapped over), in float32 and outside the gradient."""

    def step(kernel, u):
        kernel = jax.lax.stop_gradient(kernel.astype(jnp.float32))
        v = _normalize(u @ kernel)
        return _normalize(kernel @ v), v

    return _over_layers(step, kernel.ndim - 2)(kernel, u)


def spectral_norm_estimate(kernel: Array, u: Array, v: Array) -> Array:
    """`u^T W v` per kernel `[...]`: sigma(W) given a step's `(u', v)`; differentiable in W."""
    return _over_layers(lambda w, a, b: a @ w @ b, kernel.ndim - 2)(kernel, u, v)


def top_singular_vector(kernel: Array) -> Array:
    """`[..., in]`: the top left singular vector of each kernel `[..., in, out]` (an SVD)."""

    def top(kernel):
        left, _, _ = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
        return left[:, 0]

    return _over_layers(top, kernel.ndim - 2)(kernel)


def effective_kernel(kernel: Array, gamma: Array, u: Array, v: Array) -> Array:
    """`W_hat = gamma / sigma * W` for a step's `(u', v)`; `gamma` is `[...]` (layer axes)."""
    scale = gamma / spectral_norm_estimate(kernel, u, v)
    return kernel * scale[..., None, None].astype(kernel.dtype)


# ----------------------------------------------------------------------------- param trees


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _with(tree: PyTree, path: tuple[str, ...], key: str, value) -> PyTree:
    """A copy of the nested dict `tree` with `value` at `path + (key,)` (None: removed)."""
    tree = dict(tree)
    if not path:
        if value is None:
            tree.pop(key, None)
        else:
            tree[key] = value
        return tree
    tree[path[0]] = _with(tree[path[0]], path[1:], key, value)
    return tree


def _state_tree(paths, values) -> dict:
    return {
        COLLECTION: traverse_util.unflatten_dict(
            {p + ("u",): x for p, x in zip(paths, values, strict=True)}
        )
    }


def reparametrise(plain_params: PyTree) -> tuple[PyTree, dict]:
    """`(params, model_state)` for plain params (a fresh init, or loaded weights): a `gamma`
    beside every reparametrised kernel equal to the first step's sigma estimate from `u` = the
    kernel's top singular vector, so that `W_hat = W` (the function is unchanged)."""
    params = plain_params
    paths = kernel_paths(plain_params)
    vectors = []
    for path in paths:
        kernel = _get(plain_params, path)["kernel"]
        u = top_singular_vector(kernel)
        gamma = spectral_norm_estimate(kernel, *power_step(kernel, u))
        params = _with(params, path, GAMMA, gamma)
        vectors.append(u)
    return params, _state_tree(paths, vectors)


def power_iteration(params: PyTree, model_state: Mapping) -> dict:
    """`{path: (u', v)}`: this step's power-iteration step for every reparametrised kernel."""
    stored = model_state[COLLECTION]
    return {
        path: power_step(_get(params, path)["kernel"], _get(stored, path)["u"])
        for path in kernel_paths(params)
    }


def advanced_state(vectors: Mapping) -> dict:
    """The model state holding each kernel's `u'` of `power_iteration`."""
    paths = sorted(vectors)
    return _state_tree(paths, [vectors[p][0] for p in paths])


def effective_params(params: PyTree, vectors: Mapping) -> PyTree:
    """The plain model's params: each reparametrised kernel replaced by its `W_hat` (from this
    step's `vectors`, `power_iteration`), `gamma` dropped."""
    for path, (u, v) in vectors.items():
        module = _get(params, path)
        params = _with(
            params, path, "kernel", effective_kernel(module["kernel"], module[GAMMA], u, v)
        )
        params = _with(params, path, GAMMA, None)
    return params


def fold(params: PyTree, model_state: Mapping) -> PyTree:
    """The plain params of a sigmaReparam state: `W_hat` one power-iteration step ahead of the
    stored `u` (what the next training step would use)."""
    return effective_params(params, power_iteration(params, model_state))


def plain(params: PyTree) -> PyTree:
    """`params` without the gammas (the plain model's tree, kernels as they are)."""
    for path in kernel_paths(params):
        params = _with(params, path, GAMMA, None)
    return params


def boxed(boxed_params: PyTree) -> tuple[PyTree, dict]:
    """`(boxed params with gammas, boxed model state)` of abstract boxed plain params
    (`nn.Partitioned` of `jax.ShapeDtypeStruct`): gamma carries the kernel's leading (layer)
    axes, `u` the kernel's axes but the last, so `u` is sharded like the kernel's rows."""
    params = boxed_params
    vectors = []
    paths = kernel_paths(boxed_params)
    for path in paths:
        kernel = _get(boxed_params, path)["kernel"]
        shape, names = kernel.value.shape, tuple(kernel.names)
        gamma = jax.ShapeDtypeStruct(shape[:-2], jnp.float32)
        params = _with(params, path, GAMMA, kernel.replace_boxed(gamma).replace(names=names[:-2]))
        u = jax.ShapeDtypeStruct(shape[:-1], jnp.float32)
        vectors.append(kernel.replace_boxed(u).replace(names=names[:-1]))
    return params, _state_tree(paths, vectors)
