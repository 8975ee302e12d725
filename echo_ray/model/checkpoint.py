"""Save / load a model directory: Hugging Face format + tokenizer + our config.

Layout (a plain HF model directory, so `from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` also work on it directly):

    config.json, model.safetensors, generation_config.json   the Qwen2.5-VL backbone
    tokenizer.json, tokenizer_config.json, ...               the tokenizer (with <|mask|>)
    chat_template.jinja                                      its chat template, if it has one
    preprocessor_config.json                                 the image processor (fixed grid)
    echo_config.json                                         the run's config (RUN_SECTIONS)
    diagnosis.safetensors                                    the diagnosis tokens, if any

so `AutoProcessor.from_pretrained(path)` and `Qwen2_5_VLForConditionalGeneration
.from_pretrained(path)` open it too (an AR checkpoint can be served by another engine).
What was saved loads back bit-identical (same dtype, same tensors, same config).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from echo_ray.config.overrides import apply_overrides, from_dict
from echo_ray.config.schema import EchoConfig, ModelConfig
from echo_ray.model.diagnosis import save_diagnosis
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.model.folder import CONFIG_FILE, PREPROCESSOR_FILE, preprocessor_config
from echo_ray.model.hf import load_pretrained


def save_checkpoint(
    model: EchoDVLM,
    path: str | Path,
    config: EchoConfig | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (backbone + tokenizer + image processor) and `config` to `path`.

    Args:
        config: the run's whole config; default: the tiny preset with `model.config` as its
            model section. Its `model.pretrained_path` is written as null: the directory
            itself is the checkpoint.
        state_dict: the backbone's weights to write instead of its own parameters, keys as
            `backbone.state_dict()` (ZeRO-3 passes the consolidated 16-bit state dict
            gathered to rank 0, where the model's own parameters are empty partitions).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else EchoConfig()
    config = dataclasses.replace(
        config, model=dataclasses.replace(model.config, pretrained_path=None)
    )
    model.backbone.save_pretrained(str(path), state_dict=state_dict)
    model.tokenizer.save_pretrained(str(path))  # with chat_template.jinja when it has one
    processor = preprocessor_config(
        image_size=model.config.image_size,
        patch_size=model.patch_size,
        merge_size=model.spatial_merge_size,
        temporal_patch_size=model.temporal_patch_size,
        image_mean=model.image_mean,
        image_std=model.image_std,
    )
    (path / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(config.to_json(run_only=True))
    if model.diagnosis is not None:
        save_diagnosis(model.diagnosis, path)
    return path


def load_config(path: str | Path) -> EchoConfig:
    """The `EchoConfig` saved in a checkpoint directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not an echo-ray checkpoint (no {CONFIG_FILE}); to start from a plain "
            "Hugging Face model directory set model.pretrained_path instead"
        )
    return from_dict(json.loads(file.read_text()))


def load_checkpoint(
    path: str | Path, overrides: Iterable[str] = (), *, plain_model: ModelConfig | None = None
) -> tuple[EchoDVLM, EchoConfig]:
    """Load a directory written by `save_checkpoint`, or a plain Hugging Face Qwen2.5-VL
    folder (no echo_config.json) zero-shot.

    Args:
        overrides: `section.key=value` strings applied to the saved config (e.g. decoding
            or training settings); shape fields of `model` are ignored (the weights decide).
        plain_model: the model section a plain Hugging Face folder is loaded with (image
            size, instruction, max_response_len, dtype; default `ModelConfig()`), before
            `overrides`; the rest of its config is the tiny preset's. Unused for an
            echo-ray checkpoint, whose own section wins.

    Returns:
        (the model in eval mode, its config with `model.pretrained_path` = `path`).
    """
    if Path(path, "config.json").is_file() and not Path(path, CONFIG_FILE).is_file():
        config = EchoConfig(model=plain_model if plain_model is not None else ModelConfig())
    else:
        config = load_config(path)
    config = apply_overrides(config, overrides)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, pretrained_path=str(path))
    )
    model = load_pretrained(path, config.model)
    return model, config
