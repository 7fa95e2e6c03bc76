"""viscodex_jax: VisCodex (merging a vision-language model with a coding LLM) in JAX/Flax.

    import viscodex_jax as vx
    model = vx.load("path/to/Qwen2.5-VL-7B-Instruct")     # HF dir or our orbax dir
    batch = model.processor([messages], images=[[img]])
    logits = model.logits(batch)
    texts = vx.generate(model, [messages], images=[[img]], max_new_tokens=256, sampler=vx.TopP(0.95))
    vx.save_hf(model, "out_dir")
    merged = vx.merge_models(base, [vlm, coder], weights=(0.7, 0.3))  # Models in, a Model out
"""

__version__ = "0.1.0"

import importlib

# name -> module: imported on first use (PEP 562), so `import viscodex_jax.merge` or a converter does not pay
# for the model, the sampler and orbax it never touches (about half a second of imports).
_EXPORTS = {
    "Model": "viscodex_jax.api", "generate": "viscodex_jax.api", "load": "viscodex_jax.api",
    "save_hf": "viscodex_jax.api",
    "Greedy": "viscodex_jax.sampling.methods", "Temperature": "viscodex_jax.sampling.methods",
    "TopK": "viscodex_jax.sampling.methods", "TopP": "viscodex_jax.sampling.methods",
    "sampler_from_settings": ("viscodex_jax.sampling.methods", "from_settings"),
    "Processor": "viscodex_jax.data.processor",
    "MergeSpec": "viscodex_jax.merge", "merge_models": "viscodex_jax.merge",
    "ModelConfig": "viscodex_jax.model.config", "load_config": "viscodex_jax.model.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'viscodex_jax' has no attribute {name!r}")
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
