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
    n_chunks = -(-v // chunk)
    w_pad = jnp.pad(w, ((0, 0), (0, n_chunks * chunk - v)))
    w_chunks = w_pad.reshape(d, n_chunks, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def body(carry, xs):
        m, s, picked = carry
        wc, i = xs
        logits = jnp.einsum("nd,dc->nc", h, wc.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "act_vocab"))
        cols = i * chunk + jnp.arange(chunk)
        logits = jnp.where(cols[None, :] < v, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        local = t - i * chunk
        here = (local >= 0) & (local < chunk)
        val = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
        picked = jnp.where(here, val, picked)
        return (m_new, s, picked), None

    n = h.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s, picked), _ = jax.lax.scan(body, init, (w_chunks, jnp.arange(n_chunks)))
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
