"""The dVLM on a CUDA device: the sampler's equalities in fp32 there, and the product's
placement (bf16) end to end. Skipped without a GPU; needs no Ray, so a lent GPU machine runs
it with `pytest tests/test_gpu.py`."""

import math

import numpy as np
import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, trained_model

from echo_ray.decode.predictor import ReportGenerator, place_model
from echo_ray.decode.sampler import generate
from echo_ray.diffusion.losses import build_layout
from echo_ray.model.checkpoint import save_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def fp32_model():
    # fp32 without TF32 (torch's default for matmuls): the decoders must agree exactly.
    assert not torch.backends.cuda.matmul.allow_tf32
    return trained_model().to("cuda")


@pytest.fixture(scope="module")
def pixel_values(fp32_model):
    images = torch.rand(4, 112, 112, generator=torch.Generator().manual_seed(0))
    return fp32_model.preprocess_images(images)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_new", [8, 13, 48])
def test_fused_equals_unfused_equals_uncached_on_cuda(fp32_model, pixel_values, batch, max_new):
    px = pixel_values[: batch * fp32_model.num_patches]
    fused = generate(fp32_model, px, steps=1, max_new_tokens=max_new)
    assert fused.tokens.device.type == "cuda"
    for other in (
        generate(fp32_model, px, steps=1, fused=False, max_new_tokens=max_new),
        generate(fp32_model, px, steps=1, use_cache=False, max_new_tokens=max_new),
    ):
        assert torch.equal(fused.tokens, other.tokens)
        assert torch.equal(fused.lengths, other.lengths)


@pytest.mark.parametrize("batch", [1, 3])
def test_ar_with_cache_equals_ar_without_on_cuda(fp32_model, pixel_values, batch):
    px = pixel_values[: batch * fp32_model.num_patches]
    cached = generate(fp32_model, px, mode="ar", max_new_tokens=21)
    uncached = generate(fp32_model, px, mode="ar", use_cache=False, max_new_tokens=21)
    assert torch.equal(cached.tokens, uncached.tokens)


@pytest.mark.parametrize("layout", ["causal", "block", "rad"])
def test_cuda_logits_match_cpu_logits(fp32_model, layout):
    cpu = trained_model()
    pixel_values, response, valid = make_batch(cpu)
    noisy = response.masked_fill(torch.rand(response.shape) < 0.5, cpu.mask_token_id)
    logits = []
    for model in (cpu, fp32_model):
        lay = build_layout(model, response, valid, layout, noisy=noisy)
        with torch.no_grad():
            logits.append(model(
                lay.input_ids,
                attention_mask=lay.attention_mask,
                position_ids=lay.position_ids,
                image_embeds=model.encode_images(pixel_values.to(model.device)),
                logits_from=lay.logits_from,
            ).cpu())
    assert torch.allclose(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_bf16_report_generator_times_the_device_and_counts_forwards(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(make_model(), tmp_path / "run")
    generator = ReportGenerator.from_checkpoint(tmp_path / "run", max_new_tokens=21).to("cuda")
    assert generator.model.dtype == torch.bfloat16 and generator.model.device.type == "cuda"
    images = np.random.default_rng(0).random((3, 112, 112))
    reports = generator.generate(images)
    assert len(reports) == 3
    for r in reports:
        assert "<|" not in r["report"]
        assert r["num_forwards"] <= math.ceil(21 / generator.model.block_length)
    # ignore_eos: every row runs to the end, exactly one forward per block (block 0's is the
    # prefill)
    model = place_model(make_model(), "cuda")
    px = model.preprocess_images(torch.from_numpy(images).float())
    out = generate(model, px, steps=1, max_new_tokens=21, ignore_eos=True)
    assert out.num_forwards == math.ceil(21 / model.block_length)
    assert (out.tokens != model.mask_token_id).all()
    # the clock waits for the device: the prefill is part of the total, and both are real
    assert 0 < out.prefill_seconds < out.total_seconds
