"""The one chat template (data.chat): training and inference encode a conversation to the same ids,
and those are transformers' ``apply_chat_template`` ids on the real Qwen2.5 tokenizer, pads expanded.

The tokenizer is the full Qwen2.5 vocabulary rebuilt offline from the bundled ranks (data.tokenizer).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from viscodex_jax.data.chat import IGNORE_INDEX, QWEN_CHATML, expand_image_tokens, num_image_tokens
from viscodex_jax.data.encode import encode_record, to_hf_messages
from viscodex_jax.data.image_processor import ImageProcessorConfig
from viscodex_jax.data.processor import Processor
from viscodex_jax.data.tokenizer import QWEN2_VL_CHAT_TEMPLATE, build_qwen2_tokenizer, special_token_ids
from viscodex_jax.model.config import config_from_dict
from viscodex_jax.testing.tiny import tiny_text_kwargs, tiny_vision_kwargs

IMAGE_CFG = ImageProcessorConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # as the tiny VLM's


@pytest.fixture(scope="module")
def full_tok():
    return build_qwen2_tokenizer()


def _config(tok, vision: bool):
    ids = special_token_ids(tok)
    d = {"model_type": "qwen2", **tiny_text_kwargs(-(-len(tok) // 64) * 64)}
    if vision:
        d.update(model_type="qwen2_5_vl", vision_config=tiny_vision_kwargs(d["hidden_size"]),
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                 image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                 vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    return config_from_dict(d, "test config")


@pytest.fixture(scope="module")
def vl(full_tok):
    return _config(full_tok, vision=True)


@pytest.fixture(scope="module")
def text_cfg(full_tok):
    return _config(full_tok, vision=False)


def _image(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _hf_ids(tokenizer, messages, grids, add_generation_prompt=False):
    """transformers' apply_chat_template ids, each single image pad expanded to the image's token count."""
    out = tokenizer.apply_chat_template(to_hf_messages(messages), tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    pad = special_token_ids(tokenizer)["image_pad"]
    expanded, k = [], 0
    for i in ids:
        if i == pad:
            expanded += [pad] * num_image_tokens(grids[k])
            k += 1
        else:
            expanded.append(i)
    assert k == len(grids)
    return expanded


# ------------------------------------------------------------------ chat template + labels

CONVERSATIONS = [
    # no system
    ([{"role": "user", "content": "Write hello world in Python."},
      {"role": "assistant", "content": "print('hello world')"}], 0),
    # with system
    ([{"role": "system", "content": "You are a careful coder."},
      {"role": "user", "content": "Sum 1..10?"},
      {"role": "assistant", "content": "```python\nprint(sum(range(1, 11)))\n```"}], 0),
    # multi-turn, whitespace and unicode
    ([{"role": "user", "content": "  Hi there\n\n"},
      {"role": "assistant", "content": "Hello — ça va? 你好"},
      {"role": "user", "content": "Now a loop:\n\tplease"},
      {"role": "assistant", "content": "for i in range(3):\n    print(i)\n"}], 0),
    # an image (MCD-style) and, in a later turn, a second one mid-text
    ([{"role": "user", "content": "<image>\nReproduce this chart with matplotlib."},
      {"role": "assistant", "content": "import matplotlib.pyplot as plt\nplt.bar([1, 2], [3, 4])\nplt.show()"},
      {"role": "user", "content": "And this one: <image> in HTML"},
      {"role": "assistant", "content": "<html><body><image href='x.png'/></body></html>"}], 2),
]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_ids_equal_transformers(full_tok, vl, case):
    messages, n_images = CONVERSATIONS[case]
    images = [_image(56 + 28 * k, 84, seed=k) for k in range(n_images)]
    rec = encode_record({"messages": messages, "images": [f"{k}.png" for k in range(n_images)]}, images,
                        full_tok, IMAGE_CFG, vl, max_len=4096)
    grids = rec.grid_thw.tolist()
    assert len(grids) == n_images
    assert rec.input_ids.tolist() == _hf_ids(full_tok, messages, grids)
    # the rendered string too (what Qwen2_5_VLProcessor tokenizes)
    hf_text = full_tok.apply_chat_template(to_hf_messages(messages), tokenize=False)
    rendered = QWEN_CHATML.render(to_hf_messages(messages), [num_image_tokens(g) for g in grids])
    assert rendered.text == expand_image_tokens(hf_text, grids)

    # labels: exactly the assistant contents, each followed by its <|im_end|>
    im_end = special_token_ids(full_tok)["im_end"]
    assert np.all((rec.labels == IGNORE_INDEX) | (rec.labels == rec.input_ids))
    labeled = np.flatnonzero(rec.labels != IGNORE_INDEX)
    runs = np.split(labeled, np.flatnonzero(np.diff(labeled) != 1) + 1)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert rec.input_ids[run[-1]] == im_end
        assert rec.input_ids[run].tolist() == full_tok.encode(answer + "<|im_end|>", add_special_tokens=False)
        assert rec.input_ids[run[0] - 1] == full_tok.encode("\n")[0]  # header "assistant\n" is not labeled
    # M-RoPE positions: text advances by one, 3 axes equal on text
    assert rec.positions.shape == (3, rec.length)
    assert rec.positions[:, 0].tolist() == [0, 0, 0]


def test_labels_when_bpe_merges_header_newline(full_tok, text_cfg):
    # "assistant\n" + "\n\nx" tokenizes as "assistant", "\n\n\n", "x": the straddling token is labeled.
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nx = 1"}]
    rec = encode_record({"messages": messages}, [], full_tok, IMAGE_CFG, text_cfg, 512)
    assert rec.input_ids.tolist() == _hf_ids(full_tok, messages, [])
    labeled = rec.input_ids[rec.labels != IGNORE_INDEX]
    assert full_tok.decode(labeled) == "\n\n\nx = 1<|im_end|>"
    assert rec.positions.tolist() == list(range(rec.length))  # text-only: 1-D positions


# ------------------------------------------------------------------ training == inference

# MCD form (what training reads): <image> tags in user turns. Answers start with a non-space character,
# so the generation prompt's final "\n" stays its own token and the prompt is a prefix of the training ids.
TRAIN_SERVE = {
    "text_only": ([{"role": "system", "content": "You write Python."},
                   {"role": "user", "content": "Sum 1..10?"},
                   {"role": "assistant", "content": "print(55)"},
                   {"role": "user", "content": "And 1..100, with a loop:\n\tplease"},
                   {"role": "assistant", "content": "total = 0\nfor i in range(101):\n    total += i"}], []),
    "one_image": ([{"role": "user", "content": "<image>\nReproduce this chart with matplotlib."},
                   {"role": "assistant", "content": "import matplotlib.pyplot as plt"}], [(84, 56)]),
    "multi_image": ([{"role": "user", "content": "Compare <image> and <image>."},
                     {"role": "assistant", "content": "The first is wider."},
                     {"role": "user", "content": "Now this one as HTML: <image>"},
                     {"role": "assistant", "content": "<html><body>chart</body></html>"}], [(56, 56), (112, 56), (84, 84)]),
}


# every case on the VL model, the text-only one on the text model too (images it refuses: see below)
@pytest.mark.parametrize("case, vision", [(c, True) for c in TRAIN_SERVE] + [("text_only", False)])
def test_training_and_inference_encode_the_same_ids(full_tok, vl, text_cfg, case, vision):
    messages, sizes = TRAIN_SERVE[case]
    cfg = vl if vision else text_cfg
    images = [_image(w, h, seed=k) for k, (w, h) in enumerate(sizes)]
    rec = encode_record({"messages": messages, "images": [f"{k}.png" for k in range(len(images))]}, images,
                        full_tok, IMAGE_CFG, cfg, max_len=4096)
    grids = rec.grid_thw.tolist()
    assert len(grids) == len(images)
    proc = Processor(full_tok, cfg, IMAGE_CFG)

    # the whole conversation: the Processor (inference) writes exactly the training ids and positions
    whole = proc([to_hf_messages(messages)], images=[images], add_generation_prompt=False)
    assert whole["attention_mask"].all()
    assert whole["input_ids"][0].tolist() == rec.input_ids.tolist() == _hf_ids(full_tok, messages, grids, False)
    np.testing.assert_array_equal(whole["positions"][..., 0, :], rec.positions)
    if images:
        np.testing.assert_array_equal(whole["image_grid_thw"], rec.grid_thw)
        np.testing.assert_array_equal(whole["pixel_values"], rec.pixel_values)

    # the prompt before each answer, with the generation prompt: transformers' ids, and a prefix of the
    # training ids that ends where that answer's labels start (the model is served what it was taught on)
    labeled = np.flatnonzero(rec.labels != IGNORE_INDEX)
    answer_starts = labeled[np.r_[True, np.diff(labeled) != 1]]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(turns) == len(answer_starts)
    prompts, prompt_images = [], []
    for turn, start in zip(turns, answer_starts):
        prompt = messages[:turn]
        n_img = sum(m["content"].count("<image>") for m in prompt)
        ids = _hf_ids(full_tok, prompt, grids[:n_img], True)
        assert ids == rec.input_ids[:start].tolist()
        prompts.append((to_hf_messages(prompt), ids))
        prompt_images.append(images[:n_img])
    # all prompts in one left-padded batch: each row's real tokens are its own prompt's ids
    batch = proc([p for p, _ in prompts], images=prompt_images)
    for row, (_, ids) in enumerate(prompts):
        mask = batch["attention_mask"][row].astype(bool)
        assert batch["input_ids"][row][mask].tolist() == ids
        assert not mask[: len(mask) - len(ids)].any()  # padding on the left only


def test_rendered_text_equals_the_jinja_template(full_tok):
    """HF-form messages as inference gets them: string and part-list contents, image parts marked by type,
    an "image" key or an "image_url" key, a system turn, with and without the generation prompt."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"},
                                     {"image": "a.png"}, {"image_url": "http://b.png"}]},
        {"role": "assistant", "content": "Two charts."},
        {"role": "user", "content": "Thanks!"},
    ]
    for gen in (True, False):
        jinja = full_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert QWEN_CHATML.render(messages, None, gen).text == jinja
        assert QWEN_CHATML.render(messages, [4, 1, 9], gen).text == expand_image_tokens(jinja, [[1, 4, 4], [1, 2, 2], [1, 6, 6]])


def test_label_spans_cover_answers_and_their_end_markers():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "r"}, {"role": "assistant", "content": ""}]
    r = QWEN_CHATML.render(messages)
    # an empty answer still ends its turn, and the model learns to end it
    assert [r.text[s:e] for s, e in r.label_spans] == ["a1", "<|im_end|>", "<|im_end|>"]
    assert r.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("messages, counts, match", [
    ([], (), "at least one message"),
    ([{"role": "user", "content": [{"type": "image"}]}], (), "more image parts than the 0 image"),
    ([{"role": "user", "content": "no image"}], (4,), "0 image part\\(s\\) but 1 image"),
    ([{"role": "user", "content": [{"type": "video"}]}], (), "message 0 \\(user\\) part 0: video parts are not supported"),
    ([{"role": "user", "content": [{"type": "audio"}]}], (), "message 0 \\(user\\) part 0: neither text nor an image"),
    ([{"role": "user", "content": 3}], (), "message 0 \\(user\\): content must be a string or a list"),
    ([{"content": "who?"}], (), "message 0: role must be a non-empty string"),
])
def test_render_refuses_what_it_cannot_write(messages, counts, match):
    with pytest.raises(ValueError, match=match):
        QWEN_CHATML.render(messages, counts)


def test_processor_refuses_images_for_text_models(full_tok, text_cfg):
    with pytest.raises(ValueError, match="has no vision tower"):
        Processor(full_tok, text_cfg, IMAGE_CFG)([[{"role": "user", "content": [{"type": "image"}]}]],
                                                 images=[[_image(56, 56)]])


def test_processor_warns_when_the_checkpoint_template_differs(full_tok, vl, caplog):
    proc = Processor(full_tok, vl, IMAGE_CFG)
    with caplog.at_level(logging.WARNING, logger="viscodex_jax.data.processor"):
        proc._warn_if_template_differs("ckpt")
    assert not caplog.records  # the shipped Qwen2-VL template agrees
    other = build_qwen2_tokenizer(num_ranks=4096)
    other.chat_template = QWEN2_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You are Qwen.")
    with caplog.at_level(logging.WARNING, logger="viscodex_jax.data.processor"):
        Processor(other, vl, IMAGE_CFG)._warn_if_template_differs("ckpt")
    assert len(caplog.records) == 1 and "ckpt: the tokenizer's chat template renders differently" in caplog.text
