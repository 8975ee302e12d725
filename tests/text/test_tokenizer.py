import pytest

from echo_ray.text.tokenizer import (
    MASK_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_report_tokenizer,
)

REPORTS = [
    "FINDINGS: The lungs are clear. Heart size is normal. No pleural effusion. "
    "IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Moderate left pleural effusion with adjacent atelectasis. Mild cardiomegaly. "
    "IMPRESSION: Moderate left effusion.",
    "FINDINGS: Endotracheal tube terminates 4.5 cm above the carina. No pneumothorax. "
    "IMPRESSION: Lines and tubes as described.",
] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_report_tokenizer(REPORTS, vocab_size=400), path)
    return load_tokenizer(path)


def test_special_tokens_are_single_distinct_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tokenizer.mask_token == MASK_TOKEN
    assert tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer(f"a {MASK_TOKEN} b")["input_ids"].count(tokenizer.mask_token_id) == 1


@pytest.mark.parametrize(
    "text",
    [
        REPORTS[1],
        "Right IJ line tip at the cavoatrial junction; 1.2 cm nodule (RUL).",
        "Ünïcode and   spaces\nand newlines — kept exactly.",
    ],
)
def test_any_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_bpe_learns_the_domain(tokenizer):
    # Frequent report words become few tokens, far fewer than bytes.
    text = REPORTS[0]
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 3


def test_loading_a_tokenizer_without_specials_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"lacks special token\(s\).*<\|mask\|>"):
        load_tokenizer(tmp_path)
