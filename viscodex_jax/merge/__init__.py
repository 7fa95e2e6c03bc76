"""Task-vector merging.

    methods   name -> sparsify / sign consensus / normalise (one table, METHODS)
    tensor    the jitted per-tensor pipeline, the vocab policy for embeddings and lm_head
    drivers   one driver over tensor sources: params trees (merge_params, merge_models) or HF dirs
              (merge_checkpoints)
    report    per-tensor statistics and warnings about the base
    recipe    the merge config schema and the VisCodex recipe (run_merge)
    on_device the merge on a Mesh (MeshMerge: the sweep's per-lam program, bit for bit merge_checkpoints)
    sweep     the lam sweep: load once, merge on device per lam, score, keep the best
    heldout   held-out loss, the sweep's default score
"""

from viscodex_jax.merge.drivers import merge_checkpoints, merge_models, merge_params
from viscodex_jax.merge.methods import METHODS
from viscodex_jax.merge.spec import MergeError, MergeSpec

__all__ = ["METHODS", "MergeError", "MergeSpec", "merge_checkpoints", "merge_models", "merge_params"]
