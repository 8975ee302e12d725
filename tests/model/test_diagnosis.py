"""Diagnosis tokens (`model/diagnosis.py`): the prompt's 14 finding slots, filled from the
label head or from given decisions, saved and loaded with the checkpoint."""

import json

import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, make_tokenizer

from echo_ray.config.schema import ConfigError, ModelConfig
from echo_ray.diffusion.losses import compute_ar_loss, compute_rad_loss
from echo_ray.model.checkpoint import load_checkpoint, save_checkpoint
from echo_ray.model.diagnosis import DIAGNOSIS_FILE, NUM_LABELS, with_diagnosis_slots
from echo_ray.model.hf import build_model, load_pretrained
from echo_ray.text.tokenizer import VIDEO_PAD_TOKEN, VISION_END_TOKEN
from echo_ray.train.objectives import Objective, set_up_for_training

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer, diagnosis_prompt=True)


def test_the_prompt_holds_one_slot_per_label_after_the_image_at_text_positions(model, tokenizer):
    plain = make_model(tokenizer)
    n = model.num_image_tokens
    ids = model.prompt_ids.tolist()
    slot = tokenizer.convert_tokens_to_ids(VIDEO_PAD_TOKEN)
    end = ids.index(tokenizer.convert_tokens_to_ids(VISION_END_TOKEN))
    assert ids[end + 1 : end + 1 + NUM_LABELS] == [slot] * NUM_LABELS
    assert ids.count(slot) == NUM_LABELS
    assert model.prompt_length == plain.prompt_length + NUM_LABELS
    assert model.num_prompt_slots == n + NUM_LABELS
    # image tokens keep their 2D grid positions; the slots and the instruction are text
    pos = model.prompt_position_ids[:, 0]  # (3, P)
    assert torch.equal(pos[:, : end + 1], plain.prompt_position_ids[0:3, 0, : end + 1])
    text = pos[:, end + 1 :]
    assert torch.equal(text[0], text[1]) and torch.equal(text[0], text[2])
    steps = text[0].diff()
    assert bool((steps == 1).all())
    assert model.response_position_start == plain.response_position_start + NUM_LABELS


def test_a_qwen_checkpoints_chat_template_prompt_gets_its_slots_after_the_image(
    tmp_path_factory,
):
    """A real-format Qwen2.5-VL folder (the Qwen tokenizer and chat template): the slots
    are its `<|video_pad|>`, right after `<|vision_end|>`, before the instruction's turn."""
    from helpers.qwen_folder import cached_qwen_hf_folder

    folder = cached_qwen_hf_folder(tmp_path_factory, variant="3b", image_size=56)
    plain = load_pretrained(folder, ModelConfig(pretrained_path=str(folder), image_size=56))
    model = load_pretrained(folder, ModelConfig(pretrained_path=str(folder), image_size=56,
                                                diagnosis_prompt=True))
    end, slot = (model.tokenizer.convert_tokens_to_ids(t)
                 for t in (VISION_END_TOKEN, VIDEO_PAD_TOKEN))
    assert slot != model.tokenizer.unk_token_id
    at = plain.prompt_ids.tolist().index(end) + 1
    assert model.prompt_ids.tolist() == (plain.prompt_ids.tolist()[:at] + [slot] * NUM_LABELS
                                         + plain.prompt_ids.tolist()[at:])
    pixel_values = model.preprocess_images(torch.rand(1, 56, 56))
    prompt = model.prompt_input_ids(1)
    logits = model(prompt, attention_mask="causal", position_ids=model.prompt_position_ids,
                   image_embeds=model.encode_images(pixel_values), logits_from=-1)
    assert logits.shape == (1, 1, model.vocab_size)
    with pytest.raises(ValueError, match="vision_end"):
        with_diagnosis_slots([1, 99, 99], 99, 7, 3)


def test_slots_carry_the_given_decisions_else_the_heads(model):
    pixel_values, _, _ = make_batch(model, num=3)
    feats = model.image_features(pixel_values)  # (3, T, H)
    yes = torch.ones(3, NUM_LABELS, dtype=torch.bool)
    embeds = model.encode_images(pixel_values, yes)
    assert embeds.shape == (3, model.num_prompt_slots, model.hidden_size)
    assert torch.equal(embeds[:, : model.num_image_tokens], feats)
    assert torch.equal(embeds[0, model.num_image_tokens :], model.diagnosis.decisions[1])
    no = torch.zeros(3, NUM_LABELS, dtype=torch.bool)
    assert torch.equal(model.encode_images(pixel_values, no)[2, -NUM_LABELS:],
                       model.diagnosis.decisions[0])
    mixed = no.clone()
    mixed[1, 4] = True
    row = model.encode_images(pixel_values, mixed)[1, model.num_image_tokens :]
    assert torch.equal(row[4], model.diagnosis.decisions[1, 4])
    assert torch.equal(row[5], model.diagnosis.decisions[0, 5])
    # default: the head's own calls at the threshold
    head = model.findings(pixel_values)
    assert head.shape == (3, NUM_LABELS) and bool(((head >= 0) & (head <= 1)).all())
    assert torch.equal(model.encode_images(pixel_values), model.encode_images(pixel_values,
                                                                              head >= 0.5))
    with pytest.raises(ValueError, match=r"decisions must be \(N, 14\)"):
        model.encode_images(pixel_values, yes[:, :5])


def test_the_language_model_reads_the_slots(model):
    """Flipping one decision changes the report's loss: the slots reach the language model,
    in both the AR and the RAD (full-copy layout too) forwards."""
    pixel_values, response, valid = make_batch(model, num=2)
    no = torch.zeros(2, NUM_LABELS, dtype=torch.bool)
    flip = no.clone()
    flip[:, 10] = True
    with torch.no_grad():
        ar = [compute_ar_loss(model, pixel_values, response, valid, decisions=d)
              for d in (no, flip)]
        for layout in ("rad", "full_copy"):
            rad = [
                compute_rad_loss(model, pixel_values, response, valid, layout=layout,
                                 decisions=d, generator=torch.Generator().manual_seed(0))[0]
                for d in (no, flip)
            ]
            assert float(rad[0]) != float(rad[1])
    assert float(ar[0]) != float(ar[1])


def test_a_plain_model_has_no_slots_and_refuses_nothing(tokenizer):
    plain = make_model(tokenizer)
    pixel_values, _, _ = make_batch(plain, num=2)
    assert plain.diagnosis is None and plain.findings(pixel_values) is None
    assert plain.encode_images(pixel_values).shape[1] == plain.num_image_tokens
    assert plain.num_prompt_slots == plain.num_image_tokens


def test_the_threshold_is_validated():
    with pytest.raises(ConfigError, match="diagnosis_threshold"):
        ModelConfig(diagnosis_prompt=True, diagnosis_threshold=1.0).validate()
    ModelConfig(diagnosis_prompt=True, diagnosis_threshold=0.3).validate()


def test_the_checkpoint_keeps_head_and_embeddings_and_a_lost_file_is_refused(model, tmp_path):
    with torch.no_grad():
        model.diagnosis.decisions.add_(1.0)  # not the seeded initial values
        model.diagnosis.head.proj.bias.fill_(0.25)
    save_checkpoint(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / DIAGNOSIS_FILE).is_file()
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert config.model.diagnosis_prompt
    for a, b in zip(model.diagnosis.state_dict().values(),
                    loaded.diagnosis.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded.prompt_ids, model.prompt_ids)
    (tmp_path / "ckpt" / DIAGNOSIS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="diagnosis tokens"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_folder_without_them_starts_them_fresh(tokenizer, tmp_path):
    """A checkpoint saved without diagnosis tokens, loaded with them switched on (the
    vision stage on a plain tower), gets the seeded fresh head and embeddings."""
    save_checkpoint(make_model(tokenizer), tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "echo_config.json").read_text())
    assert not config["model"]["diagnosis_prompt"]
    model, _ = load_checkpoint(tmp_path / "plain", ["model.diagnosis_prompt=true"])
    fresh = make_model(tokenizer, diagnosis_prompt=True)
    assert torch.equal(model.diagnosis.decisions, fresh.diagnosis.decisions)


def test_each_stage_trains_only_its_own_half(tokenizer):
    """The vision stage trains the head (on the image features) and not the embeddings; AR
    and RAD train the embeddings (from the labels) and not the head."""
    model = make_model(tokenizer, diagnosis_prompt=True)
    pixel_values, response, valid = make_batch(model, num=2)
    labels = torch.full((2, NUM_LABELS), float("nan"))
    labels[0, 3], labels[1, 3], labels[1, 8] = 1.0, 0.0, -1.0
    set_up_for_training(model, freeze_vision=False, gradient_checkpointing=False,
                        freeze_language=True)
    vision = Objective(model, "vision")
    assert vision.label_head is model.diagnosis.head
    vision(pixel_values, response, valid, labels=labels).backward()
    assert model.diagnosis.head.proj.weight.grad is not None
    assert model.diagnosis.decisions.grad is None and not model.diagnosis.decisions.requires_grad
    model.zero_grad(set_to_none=True)
    set_up_for_training(model, freeze_vision=True, gradient_checkpointing=False)
    assert not model.diagnosis.head.proj.weight.requires_grad
    Objective(model, "ar")(pixel_values, response, valid, labels=labels).backward()
    grad = model.diagnosis.decisions.grad  # (2, 14, H)
    assert grad is not None
    # row 0 says label 3 present (1.0), row 1 absent (0.0), row 1's uncertain label 8 absent
    assert grad[1, 3].abs().sum() > 0 and grad[0, 3].abs().sum() > 0
    assert grad[1, 8].abs().sum() == 0 and grad[0, 8].abs().sum() > 0
    assert model.diagnosis.head.proj.weight.grad is None


def test_build_model_seeds_the_same_head_for_every_worker(tokenizer):
    config = ModelConfig(max_response_len=48, instruction="Report:", diagnosis_prompt=True)
    a, b = build_model(config, tokenizer), build_model(config, tokenizer)
    assert torch.equal(a.diagnosis.head.proj.weight, b.diagnosis.head.proj.weight)
    assert torch.equal(a.diagnosis.decisions, b.diagnosis.decisions)
