"""The AR and RAD objectives: losses on logits, the layouts through the model, and the
model-level losses (`compute_rad_loss`, `compute_ar_loss`, `ar_report_nll`).

Shapes: B batch, P prompt length (image tokens + instruction), L response length (padded to
a multiple of the diffusion block length `block_length`), T sequence length, V vocabulary.

Every model-level loss takes `attention`: "dense" builds the `(B, 1, T, T)` bool mask of the
layout (SDPA with a mask: any device, the reference); "flex" passes no dense mask: "causal"
(plain causal SDPA, flash kernels, no repeated K/V) for the AR layout and the layout's
flex-attention `BlockMask` for the others. Both give the same losses (tested); flex
attention trains only on GPU (torch has no flex backward on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from echo_ray.diffusion.masks import LAYOUTS, attention_mask, flex_block_mask
from echo_ray.diffusion.noise import Noised, noise_response
from echo_ray.model.attention import CAUSAL
from echo_ray.model.dvlm import EchoDVLM

# The `attention` argument of the model-level losses (module docstring).
ATTENTIONS = ("dense", "flex")

# ---------------------------------------------------------------------- losses


def rad_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    ratio: torch.Tensor,
    valid: torch.Tensor,
    weighting: str = "elbo",
) -> torch.Tensor:
    """Masked-token cross-entropy of the noisy copy (no shift: position i predicts token i).

    Args:
        logits: `(B, L, V)` at the xt positions.
        targets: `(B, L)` clean tokens x0.
        masked: `(B, L)` which xt positions were masked (only these are scored).
        ratio: `(B, L)` the mask ratio t of each position's block.
        valid: `(B, L)` non-pad positions.
        weighting: "elbo": sum over masked positions of CE / t, divided by the number of
            valid tokens (the masked-diffusion ELBO, as LLaDA); "mean": plain mean over
            masked positions.

    Returns:
        A scalar; 0 (with a graph) when nothing is masked.
    """
    B, L, V = logits.shape
    ce = F.cross_entropy(
        logits.reshape(B * L, V).float(), targets.reshape(B * L), reduction="none"
    ).view(B, L)  # (B, L)
    ce = torch.where(masked, ce, torch.zeros_like(ce))  # unmasked positions: no gradient
    if weighting == "elbo":
        return (ce / ratio.clamp(min=1e-6)).sum() / valid.sum().clamp(min=1)
    if weighting == "mean":
        return ce.sum() / masked.sum().clamp(min=1)
    raise ValueError(f"unknown weighting {weighting!r}; choose 'elbo' or 'mean'")


def ar_loss(
    logits: torch.Tensor, response: torch.Tensor, valid: torch.Tensor, eos_token_id: int
) -> torch.Tensor:
    """Shifted next-token cross-entropy of the response, up to and including its first eos.

    Args:
        logits: `(B, L, V)` at positions P-1 .. P+L-2 (the last prompt token predicts
            response[0]; response[i-1] predicts response[i]).
        response: `(B, L)` targets.
        valid: `(B, L)` non-pad positions.
    """
    ce, scored = _ar_token_ce(logits, response, valid, eos_token_id)
    return ce.sum() / scored.sum().clamp(min=1)


def _ar_token_ce(
    logits: torch.Tensor, response: torch.Tensor, valid: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token CE `(B, L)` (0 where not scored) and the scored mask `(B, L)`."""
    B, L, V = logits.shape
    is_eos = response == eos_token_id  # (B, L)
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (B, L) strictly after 1st eos
    scored = valid.bool() & ~after_eos  # (B, L)
    ce = F.cross_entropy(
        logits.reshape(B * L, V).float(), response.reshape(B * L), reduction="none"
    ).view(B, L)  # (B, L)
    return torch.where(scored, ce, torch.zeros_like(ce)), scored


# ---------------------------------------------------------------------- layouts through the model


@dataclass
class Layout:
    """Model inputs of one layout. `logits_from` is where the scored positions start."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | BlockMask | str  # (B, 1, T, T) bool, BlockMask or "causal"
    position_ids: torch.Tensor  # (3, 1, T)
    logits_from: int


def build_layout(
    model: EchoDVLM,
    response: torch.Tensor,
    valid: torch.Tensor,
    layout: str,
    noisy: torch.Tensor | None = None,
    attention: str = "dense",
) -> Layout:
    """Input ids, mask and M-RoPE positions of `layout` for a batch of responses.

    Both response copies of "rad"/"full_copy" use the same positions (the noisy copy reuses
    the clean copy's); the second prompt of "full_copy" reuses the prompt's.

    Args:
        response: `(B, L)` clean tokens.
        valid: `(B, L)`, pads at the end of a row (as `pad_responses` makes them).
        noisy: `(B, L)` the noisy copy xt ("rad" and "full_copy").
        attention: "dense": `attention_mask` of the layout; "flex": "causal" for the
            "causal" layout (no mask: a valid row never sees the pads after it; pad rows
            see earlier pads, which changes only their own, never scored, logits), else
            `flex_block_mask` of the layout.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTIONS}")
    B, L = response.shape
    device = model.device
    prompt = model.prompt_input_ids(B).to(device)  # (B, P)
    P = prompt.shape[1]
    response = response.to(device)
    prompt_pos = model.prompt_position_ids  # (3, 1, P)
    resp_pos = model.response_position_ids(L)  # (3, 1, L)
    if layout in ("causal", "block"):
        ids = [prompt, response]
        pos = [prompt_pos, resp_pos]
        logits_from = P - 1 if layout == "causal" else P
    elif layout in ("rad", "full_copy"):
        if noisy is None:
            raise ValueError(f"layout {layout!r} needs the noisy copy")
        noisy = noisy.to(device)
        if layout == "rad":
            ids = [prompt, response, noisy]
            pos = [prompt_pos, resp_pos, resp_pos]
            logits_from = P + L
        else:
            ids = [prompt, response, prompt, noisy]
            pos = [prompt_pos, resp_pos, prompt_pos, resp_pos]
            logits_from = 2 * P + L
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if attention == "dense":
        mask = attention_mask(P, L, model.block_length, layout, valid).to(device)
    elif layout == "causal":
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError(
                "attention='flex' on the causal layout hides no pads: it needs the pads at "
                "the end of each row (valid True, then False), as pad_responses makes them"
            )
        mask = CAUSAL
    else:
        mask = flex_block_mask(P, L, model.block_length, layout, valid, device)
    return Layout(
        input_ids=torch.cat(ids, dim=1),  # (B, T)
        attention_mask=mask,  # (B, 1, T, T), BlockMask or "causal"
        position_ids=torch.cat(pos, dim=2),  # (3, 1, T)
        logits_from=logits_from,
    )


def prompt_image_embeds(model: EchoDVLM, pixel_values: torch.Tensor, copies: int,
                        decisions: torch.Tensor | None = None) -> torch.Tensor:
    """The image features (and diagnosis slots) of a layout's `copies` prompts (2 for
    "full_copy", else 1). `decisions`: `(B, 14)` bool findings for the diagnosis slots
    (teacher forcing); default the model's label head (`EchoDVLM.encode_images`)."""
    embeds = model.encode_images(pixel_values, decisions)  # (B, N_img, hidden)
    # full_copy has two prompts per row: the row's image features fill both slot groups.
    return embeds.repeat(1, copies, 1)  # (B, copies * N_img, hidden)


def compute_rad_loss(
    model: EchoDVLM,
    pixel_values: torch.Tensor,
    response: torch.Tensor,
    valid: torch.Tensor,
    *,
    layout: str = "rad",
    mask_ratio: float | None = None,
    weighting: str = "elbo",
    generator: torch.Generator | None = None,
    attention: str = "dense",
    decisions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Noised]:
    """Noise the responses, run the RAD (or full-copy) layout, score the masked positions.

    Args:
        pixel_values: from `model.preprocess_images`, one image per row.
        response, valid: `(B, L)` from `pad_responses`.
        attention: "dense" or "flex" (module docstring).
        decisions: `(B, 14)` bool, the diagnosis slots' findings (a model with diagnosis
            tokens trains on the report's own labels); default the model's label head.

    Returns:
        (loss, the noise that was drawn).
    """
    device = model.device
    response, valid = response.to(device), valid.to(device)
    noise = noise_response(
        response,
        valid,
        model.block_length,
        model.mask_token_id,
        mask_ratio=mask_ratio,
        generator=generator,
    )
    lay = build_layout(model, response, valid, layout, noisy=noise.noisy, attention=attention)
    copies = 2 if layout == "full_copy" else 1
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=prompt_image_embeds(model, pixel_values, copies, decisions),
        logits_from=lay.logits_from,
    )  # (B, L, V)
    loss = rad_loss(logits, response, noise.masked, noise.ratio, valid, weighting)
    return loss, noise


def compute_ar_loss(
    model: EchoDVLM,
    pixel_values: torch.Tensor,
    response: torch.Tensor,
    valid: torch.Tensor,
    *,
    attention: str = "dense",
    decisions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The AR objective: causal `[prompt | response]`, shifted next-token loss.

    Args:
        attention: "dense" or "flex" (plain causal SDPA, no mask tensor).
        decisions: as `compute_rad_loss`.
    """
    logits, response, valid = _ar_logits(model, pixel_values, response, valid, attention,
                                         decisions)
    return ar_loss(logits, response, valid, model.eos_token_id)


def _ar_logits(
    model: EchoDVLM,
    pixel_values: torch.Tensor,
    response: torch.Tensor,
    valid: torch.Tensor,
    attention: str = "dense",
    decisions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal `[prompt | response]` forward: `(B, L, V)` logits at positions P-1 ..
    P+L-2 (each predicting the next response token), and response / valid on the device."""
    device = model.device
    response, valid = response.to(device), valid.to(device)
    lay = build_layout(model, response, valid, "causal", attention=attention)
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=prompt_image_embeds(model, pixel_values, 1, decisions),
        logits_from=lay.logits_from,
    )  # (B, L + 1, V): positions P-1 .. P+L-1
    return logits[:, :-1], response, valid


def ar_report_nll(
    model: EchoDVLM, pixel_values: torch.Tensor, response: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of each report under an AR model, given its image.

    The fluency metric: exp(sum of NLLs / sum of token counts) is the perplexity.

    Args:
        response, valid: `(B, L)` from `pad_responses` (the report tokens, then `<eos>`).

    Returns:
        `(nll, count)`, both `(B,)`: summed NLL (nats) of each report's tokens up to and
        including its first `<eos>`, and how many tokens that is.
    """
    logits, response, valid = _ar_logits(model, pixel_values, response, valid)
    ce, scored = _ar_token_ce(logits, response, valid, model.eos_token_id)  # (B, L)
    return ce.sum(1), scored.sum(1)
