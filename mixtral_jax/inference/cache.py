"""A KV cache for generation, made where it will live: split over a mesh by batch and
KV head, so that no device ever holds the whole cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.model.config import ModelConfig
from mixtral_jax.model.kv_cache import KVCache, cache_axes, init_cache, init_paged_cache
from mixtral_jax.parallel.rules import DEFAULT_RULES, Rules, named_sharding


def cache_shardings(
    cache: KVCache, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES
) -> KVCache:
    """Where a (possibly abstract) cache lives on `mesh`: split by batch and KV head
    (a paged cache's pool by KV head alone)."""
    return KVCache(
        *(
            None if a is None else named_sharding(names, a.shape, mesh, rules)
            for names, a in zip(cache_axes(cache), cache, strict=True)
        )
    )


def empty_cache(
    config: ModelConfig,
    batch_size: int,
    max_length: int,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    dtype: jnp.dtype | None = None,
    chunk: int = 1,
    paged: tuple[int, int] | None = None,
) -> KVCache:
    """`init_cache`, created in its shardings on `mesh`: no device holds the whole cache.
    With `paged` (num_blocks, block_size), `init_paged_cache`."""
    if paged is None:
        make = functools.partial(init_cache, config, batch_size, max_length, dtype, chunk)
    else:
        make = functools.partial(
            init_paged_cache, config, batch_size, max_length, *paged, dtype, chunk
        )
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh, rules))()
