"""Optional LLM judge through an OpenAI-compatible chat endpoint (off unless an endpoint is given)."""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request


@dataclasses.dataclass(frozen=True)
class Judge:
    """Asks ``model`` at ``endpoint`` (``.../v1``) for a 0-100 rating; returns it as a float in [0, 1]."""

    endpoint: str
    model: str = "gpt-4o"
    api_key: str = ""
    timeout: float = 60.0

    def rate(self, rubric: str, question: str, answer: str) -> float:
        prompt = (f"{rubric}\n\nQuestion:\n{question}\n\nAnswer to grade:\n{answer}\n\n"
                  "Reply with a single integer score from 0 to 100.")
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        req = urllib.request.Request(self.endpoint.rstrip("/") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            reply = json.load(resp)["choices"][0]["message"]["content"]
        m = re.search(r"\d+(?:\.\d+)?", reply)
        if not m:
            raise ValueError(f"judge at {self.endpoint} gave no score: {reply[:200]!r}")
        return min(max(float(m.group()) / 100.0, 0.0), 1.0)
