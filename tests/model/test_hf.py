"""Building and loading a dVLM: the Qwen2.5-VL config of a model config, a Hugging Face
folder without `<|mask|>`, and the errors of a missing folder or tokenizer."""

import json
import math

import pytest
import torch
from helpers.tiny_dvlm import make_tokenizer, overfit

from echo_ray.config.overrides import apply_overrides, from_dict
from echo_ray.config.schema import ConfigError, EchoConfig, ModelConfig
from echo_ray.model.hf import add_mask_token, build_model, hf_config, load_pretrained
from echo_ray.text.tokenizer import (
    EOS_TOKEN,
    IMAGE_PAD_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _tokenizer_without_mask():
    """A checkpoint tokenizer that lacks <|mask|> (like a base VLM's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the heart lungs are clear normal no effusion . report :".split()
    specials = [PAD_TOKEN, EOS_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN]
    vocab = {t: i for i, t in enumerate(specials + words + ["[UNK]"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token="[UNK]",
        additional_special_tokens=specials[2:],
    )


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_without_mask_token_gets_one_and_still_trains(tmp_path, tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    base_tok = _tokenizer_without_mask()
    # Build a "base checkpoint" with the mask-less vocabulary (hf_config needs a mask token,
    # so build on a copy that has one, then drop that row).
    config = ModelConfig(tie_word_embeddings=tied, instruction="report :", max_response_len=16)
    with_mask = _tokenizer_without_mask()
    with_mask.add_special_tokens({"mask_token": MASK_TOKEN})
    hf = hf_config(config, with_mask)
    hf.text_config.vocab_size = len(base_tok)
    Qwen2_5_VLForConditionalGeneration(hf).save_pretrained(tmp_path)
    base_tok.save_pretrained(tmp_path)

    model = load_pretrained(tmp_path, config)
    tok = model.tokenizer
    assert tok.mask_token == MASK_TOKEN and model.mask_token_id == len(base_tok)
    emb = model.backbone.get_input_embeddings().weight
    assert emb.shape[0] == len(base_tok) + 1 == model.vocab_size
    torch.testing.assert_close(emb[-1], emb[:-1].mean(0))
    assert (model.backbone.lm_head.weight is emb) == tied
    losses = overfit(model, steps=2)  # still trains: finite losses before and after a step
    assert all(math.isfinite(x) for x in losses)
    assert not add_mask_token(model.backbone, tok)  # idempotent


def test_load_pretrained_needs_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        load_pretrained(tmp_path, ModelConfig())
    with pytest.raises(ValueError, match="needs the report tokenizer"):
        build_model(ModelConfig())


def test_model_config_presets_overrides_and_validation():
    tiny = EchoConfig.from_name("tiny").model
    big = EchoConfig.from_name("base-7b").model
    assert tiny == ModelConfig()
    assert (big.hidden_size, big.num_layers, big.vision_depth, big.image_size) == (
        3584,
        28,
        32,
        448,
    )
    hf = hf_config(big, make_tokenizer())  # the 7B shape is a valid Qwen2.5-VL config
    assert hf.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    assert hf.text_config.num_key_value_heads == 4
    config = apply_overrides(
        EchoConfig.from_name("tiny"),
        [
            "model.block_length=4",
            "model.pretrained_path=/ckpt",
            "model.mrope_section=4,6,6",
            "model.hidden_size=128",
        ],
    )
    assert config.model.block_length == 4 and config.model.pretrained_path == "/ckpt"
    assert config.model.mrope_section == (4, 6, 6)
    assert from_dict(json.loads(config.to_json())) == config
    for override, message in [
        ("model.image_size=100", "multiple of patch_size"),
        ("model.mrope_section=8,8,8", "must sum to half the head dimension"),
        ("model.num_kv_heads=3", "multiple of model.num_kv_heads"),
        ("model.dtype=float64", "model.dtype must be"),
        ("model.max_response_len=4", "must be >= model.block_length"),
        ("model.blocklength=4", "unknown config key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(EchoConfig.from_name("tiny"), [override])
