"""The jitted evaluation step (the objective without dropout) and its metrics over a list of
batches, exact as if they were one batch."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from e2s2_jax.training import partitioning

EvalFns = tuple[Callable, Callable]


def make_eval_fns(model, objective, mesh, rules, param_shardings) -> EvalFns:
    """Jitted `(normalizers(batch), metrics(params, batch, normalizers))`, no dropout."""
    batch_sharding = partitioning.batch_sharding(mesh, rules)

    @jax.jit
    def normalizers(batch):
        return objective.normalizers(batch)

    def metrics(params, batch, totals):
        with nn.logical_axis_rules(rules):
            _, values = objective(model, params, batch, totals, None)
        return values

    metrics = jax.jit(metrics, in_shardings=(param_shardings, batch_sharding, None))
    return normalizers, metrics


def eval_metrics(eval_fns: EvalFns, params, batches: list) -> dict[str, float]:
    """Objective metrics over `batches` as one large batch: each batch's terms are divided by
    the normalizers of all of them, then summed (exact, like microbatching)."""
    if not batches:
        return {}
    normalizer_fn, loss_fn = eval_fns
    per_batch = [normalizer_fn(batch) for batch in batches]
    totals = jax.tree.map(lambda *xs: sum(xs), *per_batch)
    sums: dict[str, float] = {}
    for batch in batches:
        metrics = jax.device_get(loss_fn(params, batch, totals))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    sums.update({name: float(value) for name, value in jax.device_get(totals).items()})
    return sums
