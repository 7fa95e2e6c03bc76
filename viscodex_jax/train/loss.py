"""Cross-entropy over a large vocab without materialising [tokens, vocab] logits.

The vocab is split into chunks; a scan keeps a running max / sum-exp (online
logsumexp) and picks the label's logit from the chunk that holds it. The chunk
body is rematerialised, so the backward pass also holds one chunk at a time.
Everything is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from viscodex_jax.sharding import constrain

IGNORE = -100


def token_nll(hidden: jax.Array, w: jax.Array, targets: jax.Array, chunk: int = 8192) -> jax.Array:
    """Per-token negative log-likelihood [...], 0 where ``targets == IGNORE``.

    hidden [..., D] (any dtype), w [D, V] the output projection, targets [...] int.
    """
    lead = hidden.shape[:-1]
    d, v = w.shape
    # Rows stay sharded like the batch; left to propagation, XLA may instead shard the
    # contraction (embed) like the FSDP weight and all-reduce full [tokens, chunk] logits.
    h = constrain(hidden.reshape(-1, d), ("batch", "act_embed"))
    t = targets.reshape(-1)
    chunk = min(chunk, v)
    n_full, tail = divmod(v, chunk)
    # Chunks are blocks of rows of the [V, D] matrix. With tied embeddings the caller passes
    # embedding.T, so w.T is the embedding itself (XLA folds the two transposes) and each block
    # is contiguous: no padded or transposed copy of the whole [V, D] matrix in the step, in the
    # forward pass or in its gradient (on CPU those copies cost more than the chunk matmuls saved).
    rows = w.T

    @jax.checkpoint
    def add_chunk(carry, wc, start):
        """Folds the logits of vocab rows [start, start + len(wc)) into (max, sum-exp, picked)."""
        m, s, picked = carry
        size = wc.shape[0]
        logits = jnp.einsum("nd,cd->nc", h, wc.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "act_vocab"))
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        local = t - start
        here = (local >= 0) & (local < size)
        val = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        return m_new, s, jnp.where(here, val, picked)

    n = h.shape[0]
    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    if n_full:
        blocks = rows[: n_full * chunk].reshape(n_full, chunk, d)
        carry, _ = jax.lax.scan(lambda c, xs: (add_chunk(c, xs[0], xs[1] * chunk), None), carry,
                                (blocks, jnp.arange(n_full)))
    if tail:  # the last, shorter chunk: its own (smaller) matmul rather than padding the matrix
        carry = add_chunk(carry, rows[n_full * chunk:], n_full * chunk)
    m, s, picked = carry
    nll = m + jnp.log(s) - picked
    return jnp.where(t != IGNORE, nll, 0.0).reshape(lead)


def shifted_targets(labels: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Targets for next-token prediction at each position: labels shifted left, IGNORE at the end.

    With packing, a position whose next token belongs to another segment gets IGNORE.
    """
    t = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    if segment_ids is not None:
        nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
        t = jnp.where(nxt == segment_ids, t, IGNORE)
    return t
