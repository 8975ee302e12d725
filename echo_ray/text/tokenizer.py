"""The report tokenizer: byte-level BPE trained on normalized training reports.

Saved as a Hugging Face fast-tokenizer directory so `AutoTokenizer.from_pretrained(path)`
(the loading code real checkpoints use) loads it unchanged. Special tokens include the
diffusion `<|mask|>` token from the start, so a model built on this tokenizer never needs
`resize_token_embeddings` for it (docs/ARCHITECTURE.md section 5.9: resizing a tied tiny model broke
backward), and the Qwen2.5-VL vision placeholders, so the tiny model uses the real
Qwen2.5-VL prompt layout.

Importing this module is cheap (no torch, no transformers): the CLI's up-front checks use
its token names.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
BOS_TOKEN = "<|bos|>"
UNK_TOKEN = "<|unk|>"
MASK_TOKEN = "<|mask|>"
# Qwen2.5-VL's image placeholder tokens (the model config refers to them by id).
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
VIDEO_PAD_TOKEN = "<|video_pad|>"
# The diagnosis slots of the prompt (`model/diagnosis.py`): Qwen2.5-VL's video placeholder,
# which every Qwen2.5-VL tokenizer has and an image-only prompt never uses.
DIAGNOSIS_SLOT_TOKEN = VIDEO_PAD_TOKEN

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    EOS_TOKEN,
    BOS_TOKEN,
    UNK_TOKEN,
    MASK_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    IMAGE_PAD_TOKEN,
    VIDEO_PAD_TOKEN,
)


def train_report_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 2048, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on report texts.

    Byte-level: any text round-trips exactly (no unknown characters), which a report
    generator needs for names of devices, measurements and punctuation alike.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[
            VISION_START_TOKEN,
            VISION_END_TOKEN,
            IMAGE_PAD_TOKEN,
            VIDEO_PAD_TOKEN,
        ],
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Write a Hugging Face tokenizer directory."""
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory and check it has every special token echo-ray needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"tokenizer at {path} lacks special token(s) {missing}; train one with "
            "`echo-ray prepare` or add them before building a model"
        )
    return tokenizer
