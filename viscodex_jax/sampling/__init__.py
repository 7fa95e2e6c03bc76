"""JAX sampling: samplers, prefill and a jitted decode loop over a KV cache."""
