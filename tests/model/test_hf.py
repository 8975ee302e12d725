"""Building and loading a dVLM: the Qwen2.5-VL config of a model config, a Hugging Face
folder without `<|mask|>` (a resize, or Qwen's spare rows), its chat template and
preprocessor_config.json, the ids decoding bans, and the errors of a missing folder or
tokenizer."""

import json
import math

import numpy as np
import pytest
import torch
from helpers.tiny_dvlm import make_model, make_tokenizer, overfit, qwen_processor, qwen_tokenizer
from PIL import Image

from echo_ray.config.overrides import apply_overrides, from_dict
from echo_ray.config.schema import ConfigError, EchoConfig, ModelConfig
from echo_ray.decode.sampler import generate
from echo_ray.model.checkpoint import load_checkpoint, save_checkpoint
from echo_ray.model.folder import PREPROCESSOR_FILE, check_hf_model_folder
from echo_ray.model.hf import add_mask_token, build_model, hf_config, load_pretrained
from echo_ray.model.prompt import CHAT_TEMPLATE_JSON, QWEN2_5_VL_CHAT_TEMPLATE
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
    words = [i for i in range(len(base_tok)) if i not in base_tok.all_special_ids]
    assert 0 < len(words) < len(base_tok)  # the mean is over ordinary tokens only
    torch.testing.assert_close(emb[-1], emb[words].mean(0))
    head = model.backbone.get_output_embeddings().weight
    torch.testing.assert_close(head[-1], head[words].mean(0))
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


# ---------------------------------------------------------------------- a real-format checkpoint

QWEN_ROWS = 151936  # Qwen2.5-VL-3B's embedding rows (151,669 tokens: ~270 spare rows)
QWEN_BASE_TOKENS = 151643  # ordinary BPE tokens; added tokens start at <|endoftext|>
QWEN_EOS = 151645  # <|im_end|>
QWEN_MASK = 151669  # the first free id: <|mask|> lands on a spare row


def _qwen_base_folder(path, *, tied: bool, legacy_template: bool = False):
    """A plain Hugging Face Qwen2.5-VL folder, tiny but with the real Qwen tokenizer and
    3B's embedding rows; no <|mask|>. `legacy_template`: the layout of the published
    checkpoints, Qwen's text template in tokenizer_config.json and Qwen2.5-VL's in the
    processor's chat_template.json; else Qwen2.5-VL's in chat_template.jinja."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = ModelConfig(
        hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64,
        mrope_section=(2, 3, 3), vision_hidden_size=32, vision_num_heads=2,
        vision_intermediate_size=64, vision_depth=1, tie_word_embeddings=tied,
        image_size=56, max_response_len=16, block_length=4,
    )
    config.validate()
    with_mask = qwen_tokenizer()
    with_mask.add_special_tokens({"mask_token": MASK_TOKEN})
    hf = hf_config(config, with_mask)
    hf.text_config.vocab_size = QWEN_ROWS
    torch.manual_seed(0)
    backbone = Qwen2_5_VLForConditionalGeneration(hf)
    backbone.save_pretrained(path)
    base = qwen_tokenizer(chat_template=False if legacy_template else QWEN2_5_VL_CHAT_TEMPLATE)
    base.save_pretrained(path)
    if legacy_template:
        jinja = path / "chat_template.jinja"
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
        tok_config["chat_template"] = jinja.read_text()
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
        jinja.unlink()
        (path / CHAT_TEMPLATE_JSON).write_text(
            json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
        )
    return config, backbone


@pytest.mark.parametrize("tied,legacy", [(False, True), (True, False)])
def test_qwen_checkpoint_mask_row_on_a_spare_row_chat_prompt_and_banned_ids(tmp_path, tied,
                                                                           legacy):
    config, base = _qwen_base_folder(tmp_path, tied=tied, legacy_template=legacy)
    model = load_pretrained(tmp_path, config)
    assert model.vocab_size == QWEN_ROWS  # no resize: <|mask|> took a spare row
    assert model.mask_token_id == QWEN_MASK == len(model.tokenizer) - 1
    assert model.eos_token_id == QWEN_EOS
    for name, before in (("embed", base.get_input_embeddings().weight),
                         ("head", base.get_output_embeddings().weight)):
        after = (model.backbone.get_input_embeddings() if name == "embed"
                 else model.backbone.get_output_embeddings()).weight
        torch.testing.assert_close(after[QWEN_MASK], before[:QWEN_BASE_TOKENS].mean(0))
        assert not torch.allclose(before[QWEN_MASK], after[QWEN_MASK])  # it was re-initialised
        others = torch.ones(QWEN_ROWS, dtype=torch.bool)
        others[QWEN_MASK] = False
        assert torch.equal(after[others], before[others]), name
    # the prompt is Qwen2.5-VL's chat template, as its processor renders it
    processor = qwen_processor(model.tokenizer, config.image_size)
    assert model.tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    expected = processor.apply_chat_template(
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (config.image_size,) * 2)},
            {"type": "text", "text": config.instruction}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"][0]
    assert model.prompt_ids.tolist() == list(expected)
    # banned: every added token (chat, vision, tool, think, mask, pad) and spare row, not eos
    banned = set(model.banned_token_ids.tolist())
    assert banned == set(range(QWEN_BASE_TOKENS, QWEN_ROWS)) - {QWEN_EOS}


def test_decoding_never_writes_a_banned_id(tmp_path):
    config, _ = _qwen_base_folder(tmp_path, tied=False)
    model = load_pretrained(tmp_path, config)
    with torch.no_grad():  # make the banned rows win every argmax they are allowed to
        model.backbone.lm_head.weight[model.banned_token_ids] *= 200
    pixel_values = model.preprocess_images(torch.rand(2, 56, 56, generator=torch.Generator()
                                                      .manual_seed(0)))
    banned = set(model.banned_token_ids.tolist())
    for mode in ("ar", "diffusion"):
        out = generate(model, pixel_values, mode=mode, max_new_tokens=8)
        for row, n in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True):
            assert not set(row[:n]) & banned, mode
    model.banned_token_ids = torch.empty(0, dtype=torch.long)  # the test can fail
    out = generate(model, pixel_values, mode="ar", max_new_tokens=8)
    assert set(out.tokens.flatten().tolist()) & banned


def test_report_tokenizer_bans_its_specials_but_eos():
    model = make_model()
    tok = model.tokenizer
    assert model.vocab_size == len(tok)  # no spare rows
    expected = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens} - {
        model.eos_token_id
    }
    assert set(model.banned_token_ids.tolist()) == expected
    assert {model.mask_token_id, model.pad_token_id, model.image_token_id} <= expected


def test_preprocessor_config_sets_normalisation_and_must_match_the_vision_tower(tmp_path):
    config, _ = _qwen_base_folder(tmp_path, tied=True)
    settings = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
                "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    (tmp_path / PREPROCESSOR_FILE).write_text(json.dumps(settings))
    model = load_pretrained(tmp_path, config)
    assert model.image_mean == (0.5,) * 3 and model.image_std == (0.25,) * 3
    px = model.preprocess_images(np.ones((1, 56, 56), np.float32))
    assert torch.allclose(px, torch.full_like(px, 2.0))  # (1 - 0.5) / 0.25
    (tmp_path / PREPROCESSOR_FILE).write_text(json.dumps({**settings, "patch_size": 16}))
    with pytest.raises(ValueError, match="patch_size=16 but the vision tower's config.json"):
        load_pretrained(tmp_path, config)


def test_saved_qwen_model_opens_in_hugging_face_and_loads_back_as_trained(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    config, _ = _qwen_base_folder(tmp_path / "base", tied=False, legacy_template=True)
    model = load_pretrained(tmp_path / "base", config)
    with torch.no_grad():  # "trained": a reload that re-initialised the mask row would show
        model.backbone.get_input_embeddings().weight[QWEN_MASK] += 1.0
    out = save_checkpoint(model, tmp_path / "saved", EchoConfig(model=config))
    check_hf_model_folder(tmp_path / "base")  # the CLI's up-front check passes both
    check_hf_model_folder(out)
    assert (out / "chat_template.jinja").read_text() == QWEN2_5_VL_CHAT_TEMPLATE
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key
    # what AutoProcessor assembles: the image processor and the tokenizer with its template
    tokenizer = AutoTokenizer.from_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(out)
    assert tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    assert tokenizer.mask_token_id == QWEN_MASK
    processor = qwen_processor(tokenizer, config.image_size)
    processor.image_processor = image_processor
    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    encoded = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                      {"type": "text", "text": config.instruction}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    assert encoded["input_ids"][0].tolist() == model.prompt_ids.tolist()
    ours = model.preprocess_images(torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0)
    torch.testing.assert_close(encoded["pixel_values"].float(), ours, atol=1e-5, rtol=1e-5)
    loaded, _ = load_checkpoint(out)
    assert torch.equal(loaded.backbone.get_input_embeddings().weight,
                       model.backbone.get_input_embeddings().weight)  # mask row kept
    assert torch.equal(loaded.prompt_ids, model.prompt_ids)
    assert torch.equal(loaded.banned_token_ids, model.banned_token_ids)
