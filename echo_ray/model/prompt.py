"""The fixed prompt of a dVLM: the checkpoint's chat template, rendered once per model.

With a chat template (a real Qwen2.5-VL / Lingshu checkpoint), the prompt is the user turn
`[image, instruction]` with the generation prompt, exactly what the checkpoint's
`AutoProcessor.apply_chat_template` gives for one image on the model's fixed grid:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|> x N<|vision_end|>instruction<|im_end|>\\n<|im_start|>assistant\\n

Without one (a model built from shapes on the report tokenizer), the simple layout
`<|vision_start|> <|image_pad|> x N <|vision_end|> instruction`. Either way every prompt of a
model has the same ids and length. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from echo_ray.text.tokenizer import IMAGE_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = VISION_START_TOKEN + IMAGE_PAD_TOKEN + VISION_END_TOKEN
# The processor's chat template file (legacy JSON form; `chat_template.jinja` is the
# tokenizer's and processor's current form, which the tokenizer loads itself).
CHAT_TEMPLATE_JSON = "chat_template.json"

# Qwen2.5-VL-*-Instruct's own chat template (its public chat_template.json): a reference for
# tests and fixtures of real-format checkpoints. Models never get it by default.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, instruction: str, num_image_tokens: int
) -> list[int]:
    """The prompt ids of a model: one image of `num_image_tokens` tokens, then `instruction`.

    With `tokenizer.chat_template`: the template rendered for one user turn (image, then the
    instruction) plus the generation prompt; the template must place the image as
    `<|vision_start|><|image_pad|><|vision_end|>` exactly once, and `<|image_pad|>` is
    expanded to `num_image_tokens` copies (as Qwen2.5-VL's processor does). Without one:
    `<|vision_start|> <|image_pad|> x N <|vision_end|> instruction`.

    Raises:
        ValueError: the chat template cannot render an image turn or does not place exactly
            one image placeholder (e.g. a text-only template).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        vocab = tokenizer.get_vocab()
        instruction_ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
        return (
            [vocab[VISION_START_TOKEN]]
            + [vocab[IMAGE_PAD_TOKEN]] * num_image_tokens
            + [vocab[VISION_END_TOKEN]]
            + list(instruction_ids)
        )
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": instruction}]}]
    fix = ("give the checkpoint Qwen2.5-VL's chat template (chat_template.jinja) or remove "
           "its template")
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as e:
        raise ValueError(
            f"the tokenizer's chat template cannot render an image turn ({e}): a text-only "
            f"template? {fix}"
        ) from None
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(
            f"the tokenizer's chat template renders {text.count(IMAGE_PLACEHOLDER)} "
            f"{IMAGE_PLACEHOLDER} for one image (a text-only template?); {fix}"
        )
    text = text.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * num_image_tokens)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def folder_chat_template(path: str | Path) -> str | None:
    """The chat template of a model folder's legacy `chat_template.json` (what
    `AutoProcessor` uses when there is no `chat_template.jinja`), or None."""
    file = Path(path) / CHAT_TEMPLATE_JSON
    if (Path(path) / "chat_template.jinja").is_file() or not file.is_file():
        return None
    return json.loads(file.read_text()).get("chat_template") or None
