"""Diagnosis tokens: the 14 CheXpert findings, read off the image, written into the prompt.

A small model trained from scratch on a few thousand reports learns to write fluent normal
reports long before it learns to read a finding out of 16 image tokens: its own label head
reads them far better than its language model does (docs/ARCHITECTURE.md section 5.14).
PromptMRG's answer (Jin et al., AAAI 2024), used here: a label head classifies the image, and
its decisions enter the prompt as tokens the language model attends to.

- `LabelHead`: one linear layer from the image's tokens (vision tower + patch merger, as the
  language model receives them, flattened in order) to one logit per CheXpert label. The
  vision stage trains it with the tower.
- `DiagnosisPrompt`: the head plus one learned embedding per label and decision
  (`decisions`, `(2, 14, hidden)`: row 0 "absent", row 1 "present"). The prompt holds 14
  slots after `<|vision_end|>` (`with_diagnosis_slots`); slot k carries label k's decision.
  AR and RAD train the embeddings with the report's own labels as the decisions (teacher
  forcing: the language model learns to follow them); decoding, trajectories and DCD use
  the head's (`decide`).
- saved beside the backbone as `diagnosis.safetensors` (`save_diagnosis` / `load_diagnosis`).

Torch only: no Ray, no training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from echo_ray.config.schema import ModelConfig
from echo_ray.model.folder import CONFIG_FILE
from echo_ray.text.labels import CHEXPERT_LABELS

DIAGNOSIS_FILE = "diagnosis.safetensors"
NUM_LABELS = len(CHEXPERT_LABELS)


class LabelHead(nn.Module):
    """One linear layer from an image's tokens `(N, T, H)`, flattened in order (where a
    finding lies counts), to one logit per CheXpert label `(N, num_labels)`."""

    def __init__(self, num_image_tokens: int, hidden_size: int,
                 num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.proj = nn.Linear(num_image_tokens * hidden_size, num_labels)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds.flatten(1))  # (N, T, H) -> (N, num_labels)


class DiagnosisPrompt(nn.Module):
    """The label head and the decision embeddings of the prompt's diagnosis slots.

    Args:
        num_image_tokens, hidden_size: the model's image tokens per image and width.
        threshold: probability at which a finding is called present.
    """

    def __init__(self, num_image_tokens: int, hidden_size: int, *, threshold: float = 0.5,
                 num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.threshold = threshold
        self.head = LabelHead(num_image_tokens, hidden_size, num_labels)
        # std 0.02: the scale of the token embeddings they sit beside (HF's initializer_range)
        self.decisions = nn.Parameter(torch.randn(2, num_labels, hidden_size) * 0.02)

    @property
    def num_labels(self) -> int:
        return int(self.decisions.shape[1])

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(N, T, H)` image tokens -> `(N, num_labels)` float32 probabilities."""
        return torch.sigmoid(self.head(image_features).float())

    def decide(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(N, T, H)` image tokens -> `(N, num_labels)` bool: the head's calls."""
        return self.probabilities(image_features) >= self.threshold

    def slot_embeds(self, decisions: torch.Tensor) -> torch.Tensor:
        """`(N, num_labels)` bool decisions -> `(N, num_labels, H)` slot embeddings."""
        if decisions.ndim != 2 or decisions.shape[1] != self.num_labels:
            raise ValueError(
                f"decisions must be (N, {self.num_labels}), got {tuple(decisions.shape)}"
            )
        labels = torch.arange(self.num_labels, device=decisions.device)  # (K,)
        return self.decisions[decisions.long(), labels]  # (N, K, H)


def with_diagnosis_slots(prompt_ids: list[int], vision_end_id: int, slot_id: int,
                         count: int) -> list[int]:
    """`prompt_ids` with `count` copies of `slot_id` right after its one `vision_end_id`."""
    if prompt_ids.count(vision_end_id) != 1:
        raise ValueError(
            f"the prompt holds {prompt_ids.count(vision_end_id)} <|vision_end|> tokens; the "
            "diagnosis slots follow the one image"
        )
    at = prompt_ids.index(vision_end_id) + 1
    return prompt_ids[:at] + [slot_id] * count + prompt_ids[at:]


def new_diagnosis(num_image_tokens: int, hidden_size: int,
                  config: ModelConfig) -> DiagnosisPrompt:
    """A fresh head and embeddings for a language model `hidden_size` wide (the backbone's:
    a loaded checkpoint's shapes are its own, not `config`'s), seeded from `config.seed`
    (the same for every worker)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        return DiagnosisPrompt(num_image_tokens, hidden_size,
                               threshold=config.diagnosis_threshold)


def save_diagnosis(diagnosis: DiagnosisPrompt, path: str | Path) -> Path:
    """Write the head and embeddings to `path/diagnosis.safetensors` (float32)."""
    from safetensors.torch import save_file

    file = Path(path) / DIAGNOSIS_FILE
    state = {k: v.detach().float().cpu().contiguous() for k, v in diagnosis.state_dict().items()}
    save_file(state, str(file))
    return file


def load_diagnosis(diagnosis: DiagnosisPrompt, path: str | Path) -> bool:
    """Load `path/diagnosis.safetensors` into `diagnosis`. Returns False (nothing loaded) for
    a folder that never had diagnosis tokens: a plain Hugging Face checkpoint, or an echo-ray
    one saved without them (the prompt is then new to it: the head and embeddings start
    fresh and the vision or language stage trains them).

    Raises:
        FileNotFoundError: the folder's saved config says it was trained with diagnosis
            tokens but the file is missing (a copy that lost it).
    """
    from safetensors.torch import load_file

    file = Path(path) / DIAGNOSIS_FILE
    if not file.is_file():
        saved = Path(path) / CONFIG_FILE
        if saved.is_file() and json.loads(saved.read_text()).get("model", {}).get(
            "diagnosis_prompt"
        ):
            raise FileNotFoundError(
                f"{path} was trained with diagnosis tokens (model.diagnosis_prompt) but has "
                f"no {DIAGNOSIS_FILE}: copy the whole checkpoint folder"
            )
        return False
    state = load_file(str(file))
    target = diagnosis.state_dict()
    diagnosis.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()})
    return True
