"""What a Hugging Face Qwen2.5-VL model folder must hold, and its image preprocessing file.

Torch-free: the CLI checks an `--init` / `--checkpoint` / `--system` folder here before Ray
starts, so a wrong folder fails in a second with one line that says what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from echo_ray.config.overrides import from_dict
from echo_ray.config.schema import ModelConfig
from echo_ray.data.storage import Location
from echo_ray.text.tokenizer import IMAGE_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

CONFIG_FILE = "echo_config.json"  # an echo-ray checkpoint's run config (model/checkpoint.py)
MODEL_TYPE = "qwen2_5_vl"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
VISION_TOKENS = (VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN)


def check_hf_model_folder(path: str | Path) -> None:
    """Check that local folder `path` is a Qwen2.5-VL checkpoint echo-ray can load.

    Raises:
        FileNotFoundError: no such folder, no config.json, no tokenizer files or no weights.
        ValueError: config.json is not a Qwen2.5-VL's (names its model_type), or the
            tokenizer lacks the vision tokens (names them).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a JSON object: {e}") from None
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{path} holds a {model_type!r} model (config.json model_type), not a Qwen2.5-VL "
            f"checkpoint ({MODEL_TYPE!r}, e.g. Qwen2.5-VL-7B-Instruct or Lingshu-7B)"
        )
    tokens = _tokenizer_tokens(path)
    if tokens is None:
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt): copy the "
            "checkpoint's tokenizer files into it"
        )
    missing = [t for t in VISION_TOKENS if t not in tokens]
    if missing:
        raise ValueError(
            f"the tokenizer in {path} lacks the vision token(s) {', '.join(missing)}: it is "
            "not a Qwen2.5-VL tokenizer"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[::2])})")


def _tokenizer_tokens(path: Path) -> set[str] | None:
    """Every token string the folder's tokenizer files name, or None without tokenizer files."""
    tokens: set[str] = set()
    found = False
    fast = path / "tokenizer.json"
    if fast.is_file():
        found = True
        data = json.loads(fast.read_text())
        tokens.update(t["content"] for t in data.get("added_tokens", []))
        vocab = (data.get("model") or {}).get("vocab") or {}
        tokens.update(vocab if isinstance(vocab, dict) else (v[0] for v in vocab))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        found = True
        tokens.update(json.loads((path / "vocab.json").read_text()))
    if not found:
        return None
    config = path / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        tokens.update(t["content"] for t in (data.get("added_tokens_decoder") or {}).values())
        tokens.update(t for t in data.get("additional_special_tokens") or [] if isinstance(t, str))
    return tokens


def read_preprocessing(path: str | Path) -> dict[str, Any] | None:
    """The image settings of a folder's preprocessor_config.json, or None without one:
    `image_mean`, `image_std` (tuples) and `patch_size`, `merge_size`,
    `temporal_patch_size` (ints), each only when the file has it."""
    file = Path(path) / PREPROCESSOR_FILE
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    settings: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        if data.get(key) is not None:
            settings[key] = tuple(float(v) for v in data[key])
    for key in ("patch_size", "merge_size", "temporal_patch_size"):
        if data.get(key) is not None:
            settings[key] = int(data[key])
    return settings


def preprocessor_config(
    *,
    image_size: int,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
) -> dict[str, Any]:
    """A Qwen2VLImageProcessor's preprocessor_config.json for a model on the fixed
    `image_size` grid: min_pixels = max_pixels = image_size**2, so Hugging Face's processor
    resizes every image to the model's grid (a square image exactly to image_size)."""
    pixels = image_size * image_size
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,  # bicubic, as Qwen2.5-VL's
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
        "min_pixels": pixels,
        "max_pixels": pixels,
        "size": {"shortest_edge": pixels, "longest_edge": pixels},
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": merge_size,
    }


def model_image_size(model: Location, plain_model: ModelConfig | None = None) -> int:
    """The image side (pixels) a model directory reads, without loading it: what the CPU
    decode stages ahead of the model actors resize to (docs/ARCHITECTURE.md section 1.3).

    An echo-ray checkpoint's `echo_config.json` says it; a plain Hugging Face folder is
    loaded with `plain_model` (as `load_checkpoint`), default the model section's default.
    Works on S3 (`model` is a `Location`).
    """
    saved = model.join(CONFIG_FILE)
    if saved.exists():
        return from_dict(json.loads(saved.read_text())).model.image_size
    return (plain_model if plain_model is not None else ModelConfig()).image_size
