import numpy as np
import pytest
import torch
from helpers.tiny_dvlm import make_model, trained_model

from echo_ray.config.schema import DECODING_MODES, DecodingConfig
from echo_ray.decode.predictor import ReportGenerator, ReportScorer
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.synth.dicom_writer import write_dicom
from echo_ray.text.labels import CHEXPERT_LABELS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return trained_model()


def _dicom(seed: int, **attrs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (150, 130), dtype=np.uint16)
    return write_dicom(pixels, attrs={"Modality": "DX", "PatientName": "Doe^Jane", **attrs})


def test_images_in_reports_out(model):
    images = [np.random.default_rng(i).random((100 + 10 * i, 120)) for i in range(3)]
    reports = ReportGenerator(model, model_id="tiny", max_new_tokens=24).generate(images)
    assert len(reports) == 3
    for r in reports:
        assert r["model_id"] == "tiny" and r["decoding"] == "one-step-fused"
        assert set(r["labels"]) == set(CHEXPERT_LABELS)
        assert r["study_instance_uid"] is None and "patient_name" not in r
        assert r["num_tokens"] <= 24 and r["num_forwards"] >= 2
        assert "<|" not in r["report"]  # no special token leaks into the text
        assert r["findings"] or r["impression"] or not r["report"]


def test_the_decoding_mode_is_configurable(model):
    images = np.random.default_rng(0).random((2, 112, 112))
    forwards = {}
    for mode in DECODING_MODES:
        gen = ReportGenerator(model, decoding=mode, max_new_tokens=16)
        reports = gen.generate(images)
        assert all(r["decoding"] == mode for r in reports)
        forwards[mode] = reports[0]["num_forwards"]
    assert forwards["one-step-fused"] < forwards["one-step"] < forwards["ar"]
    with pytest.raises(ValueError, match="unknown decoding mode 'beam'"):
        ReportGenerator(model, decoding="beam")


def test_dicom_in_order_with_errors_in_place_and_no_phi(model):
    blobs = [_dicom(0), b"not a dicom file at all", _dicom(1, Modality="CT")]
    out = ReportGenerator(model, max_new_tokens=16).generate_dicom(blobs)
    assert out[1]["error"] == "not_dicom" and out[2]["error"] == "non_radiograph_modality"
    assert out[0]["sop_instance_uid"] and out[0]["study_instance_uid"]
    assert "Doe" not in repr(out)
    with_phi = ReportGenerator(model, include_phi=True, max_new_tokens=8).generate_dicom(blobs)
    assert "Doe" in str(with_phi[0]["patient_name"])


def test_same_report_for_an_image_and_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = make_model()
    save_checkpoint(model, tmp_path / "run")
    image = np.random.default_rng(3).random((1, 112, 112))
    a = ReportGenerator(model, max_new_tokens=16).generate(image)[0]
    b = ReportGenerator.from_checkpoint(tmp_path / "run", max_new_tokens=16).generate(image)[0]
    assert a["report"] == b["report"] and b["model_id"] == "run"


def test_scorer_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    # Zero output weights give every id the same logit: each token costs ln V nats, so the
    # perplexity is exactly V, whatever the report or the image.
    model = make_model()
    with torch.no_grad():
        model.backbone.lm_head.weight.zero_()
    scorer = ReportScorer(model)
    images = np.random.default_rng(0).random((2, 40, 40))
    nll, counts = scorer.nll(images, ["The heart size is normal.", ""])
    ids = model.tokenizer("The heart size is normal.", add_special_tokens=False)["input_ids"]
    assert counts == [len(ids) + 1, 1]  # the report's tokens and <eos>; an empty one: <eos>
    assert nll == pytest.approx([c * np.log(model.vocab_size) for c in counts], rel=1e-5)


def test_scorer_nll_is_the_ar_training_loss(model):
    # The trained tiny model: the mean of the per-report NLLs equals the AR objective.
    from helpers.tiny_dvlm import REPORTS

    from echo_ray.diffusion.losses import compute_ar_loss
    from echo_ray.diffusion.noise import pad_responses

    images = np.random.default_rng(1).random((3, model.config.image_size, model.config.image_size))
    nll, counts = ReportScorer(model).nll(images, REPORTS[:3])
    ids = [model.tokenizer(r, add_special_tokens=False)["input_ids"] for r in REPORTS[:3]]
    response, valid = pad_responses(ids, block_length=1, max_len=model.config.max_response_len,
                                    eos_token_id=model.eos_token_id,
                                    pad_token_id=model.pad_token_id)
    pixel_values = torch.cat([model.preprocess_images(img[None]) for img in images])
    with torch.no_grad():
        loss = compute_ar_loss(model, pixel_values, response, valid)
    assert sum(nll) / sum(counts) == pytest.approx(float(loss), rel=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        ReportScorer(model).nll(images, REPORTS[:2])


# ------------------------------------------------------ sentences and their confidence


def test_each_sentence_gets_the_geometric_mean_of_its_tokens_confidence(model):
    """A report with a doubtful second sentence: only it is flagged, and each sentence's
    confidence is the geometric mean of the commit probabilities of its own tokens."""
    gen = ReportGenerator(model, low_confidence=0.5)
    text = ("FINDINGS: The lungs are clear. There is a small left pleural effusion. "
            "IMPRESSION: Small effusion.")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    second = text.index("There")
    prefix_lengths = [len(model.tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    doubtful = [i for i, end in enumerate(prefix_lengths)
                if second < end <= text.index("IMPRESSION")]
    confidence = [0.9] * len(ids)
    for i in doubtful:
        confidence[i] = 0.2
    sentences = gen._sentences(ids, confidence, text)
    assert [(s["section"], s["text"]) for s in sentences] == [
        ("findings", "The lungs are clear."),
        ("findings", "There is a small left pleural effusion."),
        ("impression", "Small effusion."),
    ]
    assert [s["low_confidence"] for s in sentences] == [False, True, False]
    assert sentences[0]["confidence"] == pytest.approx(0.9, abs=1e-3)
    assert sentences[2]["confidence"] == pytest.approx(0.9, abs=1e-3)
    # the doubtful tokens, plus at most the one token that straddles the sentence boundary
    assert 0.2 <= sentences[1]["confidence"] < 0.25


def test_reports_carry_sentences_in_report_order(model):
    reports = ReportGenerator(model, max_new_tokens=32).generate(
        np.random.default_rng(5).random((2, 112, 112))
    )
    for r in reports:
        for s in r["sentences"]:
            assert s["text"] in " ".join(r["report"].split())
            assert 0.0 < s["confidence"] <= 1.0
            assert s["low_confidence"] == (s["confidence"] < 0.5)


def test_a_checkpoint_offers_the_modes_its_stage_was_trained_for(tmp_path):
    from echo_ray.config.overrides import apply_overrides
    from echo_ray.config.presets import preset

    torch.manual_seed(0)
    model = make_model()
    expected = {"ar": ("ar",), "rad": ("multi-step",), "dcd": ("one-step-fused", "one-step")}
    for stage, modes in expected.items():
        config = apply_overrides(preset("tiny"), [f"train.stage={stage}"])
        save_checkpoint(model, tmp_path / stage, config)
        generator = ReportGenerator.from_checkpoint(tmp_path / stage)
        assert generator.trained_modes == modes
        # by default it decodes as it was trained (an AR model forced to one step per block
        # writes word salad)
        assert generator.decoding == modes[0]
        assert ReportGenerator.from_checkpoint(tmp_path / stage, decoding="one-step"
                                               ).decoding == "one-step"
    save_checkpoint(model, tmp_path / "old")  # a checkpoint that records no stage
    old = ReportGenerator.from_checkpoint(tmp_path / "old")
    assert old.trained_modes == DECODING_MODES and old.decoding == DecodingConfig.mode
    # a vision pre-training checkpoint has an untrained language model: no mode at all
    save_checkpoint(model, tmp_path / "vision",
                    apply_overrides(preset("tiny"), ["train.stage=vision"]))
    with pytest.raises(ValueError, match=r"`--stage vision` \(vision pre-training\) writes no"):
        ReportGenerator.from_checkpoint(tmp_path / "vision")


def test_sentence_offsets_hold_when_a_token_is_part_of_a_character(model):
    """Byte-level tokens can split a character ("é", "→"): token texts then do not join
    into the report's, and the offsets come from decoding prefixes instead."""
    gen = ReportGenerator(model)
    text = "FINDINGS: Café-au-lait → no effusion. Heart normal. IMPRESSION: Normal."
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [model.tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) != model.tokenizer.decode(ids)  # the fallback path is exercised
    whole = model.tokenizer.decode(ids)
    expected = [len(model.tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    assert gen._prefix_lengths(ids, whole) == expected
    sentences = gen._sentences(ids, [0.8] * len(ids), text)
    assert [s["text"] for s in sentences] == [
        "Café-au-lait → no effusion.", "Heart normal.", "Normal."]
    assert all(s["confidence"] == pytest.approx(0.8, abs=1e-3) for s in sentences)
