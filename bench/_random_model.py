"""The benches' model when no checkpoint is given: a preset's shapes, randomly initialised,
on a report tokenizer trained on synthetic reports (the work per token is the real one)."""

from __future__ import annotations

import torch

from echo_ray.config.schema import EchoConfig
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.model.hf import build_model
from echo_ray.synth.report import write_report
from echo_ray.synth.sampling import sample_study
from echo_ray.text.tokenizer import train_report_tokenizer


def random_model(config: EchoConfig, num_reports: int, device: str = "cpu") -> EchoDVLM:
    """A randomly initialised model of `config.model`, built and initialised on `device` (a
    7B model is initialised on a GPU in seconds, on the CPU in minutes)."""
    reports = [write_report(sample_study(0, i)) for i in range(num_reports)]
    tokenizer = train_report_tokenizer(reports, vocab_size=config.tokenizer.vocab_size)
    with torch.device(device):
        return build_model(config.model, tokenizer)
