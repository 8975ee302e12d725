"""Save / load a model directory: Hugging Face format + tokenizer + our config.

Layout (a plain HF model directory, so `from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` also work on it directly):

    config.json, model.safetensors, generation_config.json   the Qwen2.5-VL backbone
    tokenizer.json, tokenizer_config.json, ...               the tokenizer (with <|mask|>)
    echo_config.json                                         the run's config (RUN_SECTIONS)

What was saved loads back bit-identical (same dtype, same tensors, same config).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from echo_ray.config.overrides import apply_overrides, from_dict
from echo_ray.config.schema import EchoConfig
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.model.hf import load_pretrained

CONFIG_FILE = "echo_config.json"


def save_checkpoint(model: EchoDVLM, path: str | Path, config: EchoConfig | None = None) -> Path:
    """Write `model` (backbone + tokenizer) and `config` to the directory `path`.

    Args:
        config: the run's whole config; default: the tiny preset with `model.config` as its
            model section. Its `model.pretrained_path` is written as null: the directory
            itself is the checkpoint.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else EchoConfig()
    config = dataclasses.replace(
        config, model=dataclasses.replace(model.config, pretrained_path=None)
    )
    model.backbone.save_pretrained(str(path))
    model.tokenizer.save_pretrained(str(path))
    (path / CONFIG_FILE).write_text(config.to_json(run_only=True))
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


def load_checkpoint(path: str | Path, overrides: Iterable[str] = ()) -> tuple[EchoDVLM, EchoConfig]:
    """Load a directory written by `save_checkpoint`.

    Args:
        overrides: `section.key=value` strings applied to the saved config (e.g. decoding
            or training settings); shape fields of `model` are ignored (the weights decide).

    Returns:
        (the model in eval mode, its config with `model.pretrained_path` = `path`).
    """
    config = apply_overrides(load_config(path), overrides)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, pretrained_path=str(path))
    )
    model = load_pretrained(path, config.model)
    return model, config
