"""The dVLM: transformers' Qwen2.5-VL (Lingshu-7B's architecture) used as a block-diffusion LM.

Architecture only: how images and the fixed prompt become embeddings and positions, and one
forward that takes an explicit attention mask (a 4D bool tensor, a flex-attention BlockMask
or "causal"). Building and loading a model (from a config
or a Hugging Face folder) live in `model/hf.py`; the masks, losses and layouts in
`echo_ray.diffusion`; the decoders in `echo_ray.decode`.

Why a wrapper rather than calling the HF forward:
- every prompt is the checkpoint's chat template around one image and the instruction
  (`model/prompt.py`; built from shapes: `<|vision_start|> <|image_pad|> x N <|vision_end|>
  instruction`), with a fixed image grid per model, so the prompt (its ids and its M-RoPE
  positions) is computed once, here, and a batch of prompts always has one length (no left
  padding);
- block diffusion needs custom 4D masks, which the HF forward passes through unchanged, but
  it cannot derive Qwen2.5-VL's 3D (M-RoPE) positions from a 4D mask: positions are always
  explicit here. Response token i sits at text position `response_position_start + i`, and
  the noisy copy of the RAD layout reuses the clean copy's positions;
- the attention function ("echo_ray", `model/attention.py`) reads a bool mask as SDPA does,
  True = attend (`eager` would read it silently wrong), and takes a BlockMask or "causal"
  where a dense `(B, 1, T, T)` mask is not needed.

No logit shift (as SDAR/ECHO): the hidden state at a masked position predicts the token at
that position. The AR objective shifts in `diffusion/losses.py`, not here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from echo_ray.config.schema import ModelConfig
from echo_ray.model.attention import CAUSAL
from echo_ray.model.cpu_kernels import PackedLinear, pack_linears
from echo_ray.model.diagnosis import DiagnosisPrompt, new_diagnosis, with_diagnosis_slots
from echo_ray.model.prompt import render_prompt_ids
from echo_ray.text.tokenizer import (
    DIAGNOSIS_SLOT_TOKEN,
    IMAGE_PAD_TOKEN,
    MASK_TOKEN,
    VISION_END_TOKEN,
)

# Qwen2.5-VL normalises pixels with CLIP's statistics (a checkpoint's preprocessor_config.json
# may say otherwise: `model/hf.py` reads it).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class PatchProjection(nn.Conv3d):
    """Qwen2.5-VL's patch embedding: a Conv3d whose kernel equals its stride and, as the
    vision tower calls it, its whole input (one patch). That is one matmul per patch;
    oneDNN ran it as a convolution about 4x slower (the tiny preset: 478 vs 127 us per
    image). Same parameter and state dict as the Conv3d it replaces; any other input shape
    goes to the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        flat = x.reshape(x.shape[0], -1)  # (N, C * T * P * P), the kernel's own order
        out = F.linear(flat, self.weight.view(self.out_channels, -1), self.bias)
        return out.view(x.shape[0], self.out_channels, 1, 1, 1)  # (N, E, 1, 1, 1)


class EchoDVLM(nn.Module):
    """A Qwen2.5-VL backbone with a fixed prompt layout, explicit masks and explicit positions.

    Attributes:
        backbone: the `Qwen2_5_VLForConditionalGeneration` (saved / loaded in HF format).
        config: the `ModelConfig` it was built with.
        tokenizer: the tokenizer whose ids the model uses (mask, eos, pad, vision tokens).
        prompt_ids: `(P,)` the fixed prompt (`model.prompt.render_prompt_ids`).
        prompt_position_ids: `(3, 1, P)` its M-RoPE positions (temporal, height, width).
        response_position_start: text position of the first response token.
        banned_token_ids: `(K,)` the ids decoding never writes: every id without a token
            (embedding rows past `len(tokenizer)`, e.g. Qwen's ~270 spare rows) and every
            added or special token (mask, pad, bos, unk, chat, vision, tool/think...) but eos.
        image_mean, image_std: per-channel pixel normalisation (the checkpoint's
            preprocessor_config.json, else CLIP's).
        diagnosis: the label head and decision embeddings of the prompt's diagnosis slots
            (`model/diagnosis.py`), or None (`config.diagnosis_prompt` off). With it the
            prompt holds `diagnosis.num_labels` `<|video_pad|>` slots after `<|vision_end|>`
            (text positions), filled per image by `encode_images`.
    """

    def __init__(
        self,
        backbone: Qwen2_5_VLForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        config: ModelConfig,
        *,
        image_mean: tuple[float, ...] = IMAGE_MEAN,
        image_std: tuple[float, ...] = IMAGE_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        hf = backbone.config
        self.mask_token_id = _token_id(tokenizer, MASK_TOKEN)
        self.eos_token_id = _required_id(tokenizer.eos_token_id, "eos")
        self.pad_token_id = _required_id(tokenizer.pad_token_id, "pad")
        self.image_token_id = int(hf.image_token_id)
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN) != self.image_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE_PAD_TOKEN} id "
                f"({tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)}) is not the model "
                f"config's image_token_id ({self.image_token_id}): tokenizer and weights are "
                "from different checkpoints"
            )
        self.register_buffer(
            "banned_token_ids", _banned_ids(tokenizer, self.vocab_size), persistent=False
        )  # (K,)
        vision = hf.vision_config
        self.patch_size = int(vision.patch_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.spatial_merge_size = int(vision.spatial_merge_size)
        self.in_channels = int(vision.in_channels)
        unit = self.patch_size * self.spatial_merge_size
        if config.image_size % unit:
            raise ValueError(
                f"model.image_size={config.image_size} is not a multiple of the checkpoint's "
                f"patch_size * spatial_merge_size = {unit}; pick e.g. "
                f"{max(unit, config.image_size // unit * unit)}"
            )
        side = config.image_size // self.patch_size  # patches per side
        self.num_patches = side * side
        self.num_image_tokens = self.num_patches // self.spatial_merge_size**2
        self.register_buffer(
            "image_grid_thw", torch.tensor([[1, side, side]]), persistent=False
        )  # (1, 3)

        prompt = render_prompt_ids(tokenizer, config.instruction, self.num_image_tokens)
        self.diagnosis: DiagnosisPrompt | None = None
        self.diagnosis_token_id: int | None = None
        if config.diagnosis_prompt:
            self.diagnosis = new_diagnosis(
                self.num_image_tokens, self.hidden_size, config
            ).to(self.dtype)
            self.diagnosis_token_id = _token_id(tokenizer, DIAGNOSIS_SLOT_TOKEN)
            prompt = with_diagnosis_slots(
                prompt, _token_id(tokenizer, VISION_END_TOKEN), self.diagnosis_token_id,
                self.diagnosis.num_labels,
            )
        prompt_ids = torch.tensor(prompt)  # (P,)
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        mm_token_type = (prompt_ids == self.image_token_id).int()[None]  # (1, P)
        positions, _ = backbone.model.get_rope_index(
            prompt_ids[None],
            mm_token_type,
            self.image_grid_thw,
            attention_mask=torch.ones_like(prompt_ids[None]),
        )  # (3, 1, P)
        self.register_buffer("prompt_position_ids", positions, persistent=False)
        self.response_position_start = int(positions.max()) + 1
        proj = backbone.model.visual.patch_embed.proj
        if type(proj) is nn.Conv3d and proj.kernel_size == proj.stride:
            proj.__class__ = PatchProjection  # same module, same weight: a matmul, not a conv
        self._vision_inputs: dict[tuple[int, torch.device], dict[str, Any]] = {}

    # ------------------------------------------------------------------ shapes and ids

    @property
    def block_length(self) -> int:
        return self.config.block_length

    @property
    def prompt_length(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def vocab_size(self) -> int:
        weight = self.backbone.get_input_embeddings().weight
        return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3: the full shape

    @property
    def hidden_size(self) -> int:
        """The language model's width (the backbone's own: a loaded checkpoint's)."""
        return int(self.backbone.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    def prompt_input_ids(self, batch_size: int) -> torch.Tensor:
        """The fixed prompt for a batch: `(batch_size, P)`."""
        return self.prompt_ids[None].expand(batch_size, -1)

    def response_position_ids(self, length: int, offset: int = 0) -> torch.Tensor:
        """M-RoPE positions of response tokens `offset .. offset+length-1`: `(3, 1, length)`.

        Text tokens after the image use the same position on all three axes."""
        start = self.response_position_start + offset
        pos = torch.arange(start, start + length, device=self.device)  # (L,)
        return pos.view(1, 1, -1).expand(3, 1, -1)

    def pack_linears(self) -> int:
        """CPU decoding: the language model's and the LM head's linear layers multiply
        against prepacked weights (`cpu_kernels.PackedLinear`; same parameters, same state
        dict, plain `F.linear` under autograd or off CPU). Idempotent; returns the number of
        layers swapped."""
        swapped = pack_linears(self.backbone.model.language_model)
        head = self.backbone.lm_head
        if swapped and type(head) is nn.Linear:
            self.backbone.lm_head = PackedLinear.from_linear(head)
            swapped += 1
        return swapped

    def set_vision_trainable(self, trainable: bool) -> None:
        """Freeze (or unfreeze) the vision tower and its projector (the patch merger)."""
        for p in self.backbone.model.visual.parameters():
            p.requires_grad_(trainable)

    # ------------------------------------------------------------------ images

    def preprocess_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images in [0, 1] -> Qwen2.5-VL `pixel_values` on this model's fixed grid.

        Args:
            images: `(N, H, W)` grayscale or `(N, C, H, W)` (C = 1 or 3), values in [0, 1],
                any size: each is resized (area/bilinear, antialiased) to `image_size`.

        Returns:
            `(N * num_patches, C * temporal_patch * patch * patch)` flattened patches, the
            layout of transformers' Qwen2-VL image processor (a still image is repeated over
            the temporal patch).
        """
        x = torch.as_tensor(images).to(self.device, torch.float32)
        if x.ndim == 3:
            x = x[:, None]  # (N, 1, H, W)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be (N, H, W) or (N, C, H, W) with C in (1, 3); got {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, self.in_channels, -1, -1)  # grayscale -> RGB
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std  # (N, C, S, S)
        n, c = x.shape[:2]
        p, m, t = self.patch_size, self.spatial_merge_size, self.temporal_patch_size
        g = size // p  # patches per side
        # Order patches so each spatial_merge x spatial_merge group is contiguous.
        x = x.reshape(n, c, g // m, m, p, g // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, g/m, g/m, m, m, C, p, p)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)  # (..., C, t, p, p)
        return x.reshape(n * g * g, c * t * p * p).to(self.dtype)

    @property
    def num_prompt_slots(self) -> int:
        """Prompt positions filled per image by `encode_images`: the image tokens, then the
        diagnosis slots when the model has them."""
        extra = self.diagnosis.num_labels if self.diagnosis is not None else 0
        return self.num_image_tokens + extra

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: `pixel_values` -> `(N, num_image_tokens, hidden)`."""
        num_images = pixel_values.shape[0] // self.num_patches
        grid = self.image_grid_thw.expand(num_images, -1)  # (N, 3)
        feats = self.backbone.model.get_image_features(
            pixel_values, grid, **self.vision_inputs(num_images)
        ).pooler_output
        return torch.stack(list(feats))  # (N, num_image_tokens, hidden)

    def encode_images(self, pixel_values: torch.Tensor,
                      decisions: torch.Tensor | None = None) -> torch.Tensor:
        """Everything the prompt takes from each image: `(N, num_prompt_slots, hidden)`, its
        image tokens (`image_features`) and, with diagnosis tokens, the 14 slot embeddings
        after them (in prompt order).

        Args:
            decisions: `(N, 14)` bool, the findings to write into the slots (training: the
                report's own labels); default the label head's decisions on these images.
        """
        feats = self.image_features(pixel_values)  # (N, T, hidden)
        if self.diagnosis is None:
            return feats
        if decisions is None:
            decisions = self.diagnosis.decide(feats)  # (N, 14)
        slots = self.diagnosis.slot_embeds(decisions.to(feats.device)).to(feats.dtype)
        return torch.cat([feats, slots], dim=1)  # (N, T + 14, hidden)

    def findings(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The label head's probabilities `(N, 14)` (float32, CheXpert order), or None without
        diagnosis tokens: what the model was told it sees, for outputs to show as such."""
        if self.diagnosis is None:
            return None
        return self.diagnosis.probabilities(self.image_features(pixel_values))

    def vision_inputs(self, num_images: int) -> dict[str, Any]:
        """The vision tower's grid-dependent inputs for `num_images` images: rotary positions,
        window order and attention boundaries. HF computes them on every call, partly in
        Python loops; the grid is fixed per model, so here they are computed once per batch
        size and device (by HF's own functions) and handed to the tower's keywords for
        precomputed inputs. About a sixth of the tiny vision tower's time at batch 8."""
        key = (num_images, self.device)
        inputs = self._vision_inputs.get(key)
        if inputs is None:
            visual = self.backbone.model.visual
            grid = self.image_grid_thw.expand(num_images, -1)  # (N, 3)
            cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config)
            window_index, cu_window_seqlens = get_vision_window_index(
                grid,
                spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            inputs = {
                "position_ids": get_vision_position_ids(grid, visual.spatial_merge_size),
                "cu_seqlens": cu_seqlens,
                "max_seqlen": max_seqlen,
                "window_index": window_index.to(self.device),
                "cu_window_seqlens": cu_window_seqlens,
                "max_window_seqlen": get_max_seqlen(cu_window_seqlens, visual.config),
            }
            if len(self._vision_inputs) >= 64:  # batch sizes seen by a long-lived replica
                self._vision_inputs.clear()
            self._vision_inputs[key] = inputs
        return inputs

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None):
        """Token embeddings with image features scattered into the `<|image_pad|>` slots (and
        the diagnosis slots after them).

        Args:
            input_ids: `(B, T)`.
            image_embeds: `(B, copies * num_prompt_slots, hidden)` (`encode_images`, one
                group per prompt copy in the row), required when `input_ids` holds image
                placeholders (the prompt), ignored otherwise. Slots are filled in sequence
                order: each prompt's image tokens come before its diagnosis slots, as
                `encode_images` orders them.
        """
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, hidden)
        if image_embeds is None:
            return embeds
        slots = input_ids == self.image_token_id  # (B, T)
        if self.diagnosis_token_id is not None:
            slots = slots | (input_ids == self.diagnosis_token_id)
        if int(slots.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"{int(slots.sum())} image placeholder tokens but image_embeds holds "
                f"{image_embeds.shape[0]} x {image_embeds.shape[1]} features"
            )
        return embeds.masked_scatter(slots[..., None], image_embeds.to(embeds.dtype))

    def rotary_embeddings(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE `(cos, sin)` of `position_ids` `(3, B or 1, T)`: each `(B or 1, T, head_dim)`.

        A pure function of the positions: decoders compute it once for the whole sequence and
        pass slices to `forward` (`position_embeddings`) instead of recomputing it per call."""
        text = self.backbone.model.language_model
        return text.rotary_emb(text.embed_tokens.weight, position_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | BlockMask | str,
        position_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        logits_from: int = 0,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One forward with an explicit mask and explicit positions.

        Runs the HF text model's decoder layers directly: its `forward` wrapper only adds,
        per call, the rotary table (a function of the positions, cacheable by the caller),
        mask preprocessing (a 4D bool mask passes through it unchanged) and output capture.
        The attention kernel follows the mask's type (`model/attention.py`).

        Args:
            input_ids: `(B, Q)` the new tokens.
            attention_mask: always explicit (without it a cached multi-token forward is
                silently causal), one of:
                - `(B or 1, 1, Q, K)` bool tensor, True = attend; K = cached + Q keys. SDPA
                  with the mask; the only form with cached keys (decoding);
                - a flex-attention `BlockMask` of shape `(B or 1, 1, Q, Q)`
                  (`diffusion.masks.flex_block_mask`): flex attention, no dense mask;
                - "causal": plain causal SDPA over the Q tokens, no mask tensor (the AR
                  objective); no cached keys.
            position_ids: `(3, B or 1, Q)` M-RoPE positions.
            image_embeds: `(B, num_image_tokens, hidden)` when `input_ids` holds the prompt.
            past_key_values: a cache to read and append to (appends all Q tokens).
            logits_from: compute logits only for positions `logits_from:` (saves the vocab
                projection where only a suffix is needed).
            position_embeddings: `rotary_embeddings(position_ids)`, when the caller has it.

        Returns:
            logits `(B, Q - logits_from, V)`.
        """
        batch = input_ids.shape[0]
        text = self.backbone.model.language_model
        mask = _checked_mask(attention_mask, batch, past_key_values)
        if text.has_sliding_layers and not isinstance(mask, torch.Tensor):
            raise ValueError("a model with sliding-window layers needs a 4D bool attention_mask")
        embeds = self.embed(input_ids, image_embeds)  # (B, Q, hidden)
        position_ids = position_ids.expand(-1, batch, -1)  # (3, B, Q)
        if text.has_sliding_layers:  # per-layer masks: let the HF wrapper build them
            hidden = text(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
            ).last_hidden_state  # (B, Q, hidden)
        else:
            if position_embeddings is None:
                position_embeddings = self.rotary_embeddings(position_ids)
            hidden = embeds
            for layer in text.layers:
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    past_key_values=past_key_values,
                    position_embeddings=position_embeddings,
                )  # (B, Q, hidden)
            hidden = text.norm(hidden)
        return self.backbone.lm_head(hidden[:, logits_from:])  # (B, Q - logits_from, V)


def _checked_mask(
    attention_mask: torch.Tensor | BlockMask | str, batch: int, cache: Cache | None
) -> torch.Tensor | BlockMask | str:
    """`forward`'s mask, validated (a dense one expanded to the batch: `(B, 1, Q, K)`)."""
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dtype != torch.bool or attention_mask.ndim != 4:
            raise ValueError(
                "a tensor attention_mask must be 4D bool (True = attend), "
                f"got {attention_mask.ndim}D {attention_mask.dtype}"
            )
        return attention_mask.expand(batch, -1, -1, -1)  # (B, 1, Q, K)
    if not isinstance(attention_mask, BlockMask) and attention_mask != CAUSAL:
        raise ValueError(
            "attention_mask must be a 4D bool tensor (True = attend), a flex-attention "
            f"BlockMask or {CAUSAL!r}; got {attention_mask!r}"
        )
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("with cached keys pass a 4D bool attention_mask (decoding)")
    return attention_mask


# ---------------------------------------------------------------------- token ids


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(f"tokenizer lacks {token}; call echo_ray.model.hf.add_mask_token first")
    return int(vocab[token])


def _banned_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """`(K,)` sorted: ids >= len(tokenizer) and every added / special token's id but eos."""
    specials = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    specials.discard(tokenizer.eos_token_id)
    ids = {i for i in specials if i < vocab_size} | set(range(len(tokenizer), vocab_size))
    return torch.tensor(sorted(ids), dtype=torch.long)


def _required_id(value: int | None, name: str) -> int:
    if value is None:
        raise ValueError(f"tokenizer has no {name} token; set tokenizer.{name}_token")
    return int(value)
