"""The one chat template: a conversation -> prompt text -> token ids, for training and inference alike.

Training (``data.encode.encode_record``) and the inference ``Processor`` both
render through :meth:`ChatTemplate.render` and tokenize through
:func:`tokenize_with_labels`, so a conversation cannot encode one way when a
model learns it and another when it is served. The template is the model
family's (``model.families``); Qwen2 and Qwen2.5-VL share :data:`QWEN_CHATML`,
which writes exactly what the Qwen2-VL jinja template (``data.tokenizer``)
writes, with every image placeholder already expanded to its ``<|image_pad|>``
count (what ``Qwen2_5_VLProcessor`` does to the jinja output before tokenizing).

Messages are Hugging Face chat messages: ``{"role": ..., "content": str}`` or
``content`` a list of parts ``{"type": "text", "text": ...}`` / ``{"type":
"image"}`` (an ``"image"`` or ``"image_url"`` key marks an image part too, as
in the jinja template).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "QWEN_CHATML",
    "ChatTemplate",
    "Rendered",
    "expand_image_tokens",
    "num_image_tokens",
    "token_ids",
    "tokenize_with_labels",
]

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT: str = "You are a helpful assistant."


def num_image_tokens(grid_thw_row: Sequence[int] | np.ndarray, merge_size: int = 2) -> int:
    """Number of ``<|image_pad|>`` tokens one image occupies in the text.

    Each merge_size x merge_size block of patches becomes one LLM token.
    """
    t, h, w = (int(v) for v in grid_thw_row)
    return t * h * w // merge_size**2


def expand_image_tokens(
    text: str,
    grid_thw: np.ndarray | Sequence[Sequence[int]],
    merge_size: int = 2,
    image_token: str = "<|image_pad|>",
) -> str:
    """Repeat the i-th ``image_token`` in an already rendered ``text`` once per token of image i.

    For prompts given as text rather than messages; :meth:`ChatTemplate.render`
    expands as it renders.

    Raises:
        ValueError: if the number of placeholders differs from the number of images.
    """
    parts = text.split(image_token)
    n_placeholders = len(parts) - 1
    rows = list(grid_thw)
    if n_placeholders != len(rows):
        raise ValueError(
            f"text has {n_placeholders} {image_token} placeholder(s) but {len(rows)} image(s) were given"
        )
    out = [parts[0]]
    for row, part in zip(rows, parts[1:]):
        out.append(image_token * num_image_tokens(row, merge_size))
        out.append(part)
    return "".join(out)


class Rendered(NamedTuple):
    text: str
    # [start, end) character spans that carry labels: each assistant turn's content and its end marker.
    label_spans: list[tuple[int, int]]


def user_conversation(text: str, num_images: int = 0, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn (its images first, then the text, as the benchmarks' prompts put them), after an
    optional system turn: the message list ``vx.generate`` and the Processor take."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def _is_image(part: Mapping[str, Any]) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A ChatML template (``<|im_start|>role\\ncontent<|im_end|>\\n``) with vision placeholders."""

    default_system: str = DEFAULT_SYSTEM_PROMPT
    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"
    vision_start: str = "<|vision_start|>"
    image_pad: str = "<|image_pad|>"
    vision_end: str = "<|vision_end|>"

    def _content(self, content: Any, where: str, pads: Sequence[int] | None, k: int) -> tuple[str, int]:
        """Rendered content and the number of images consumed from ``pads`` (starting at ``k``)."""
        if isinstance(content, str):
            return content, k
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ValueError(f"{where} part {j}: expected a dict, got {type(part).__name__}")
            if _is_image(part):
                if pads is not None and k >= len(pads):
                    raise ValueError(f"{where} part {j}: more image parts than the {len(pads)} image(s) given")
                out.append(self.vision_start + self.image_pad * (1 if pads is None else int(pads[k])) + self.vision_end)
                k += 1
            elif part.get("type") == "video" or "video" in part:
                raise ValueError(f"{where} part {j}: video parts are not supported")
            elif "text" in part:
                out.append(part["text"])
            else:
                raise ValueError(f"{where} part {j}: neither text nor an image: {sorted(part)}")
        return "".join(out), k

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        image_pad_counts: Sequence[int] | None = (),
        add_generation_prompt: bool = False,
    ) -> Rendered:
        """The prompt text with image pads expanded (``image_pad_counts[k]`` pads for the k-th image part).

        ``image_pad_counts=None`` writes one pad per image, as the HF jinja template does.

        A default system turn comes first when the first turn is not a system
        turn. Labels cover each assistant turn's content and its ``<|im_end|>``,
        not the ``\\n`` after it (the model never has to predict it: the next
        turn's header follows).
        """
        if not messages:
            raise ValueError("a conversation needs at least one message")
        pieces: list[tuple[str, bool]] = []
        if messages[0].get("role") != "system":
            pieces.append((f"{self.turn_start}system\n{self.default_system}{self.turn_end}\n", False))
        k = 0
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if not isinstance(role, str) or not role:
                raise ValueError(f"message {i}: role must be a non-empty string, got {role!r}")
            text, k = self._content(msg.get("content"), f"message {i} ({role})", image_pad_counts, k)
            pieces.append((f"{self.turn_start}{role}\n", False))
            assistant = role == "assistant"
            pieces += [(text, assistant), (self.turn_end, assistant), ("\n", False)]
        if image_pad_counts is not None and k != len(image_pad_counts):
            raise ValueError(f"{k} image part(s) but {len(image_pad_counts)} image(s) given")
        if add_generation_prompt:
            pieces.append((f"{self.turn_start}assistant\n", False))
        text, spans, pos = "", [], 0
        for piece, labeled in pieces:
            if labeled and piece:
                spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
        return Rendered(text, spans)


QWEN_CHATML = ChatTemplate()


def _encode(tokenizer, text: str, offsets: bool):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: same ids as the transformers wrapper (no
        # BOS, byte-level post-processor), and safe to share between grain's
        # read threads (the wrapper mutates truncation/padding state per call).
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    if not offsets:
        return tokenizer.encode(text, add_special_tokens=False), None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def token_ids(tokenizer, text: str) -> np.ndarray:
    """The ids of rendered text (no BOS: Qwen has none, and the template writes every marker itself)."""
    return np.asarray(_encode(tokenizer, text, offsets=False)[0], np.int32)


def tokenize_with_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels): labels are the ids of tokens that overlap a label span, IGNORE_INDEX elsewhere.

    A token whose characters straddle a span edge (BPE can merge the assistant
    header's ``\\n`` with leading newlines of the content) counts as labeled.
    """
    ids_list, offsets_list = _encode(tokenizer, text, offsets=True)
    ids = np.asarray(ids_list, np.int32)
    offsets = np.asarray(offsets_list, np.int64).reshape(-1, 2)
    char_mask = np.zeros(len(text) + 1, np.int64)
    for s, e in spans:
        char_mask[s:e] = 1
    csum = np.concatenate([[0], np.cumsum(char_mask)])
    labeled = (csum[offsets[:, 1]] - csum[offsets[:, 0]]) > 0
    labels = np.where(labeled, ids, IGNORE_INDEX).astype(np.int32)
    return ids, labels
