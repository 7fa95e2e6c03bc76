"""The merge report: settings, per-tensor statistics, copied tensors, and warnings about the base.

Models fine-tuned from the given base have nearly orthogonal task vectors
(mean cosine about 0, e.g. -0.008 on the tiny checkpoints), while a base they
were not trained from adds the same offset to every task vector and pushes the
cosine up (0.39 in the same test). A mean cosine above
``UNRELATED_BASE_COSINE``, or a task vector that is zero everywhere (a model
that is the base itself), becomes a warning with the numbers; the merge still
completes, since merging related-but-different bases can be deliberate.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from viscodex_jax.merge.spec import MergeSpec

UNRELATED_BASE_COSINE = 0.2  # mean task-vector cosine above which the base looks unrelated (see module doc)


class MergeReport:
    """Collects what a merge did; ``data`` is the JSON-ready dict the drivers return."""

    def __init__(self, spec: MergeSpec, names: Sequence[str]):
        self.data: dict[str, Any] = {
            "method": spec.method, "weights": list(spec.weights), "lam": spec.lam, "density": spec.density,
            "seed": spec.seed, "drop_largest": spec.drop_largest, "drop_smallest": spec.drop_smallest,
            "dare_rescale": spec.dare_rescale, "normalize": spec.do_normalize,
            "group_weights": [[p, list(w)] for p, w in spec.group_weights],
            "include": list(spec.include), "exclude": list(spec.exclude), "out_dtype": spec.out_dtype,
            "allow_unusual_weights": spec.allow_unusual_weights,
            "models": list(names), "merged": {}, "copied": [], "warnings": [],
        }

    def merged(self, name: str, stats: dict[str, Any]):
        self.data["merged"][name] = {
            "task_vector_norms": [float(x) for x in stats["task_vector_norms"]],
            "cosine": np.asarray(stats["cosine"]).round(6).tolist(),
            "kept_fraction": [float(x) for x in stats["kept_fraction"]],
            "flipped_fraction": float(stats["flipped_fraction"]),
            **({"vocab_rows_merged": stats["vocab_rows_merged"]} if "vocab_rows_merged" in stats else {}),
        }

    def copied(self, name: str):
        self.data["copied"].append(name)

    def summary(self) -> dict[str, Any]:
        m = self.data["merged"].values()
        cos = [c[0][1] for c in (v["cosine"] for v in m) if len(c) > 1]
        return {"merged_tensors": len(self.data["merged"]), "copied_tensors": len(self.data["copied"]),
                "mean_cosine_model1_model2": float(np.mean(cos)) if cos else None}

    def check_task_vectors(self) -> list[str]:
        """Warnings (kept in the report) when the base looks wrong for these models."""
        merged = list(self.data["merged"].values())
        if not merged:
            return []
        base, models = self.data["models"][0], self.data["models"][1:]
        norms = np.sqrt(np.sum(np.square([v["task_vector_norms"] for v in merged]), axis=0))
        warnings = []
        for m, n in zip(models, norms):
            if n == 0:
                warnings.append(f"the task vector of {m} is zero in all {len(merged)} merged tensors: {m} is the base "
                                f"{base} itself, so it contributes nothing")
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                cos = float(np.mean([v["cosine"][i][j] for v in merged]))
                if cos > UNRELATED_BASE_COSINE:
                    warnings.append(
                        f"task vectors of {models[i]} and {models[j]} have mean cosine {cos:.3f} over {len(merged)} "
                        f"merged tensors (warning above {UNRELATED_BASE_COSINE}; models fine-tuned from their base "
                        f"give about 0): {base} looks unrelated to them. Task-vector norms: {models[i]} {norms[i]:.4g}, "
                        f"{models[j]} {norms[j]:.4g}"
                    )
        self.data["warnings"] = warnings
        return warnings

    def write(self, path: str):
        self.data["summary"] = self.summary()
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)
