"""The chunked-vocab loss: row chunks of the [V, D] matrix give the same loss and gradients as before.

``_padded_reference`` is the implementation the row-chunked one replaced (the [D, V] matrix padded to a
multiple of the chunk and transposed into [chunks, D, chunk]); the change must not move the loss or
its gradients by more than 1e-6. A plain full-logits log-softmax is the independent reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscodex_jax.train.loss import IGNORE, token_nll

V, D = 1000, 32  # 1000 is no multiple of 96 or 128: the last chunk is shorter (or, before, padded)


def _padded_reference(hidden, w, targets, chunk):
    d, v = w.shape
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    chunk = min(chunk, v)
    n_chunks = -(-v // chunk)
    w_chunks = jnp.pad(w, ((0, 0), (0, n_chunks * chunk - v))).reshape(d, n_chunks, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def body(carry, xs):
        m, s, picked = carry
        wc, i = xs
        logits = jnp.einsum("nd,dc->nc", h, wc.astype(h.dtype), preferred_element_type=jnp.float32)
        cols = i * chunk + jnp.arange(chunk)
        logits = jnp.where(cols[None, :] < v, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        local = t - i * chunk
        here = (local >= 0) & (local < chunk)
        val = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
        return (m_new, s, jnp.where(here, val, picked)), None

    n = h.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s, picked), _ = jax.lax.scan(body, init, (w_chunks, jnp.arange(n_chunks)))
    return jnp.where(t != IGNORE, m + jnp.log(s) - picked, 0.0).reshape(targets.shape)


def _full_logits(hidden, w, targets):
    logp = jax.nn.log_softmax(jnp.einsum("...d,dv->...v", hidden, w), -1)
    nll = -jnp.take_along_axis(logp, jnp.clip(targets, 0)[..., None], -1)[..., 0]
    return jnp.where(targets == IGNORE, 0.0, nll)


def _case(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((2, 7, D)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((V, D)) * 0.5, jnp.float32)  # [V, D], as nn.Embed stores it
    t = rng.integers(0, V, (2, 7))
    t[0, 0], t[1, 3] = IGNORE, IGNORE
    t[0, 1], t[0, 2], t[1, 0] = V - 1, 0, 959  # the last row (in the short chunk), the first, a chunk edge
    return hidden, emb, jnp.asarray(t)


def _loss_and_grads(fn, hidden, emb, t, weights):
    """Token-mean loss as the train step takes it (here weighted, so each token's gradient differs), and its
    gradients d/d(hidden, emb). The matrix goes in as ``emb.T``, as the train step passes a tied embedding.
    """
    def loss(h, e):
        return (fn(h, e.T, t) * weights).sum() / (t != IGNORE).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, emb)


@pytest.mark.parametrize("chunk", [96, 500, 4096])  # short last chunk; two exact chunks; one chunk (> V)
def test_row_chunks_equal_the_padded_implementation_and_full_logits(chunk):
    hidden, emb, t = _case()
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, t.shape), jnp.float32)
    nll = jax.jit(lambda h, e: token_nll(h, e.T, t, chunk))(hidden, emb)
    np.testing.assert_allclose(nll, jax.jit(lambda h, e: _padded_reference(h, e.T, t, chunk))(hidden, emb),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nll, _full_logits(hidden, emb.T, t), rtol=1e-5, atol=1e-5)
    assert float(nll[0, 0]) == 0.0 and float(nll[1, 3]) == 0.0 and bool(jnp.all(nll[t != IGNORE] > 0))

    (l_new, (gh_new, ge_new)) = _loss_and_grads(lambda h, w, t: token_nll(h, w, t, chunk), hidden, emb, t, weights)
    (l_old, (gh_old, ge_old)) = _loss_and_grads(lambda h, w, t: _padded_reference(h, w, t, chunk), hidden, emb, t,
                                                weights)
    (l_full, (gh_full, ge_full)) = _loss_and_grads(_full_logits, hidden, emb, t, weights)
    np.testing.assert_allclose(l_new, l_old, rtol=1e-6)
    np.testing.assert_allclose(gh_new, gh_old, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ge_new, ge_old, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l_new, l_full, rtol=1e-5)
    np.testing.assert_allclose(gh_new, gh_full, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ge_new, ge_full, rtol=1e-4, atol=1e-5)
    # every vocab row is reached: rows holding no target still get the softmax's share of the gradient
    assert bool(jnp.all(jnp.abs(ge_new).sum(-1) > 0))


def test_untied_kernel_and_bf16_hidden():
    """An untied [D, V] lm_head kernel goes in as is; bf16 activations still give a float32 loss."""
    hidden, emb, t = _case(2)
    kernel = emb.T + 0.0  # its own [D, V] buffer, not a transpose of an embedding
    h16 = hidden.astype(jnp.bfloat16)
    new = jax.jit(lambda h, w: token_nll(h, w, t, 128))(h16, kernel)
    old = jax.jit(lambda h, w: _padded_reference(h, w, t, 128))(h16, kernel)
    assert new.dtype == jnp.float32
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)
    g_new = jax.jit(jax.grad(lambda w: token_nll(hidden, w, t, 128).sum()))(kernel)
    g_old = jax.jit(jax.grad(lambda w: _padded_reference(hidden, w, t, 128).sum()))(kernel)
    assert g_new.shape == (D, V)
    np.testing.assert_allclose(g_new, g_old, rtol=1e-6, atol=1e-6)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden, emb, _ = _case(3)
    t = jnp.full((2, 7), IGNORE)
    nll = token_nll(hidden, emb.T, t, 128)
    assert float(jnp.abs(nll).max()) == 0.0
    g = jax.grad(lambda h: token_nll(h, emb.T, t, 128).sum())(hidden)
    assert float(jnp.abs(g).max()) == 0.0


def test_train_step_loss_and_gradients_unchanged(hf_checkpoint, monkeypatch):
    """The train step's token-mean loss and every parameter's gradient, before (padded chunks) and after.

    A tied model: the case the row chunks change most (the loss reads the embedding itself); the untied
    kernel is covered at the loss level above.
    """
    from viscodex_jax.testing.models import VOCAB, load_cached
    from viscodex_jax.train import step as train_step
    from viscodex_jax.utils import flatten

    cfg, params = load_cached(hf_checkpoint("qwen2_tied_gqa3"), "float32")
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 300, (2, 24)).astype(np.int32)
    seg = np.ones_like(ids)
    seg[1, 17:] = 2  # two packed segments: the boundary's target is ignored
    labels = ids.copy()
    labels[0, :5] = IGNORE  # a masked prompt
    pos = np.concatenate([np.arange(24)[None], np.concatenate([np.arange(17), np.arange(7)])[None]]).astype(np.int32)
    batch = {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}
    assert VOCAB % 96, "the vocab must leave a short last chunk"

    def mean_loss(p):
        s, n, _ = train_step.batch_loss(p, batch, cfg, vocab_chunk=96)
        return s / n

    new = jax.jit(jax.value_and_grad(mean_loss))(params)
    monkeypatch.setattr(train_step, "token_nll", lambda h, w, t, chunk: _padded_reference(h, w, t, chunk))
    old = jax.jit(jax.value_and_grad(mean_loss))(params)
    np.testing.assert_allclose(new[0], old[0], rtol=1e-6)
    g_new, g_old = flatten(new[1]), flatten(old[1])
    assert g_new.keys() == g_old.keys()
    for k in g_new:
        assert float(jnp.abs(g_old[k]).max()) > 0, k
        np.testing.assert_allclose(g_new[k], g_old[k], rtol=1e-6, atol=1e-6, err_msg="/".join(k))
