import json

import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, make_tokenizer

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig, ModelConfig
from echo_ray.decode.sampler import generate
from echo_ray.diffusion.losses import build_layout
from echo_ray.model.checkpoint import CONFIG_FILE, load_checkpoint, load_config, save_checkpoint
from echo_ray.model.folder import PREPROCESSOR_FILE
from echo_ray.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def _logits(model, pixel_values, response, valid):
    lay = build_layout(model, response, valid, "block")
    with torch.no_grad():
        return model(
            lay.input_ids,
            attention_mask=lay.attention_mask,
            position_ids=lay.position_ids,
            image_embeds=model.encode_images(pixel_values),
        )


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_is_bit_identical(tmp_path, tied):
    torch.manual_seed(0)
    model = make_model(make_tokenizer(), tie_word_embeddings=tied, block_length=4)
    with torch.no_grad():  # not the init any more: a load that re-initialises would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    config = apply_overrides(EchoConfig.from_name("tiny"), ["data.max_dimension=4096"])
    config.model = model.config
    save_checkpoint(model, tmp_path, config)

    loaded, loaded_config = load_checkpoint(tmp_path)
    assert loaded_config.model.pretrained_path == str(tmp_path)
    loaded_config.model.pretrained_path = None
    assert loaded_config == config
    assert loaded.config.block_length == 4
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (loaded.backbone.lm_head.weight is loaded.backbone.get_input_embeddings().weight) == (
        tied
    )
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.mask_token_id == model.mask_token_id
    assert torch.equal(loaded.prompt_ids, model.prompt_ids)
    assert torch.equal(loaded.prompt_position_ids, model.prompt_position_ids)
    batch = make_batch(model, num=2)
    assert torch.equal(_logits(model, *batch), _logits(loaded, *batch))
    px = batch[0]
    assert torch.equal(generate(model, px).tokens, generate(loaded, px).tokens)


def test_checkpoint_directory_is_a_plain_hf_directory(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = make_model()
    save_checkpoint(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["model"]["pretrained_path"] is None
    assert load_config(tmp_path).model == model.config
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(hf.lm_head.weight, model.backbone.lm_head.weight)
    assert AutoTokenizer.from_pretrained(tmp_path).mask_token_id == model.mask_token_id
    assert load_tokenizer(tmp_path).get_vocab() == model.tokenizer.get_vocab()


def test_load_applies_overrides_and_rejects_non_checkpoints(tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path / "run")
    loaded, config = load_checkpoint(tmp_path / "run", ["model.block_length=4"])
    assert config.model.block_length == 4 and loaded.block_length == 4
    with pytest.raises(FileNotFoundError, match="not an echo-ray checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_saved_folder_has_the_image_processor_of_the_fixed_grid(tmp_path):
    """preprocessor_config.json: Hugging Face's Qwen2-VL image processor, read back from the
    folder, turns an image of the model's size into exactly the model's pixel_values."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    model = make_model(image_size=56)
    save_checkpoint(model, tmp_path)
    assert "echo_ray" not in (tmp_path / "config.json").read_text()  # no runtime attention
    settings = json.loads((tmp_path / PREPROCESSOR_FILE).read_text())
    assert settings["min_pixels"] == settings["max_pixels"] == 56 * 56
    assert settings["image_processor_type"] == "Qwen2VLImageProcessor"
    processor = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    out = processor(images=[Image.fromarray(image)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == model.image_grid_thw.tolist()
    ours = model.preprocess_images(torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0)
    torch.testing.assert_close(out["pixel_values"].float(), ours, atol=1e-5, rtol=1e-5)
    loaded, _ = load_checkpoint(tmp_path)
    assert (loaded.image_mean, loaded.image_std) == (model.image_mean, model.image_std)


def test_saved_folder_opens_with_auto_processor(tmp_path):
    """transformers builds Qwen2.5-VL's video processor only with torchvision (no wheel for
    the CPU build of torch): runs where torchvision imports."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    model = make_model()
    save_checkpoint(model, tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    size = model.config.image_size**2
    assert processor.image_processor.size["longest_edge"] == size
    assert processor.tokenizer.get_vocab() == model.tokenizer.get_vocab()


def test_a_plain_hugging_face_folder_loads_zero_shot(tmp_path):
    """No echo_config.json: the model section passed (or the default one), then overrides."""
    model = make_model()
    save_checkpoint(model, tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not an echo-ray checkpoint"):
        load_config(tmp_path)
    loaded, config = load_checkpoint(
        tmp_path, ["decoding.steps=2"], plain_model=ModelConfig(image_size=56, block_length=4)
    )
    assert config.model.image_size == loaded.config.image_size == 56
    assert loaded.num_image_tokens == 4 and config.decoding.steps == 2
    assert config.train.stage is None and config.model.pretrained_path == str(tmp_path)
    assert torch.equal(loaded.backbone.lm_head.weight, model.backbone.lm_head.weight)
    _, default = load_checkpoint(tmp_path)
    assert default.model.image_size == ModelConfig().image_size
