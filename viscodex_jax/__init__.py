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

from viscodex_jax.api import Model, generate, load, save_hf
from viscodex_jax.sampling.methods import Greedy, Temperature, TopK, TopP, from_settings as sampler_from_settings
from viscodex_jax.data.processor import Processor
from viscodex_jax.merge import MergeSpec, merge_models
from viscodex_jax.model.config import ModelConfig, load_config

__all__ = [
    "Greedy", "MergeSpec", "Model", "ModelConfig", "Processor", "Temperature", "TopK", "TopP",
    "generate", "load", "load_config", "merge_models", "sampler_from_settings", "save_hf",
]
