"""The Hugging Face compatibility shims in one place: a Qwen2.5-VL config from our model
config, a dVLM built at random or loaded from a local Hugging Face folder, and the `<|mask|>`
token a base checkpoint lacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from echo_ray.config.schema import ModelConfig
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.text.tokenizer import (
    IMAGE_PAD_TOKEN,
    MASK_TOKEN,
    VIDEO_PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)

logger = logging.getLogger(__name__)

# The only attention implementation whose reading of a bool 4D mask we rely on
# (docs/ARCHITECTURE.md section 5.6).
ATTN_IMPLEMENTATION = "sdpa"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of `config`'s shapes on `tokenizer`'s ids (no resize ever needed)."""
    vocab = tokenizer.get_vocab()
    missing = [
        t
        for t in (MASK_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN)
        if t not in vocab
    ]
    if missing:
        raise ValueError(
            f"tokenizer lacks {missing}; build the model on a report tokenizer "
            "(echo_ray.text.tokenizer.train_report_tokenizer), which has every special token"
        )
    depth = config.vision_depth
    # Qwen2.5-VL: windowed attention with a full-attention block every 8 (7, 15, 23, 31).
    full_attention = [i for i in range(depth) if (i + 1) % 8 == 0] or [depth - 1]
    hf = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=config.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": config.rope_theta,
                "mrope_section": list(config.mrope_section),
            },
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=config.vision_hidden_size,
            intermediate_size=config.vision_intermediate_size,
            num_heads=config.vision_num_heads,
            out_hidden_size=config.hidden_size,
            patch_size=config.patch_size,
            spatial_merge_size=config.spatial_merge_size,
            fullatt_block_indexes=full_attention,
        ),
        image_token_id=vocab[IMAGE_PAD_TOKEN],
        video_token_id=vocab.get(VIDEO_PAD_TOKEN, vocab[IMAGE_PAD_TOKEN]),
        vision_start_token_id=vocab[VISION_START_TOKEN],
        vision_end_token_id=vocab[VISION_END_TOKEN],
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf._attn_implementation = ATTN_IMPLEMENTATION
    return hf


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> EchoDVLM:
    """The dVLM of `config`: loaded from `config.pretrained_path`, else built at random.

    Args:
        config: model section of the run config.
        tokenizer: required when building from shapes (the model uses its vocabulary and
            ids); with a checkpoint, defaults to the tokenizer saved beside it.
    """
    if config.pretrained_path is not None:
        return load_pretrained(config.pretrained_path, config, tokenizer)
    if tokenizer is None:
        raise ValueError("building a model from shapes needs the report tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = Qwen2_5_VLForConditionalGeneration(hf_config(config, tokenizer))
    backbone.to(DTYPES[config.dtype]).eval()
    return EchoDVLM(backbone, tokenizer, config)


def load_pretrained(
    path: str | Path, config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> EchoDVLM:
    """Load a local Hugging Face Qwen2.5-VL directory (e.g. Lingshu-7B) as a dVLM.

    Adds `<|mask|>` to the tokenizer when it lacks one and resizes the embeddings (the new
    rows start at the mean embedding) when the vocabulary outgrows them.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); set "
            "model.pretrained_path to a local Qwen2.5-VL checkpoint or to null to build one"
        )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), attn_implementation=ATTN_IMPLEMENTATION, dtype=DTYPES[config.dtype]
    )
    backbone.eval()
    add_mask_token(backbone, tokenizer)
    return EchoDVLM(backbone, tokenizer, config)


def add_mask_token(
    backbone: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> bool:
    """Give `tokenizer` a `<|mask|>` token and `backbone` an embedding row for it.

    Returns True when anything changed. New embedding (and, untied, output) rows are set to
    the mean of the existing rows, a neutral start for a token the base never saw.
    """
    changed = False
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        changed = True
    elif tokenizer.mask_token != MASK_TOKEN:
        tokenizer.mask_token = MASK_TOKEN
    old = backbone.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = backbone.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(0)
            head = backbone.get_output_embeddings().weight
            if head is not emb:
                head[old:] = head[:old].mean(0)
        logger.info("resized embeddings %d -> %d for %s", old, len(tokenizer), MASK_TOKEN)
        changed = True
    return changed
