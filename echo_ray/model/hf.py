"""The Hugging Face compatibility shims in one place: a Qwen2.5-VL config from our model
config, a dVLM built at random or loaded from a local Hugging Face folder (its tokenizer,
chat template and preprocessor_config.json), and the `<|mask|>` token a base checkpoint lacks.
"""

from __future__ import annotations

import contextlib
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
from echo_ray.model.attention import ATTENTION_NAME
from echo_ray.model.diagnosis import load_diagnosis
from echo_ray.model.dvlm import IMAGE_MEAN, IMAGE_STD, EchoDVLM
from echo_ray.model.folder import PREPROCESSOR_FILE, read_preprocessing
from echo_ray.model.prompt import folder_chat_template
from echo_ray.text.tokenizer import (
    IMAGE_PAD_TOKEN,
    MASK_TOKEN,
    VIDEO_PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)

logger = logging.getLogger(__name__)

# Our attention function (`model/attention.py`): SDPA for a bool 4D mask, exactly as "sdpa"
# (docs/ARCHITECTURE.md section 5.6), flex attention for a BlockMask, causal SDPA for
# "causal". Runtime only: saved config.json files carry no attention implementation.
ATTN_IMPLEMENTATION = ATTENTION_NAME
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

    - tokenizer: the folder's (default), with its chat template; a legacy processor
      `chat_template.json` (what `AutoProcessor` uses when there is no
      `chat_template.jinja`) replaces the tokenizer_config.json one. The prompt is rendered
      from it (`model/prompt.py`).
    - `<|mask|>`: added when the tokenizer lacks it, with an initialised row
      (`add_mask_token`).
    - preprocessor_config.json, when present: image mean / std, and patch, merge and
      temporal patch sizes, which must equal the vision config's; else CLIP's statistics.
    - diagnosis.safetensors (`model/diagnosis.py`), when `config.diagnosis_prompt`: the
      label head and decision embeddings; a folder without them starts them fresh (a folder
      whose saved config says it had them refuses to).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); set "
            "model.pretrained_path to a local Qwen2.5-VL checkpoint or to null to build one"
        )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        template = folder_chat_template(path)
        if template is not None:
            tokenizer.chat_template = template
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), attn_implementation=ATTN_IMPLEMENTATION, dtype=DTYPES[config.dtype]
    )
    backbone.eval()
    add_mask_token(backbone, tokenizer)
    model = EchoDVLM(backbone, tokenizer, config, **_image_settings(path, backbone))
    if model.diagnosis is not None:
        load_diagnosis(model.diagnosis, path)
    return model


def _image_settings(path: Path, backbone: Qwen2_5_VLForConditionalGeneration) -> dict:
    """`image_mean` / `image_std` of the folder's preprocessor_config.json (default CLIP's),
    after checking its patch geometry against the vision tower's."""
    settings = read_preprocessing(path) or {}
    vision = backbone.config.vision_config
    for key, expected in (
        ("patch_size", vision.patch_size),
        ("merge_size", vision.spatial_merge_size),
        ("temporal_patch_size", vision.temporal_patch_size),
    ):
        if key in settings and settings[key] != int(expected):
            raise ValueError(
                f"{path / PREPROCESSOR_FILE} has {key}={settings[key]} but the vision tower's "
                f"config.json says {expected}: the files are from different checkpoints"
            )
    return {
        "image_mean": settings.get("image_mean", IMAGE_MEAN),
        "image_std": settings.get("image_std", IMAGE_STD),
    }


def add_mask_token(
    backbone: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> bool:
    """Give `tokenizer` a `<|mask|>` token and `backbone` an embedding row for it.

    Returns True when anything changed. When the tokenizer gains `<|mask|>` here (a
    checkpoint never trained as a dVLM), its embedding row and, untied, its output-head row
    are set to the mean of the base vocabulary's rows (ids below the old `len(tokenizer)`
    that are no added or special token), a neutral start for a token the base never saw.
    That holds whether the id lands on a spare row (Qwen2.5-VL's embeddings have ~270 rows
    past its 151,66x tokens, never trained: no resize) or on a new row (a resize; any other
    new row gets the same mean). A tokenizer that already has `<|mask|>` (an echo-ray
    checkpoint, the report tokenizer) keeps its trained row.
    """
    added = MASK_TOKEN not in tokenizer.get_vocab()
    base_len = len(tokenizer)  # before <|mask|> is added
    specials = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    if added:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    elif tokenizer.mask_token != MASK_TOKEN:
        tokenizer.mask_token = MASK_TOKEN
    weight = backbone.get_input_embeddings().weight
    old = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3: the full shape
    resized = len(tokenizer) > old
    if resized:
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        logger.info("resized embeddings %d -> %d for %s", old, len(tokenizer), MASK_TOKEN)
    if added or resized:
        base_ids = [i for i in range(base_len) if i not in specials]
        rows = list(range(old, len(tokenizer)))
        if tokenizer.mask_token_id < old:
            rows.append(tokenizer.mask_token_id)
        emb = backbone.get_input_embeddings().weight
        head = backbone.get_output_embeddings().weight
        params = [emb] if head is emb else [emb, head]
        with _gathered(params), torch.no_grad():
            for w in params:
                w[rows] = w[base_ids].float().mean(0).to(w.dtype)
    return added or resized


def _gathered(params: list[torch.nn.Parameter]):
    """Under ZeRO-3 (parameters partitioned), the full `params` for rank 0 to modify (as
    transformers' own resize does); otherwise nothing to do."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
