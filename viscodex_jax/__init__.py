"""viscodex_jax: VisCodex (merging a vision-language model with a coding LLM) in JAX/Flax.

    import viscodex_jax as vx
    model = vx.load("path/to/Qwen2.5-VL-7B-Instruct")     # HF dir or our orbax dir
    batch = model.processor([messages], images=[[img]])
    logits = model.logits(batch)
    vx.save_hf(model, "out_dir")
"""

__version__ = "0.1.0"

from viscodex_jax.api import Model, load, save_hf
from viscodex_jax.data.processor import Processor
from viscodex_jax.model.config import ModelConfig, load_config

__all__ = ["Model", "ModelConfig", "Processor", "load", "load_config", "save_hf"]
