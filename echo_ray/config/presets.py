"""Named presets: whole configurations by name, written as their differences from the
dataclass defaults of `config/schema.py` (litgpt's `Config.from_name`)."""

from __future__ import annotations

from typing import Any

from echo_ray.config.schema import ConfigError, EchoConfig

PRESETS: dict[str, dict[str, Any]] = {
    # CPU laptop, CI and quickstart: the dataclass defaults (ModelConfig's defaults are the
    # 4M-parameter model of docs/ARCHITECTURE.md section 5.8), with the decoded train split
    # cached.
    "tiny": {"train": {"cache_decoded": True}},
    # A Qwen2.5-VL-7B-sized run (Lingshu-7B, the paper's base) on a GPU cluster.
    "base-7b": {
        "data": {"rows_per_shard": 512, "num_cpus_per_task": 1.0},
        "tokenizer": {"vocab_size": 32000},
        # Qwen2.5-VL-7B's shapes; a real run sets model.pretrained_path to the checkpoint.
        "model": {
            "image_size": 448,
            "hidden_size": 3584,
            "num_layers": 28,
            "num_heads": 28,
            "num_kv_heads": 4,
            "intermediate_size": 18944,
            "mrope_section": [16, 24, 24],
            "max_position_embeddings": 128000,
            "vision_hidden_size": 1280,
            "vision_depth": 32,
            "vision_num_heads": 16,
            "vision_intermediate_size": 3420,
            "dtype": "bfloat16",
            "max_response_len": 256,
        },
        # 8 GPUs, DeepSpeed ZeRO-2 in bf16; 8 x 4 x 4 = 128 reports per step.
        "train": {
            "cache_decoded": False,
            "num_workers": 8,
            "use_gpu": True,
            "cpus_per_worker": 4.0,
            "torch_threads": 0,
            "strategy": "deepspeed",
            "zero_stage": 2,
            "batch_size": 4,
            "grad_accum": 4,
            "max_steps": 5000,
            "lr": 1e-5,
            "warmup_steps": 200,
            "weight_decay": 0.0,
            "eval_every": 500,
            "eval_batches": 16,
            "checkpoint_every": 500,
            "shuffle_buffer": 1024,
            "freeze_vision": True,
        },
        # One GPU per model actor / replica.
        "pool": {"cpus_per_actor": 4.0, "gpus_per_actor": 1.0},
        "serve": {"num_cpus": 4.0, "num_gpus": 1.0, "threads": 4},
    },
}


# Qwen2.5-VL-3B-Instruct's shapes (the 7B's vision tower, tied embeddings) on base-7b's settings.
PRESETS["base-3b"] = {
    **PRESETS["base-7b"],
    "model": {
        **PRESETS["base-7b"]["model"],
        "hidden_size": 2048,
        "num_layers": 36,
        "num_heads": 16,
        "num_kv_heads": 2,
        "intermediate_size": 11008,
        "tie_word_embeddings": True,
    },
}


def preset(name: str) -> EchoConfig:
    """The named preset, validated."""
    from echo_ray.config.overrides import from_dict

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return from_dict({"name": name, **PRESETS[name]})
