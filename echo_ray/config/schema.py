"""Configuration: dataclasses with named presets and strict `key=value` overrides.

One `EchoConfig` composes a sub-config per concern. Presets name whole configurations
(`EchoConfig.from_name("tiny")`); overrides address fields by dotted path
(`model.image_size=224`) and are parsed to the field's declared type. Unknown keys and values
of the wrong type are errors that name the key and list what is allowed, in the spirit of
nanoGPT's configurator but without `exec`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from echo_ray.data.dicom import RADIOGRAPH_MODALITIES


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and why."""


@dataclass
class DataConfig:
    """How DICOM studies become model inputs and shards."""

    max_dimension: int = 8192
    """Reject DICOM images whose Rows or Columns exceed this (absurd-dimension guard)."""
    modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES
    """Accepted DICOM Modality values; empty accepts every modality."""
    include_phi: bool = False
    """Keep patient name / ID / birth date in metadata (never by default)."""
    rows_per_shard: int = 256
    """Target number of images per Parquet shard file."""
    num_cpus_per_task: float = 0.5
    """Logical CPUs requested by each Ray Data decode task (fractional fits a 2-core laptop)."""
    batch_size: int = 16
    """Rows per Ray Data `map_batches` call."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train / validate / test fractions used when the archive ships no split.csv."""

    def validate(self) -> None:
        _require(self.max_dimension >= 1, "data.max_dimension must be >= 1")
        _require(self.rows_per_shard >= 1, "data.rows_per_shard must be >= 1")
        _require(self.batch_size >= 1, "data.batch_size must be >= 1")
        _require(self.num_cpus_per_task > 0, "data.num_cpus_per_task must be > 0")
        fr = self.split_fractions
        _require(
            len(fr) == 3 and all(f >= 0 for f in fr) and abs(sum(fr) - 1) < 1e-6,
            f"data.split_fractions must be three non-negative numbers summing to 1, got {fr}",
        )


@dataclass
class TokenizerConfig:
    """The report tokenizer (byte-level BPE trained on normalized training reports)."""

    vocab_size: int = 2048
    """Target vocabulary size including special tokens."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""

    def validate(self) -> None:
        _require(
            self.vocab_size >= 300, "tokenizer.vocab_size must be >= 300 (256 bytes + specials)"
        )
        _require(self.min_frequency >= 1, "tokenizer.min_frequency must be >= 1")


@dataclass
class ModelConfig:
    """The dVLM: a Qwen2.5-VL backbone (built from these shapes, or loaded) plus diffusion settings.

    With `pretrained_path` set, the backbone (and its tokenizer) are loaded from that local
    Hugging Face directory and the shape fields below are ignored; otherwise a randomly
    initialised Qwen2.5-VL of these shapes is built on the report tokenizer's vocabulary.
    """

    pretrained_path: str | None = None
    """Local Hugging Face Qwen2.5-VL checkpoint directory (e.g. Lingshu-7B); None = build."""
    image_size: int = 112
    """Fixed side (pixels) every image is resized to, so every prompt has the same length."""
    patch_size: int = 14
    """Vision patch side in pixels."""
    spatial_merge_size: int = 2
    """Patches merged per side into one language-model image token."""
    hidden_size: int = 256
    """Language model width."""
    num_layers: int = 4
    """Language model decoder layers."""
    num_heads: int = 4
    """Language model attention heads."""
    num_kv_heads: int = 2
    """Language model key/value heads (grouped-query attention)."""
    intermediate_size: int = 512
    """Language model MLP width."""
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    """M-RoPE split of half the head dimension into temporal/height/width sections."""
    rope_theta: float = 1000000.0
    """RoPE base."""
    max_position_embeddings: int = 2048
    """Longest position the rotary embedding is configured for."""
    vision_hidden_size: int = 128
    """Vision tower width."""
    vision_depth: int = 2
    """Vision tower blocks."""
    vision_num_heads: int = 4
    """Vision tower attention heads."""
    vision_intermediate_size: int = 256
    """Vision tower MLP width."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the output head (Qwen2.5-VL-7B does not)."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    seed: int = 0
    """Seed of the random initialisation when building from shapes."""
    instruction: str = "Write the radiology report for this chest X-ray."
    """Text after the image in every prompt (one fixed prompt: one prompt length per model)."""
    block_length: int = 8
    """Diffusion block length B: response tokens decoded together, bidirectional inside."""
    max_response_len: int = 128
    """Longest response in tokens (training truncates; decoding stops there)."""
    freeze_vision: bool = False
    """Freeze the vision tower and its projector (the patch merger) during training."""

    def validate(self) -> None:
        _require(self.image_size >= 1, "model.image_size must be >= 1")
        unit = self.patch_size * self.spatial_merge_size
        _require(
            self.patch_size >= 1 and self.spatial_merge_size >= 1 and self.image_size % unit == 0,
            f"model.image_size ({self.image_size}) must be a multiple of patch_size * "
            f"spatial_merge_size ({self.patch_size} * {self.spatial_merge_size} = {unit})",
        )
        _require(
            self.num_heads >= 1 and self.hidden_size % self.num_heads == 0,
            f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
            f"({self.num_heads})",
        )
        _require(
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
            f"({self.num_kv_heads})",
        )
        half_head = self.hidden_size // self.num_heads // 2
        _require(
            sum(self.mrope_section) == half_head and min(self.mrope_section) >= 0,
            f"model.mrope_section {self.mrope_section} must sum to half the head dimension "
            f"({half_head} for hidden_size {self.hidden_size} / num_heads {self.num_heads})",
        )
        _require(
            self.vision_num_heads >= 1 and self.vision_hidden_size % self.vision_num_heads == 0,
            "model.vision_hidden_size must be divisible by model.vision_num_heads",
        )
        for name in ("num_layers", "intermediate_size", "vision_depth", "vision_intermediate_size"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1")
        _require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}",
        )
        _require(self.block_length >= 1, "model.block_length must be >= 1")
        _require(
            self.max_response_len >= self.block_length,
            f"model.max_response_len ({self.max_response_len}) must be >= model.block_length "
            f"({self.block_length})",
        )


STRATEGIES = ("ddp", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16")
STAGES = ("ar", "rad", "dcd")
DCD_STEP_WEIGHTINGS = ("linear", "uniform")


@dataclass
class TrainConfig:
    """A Ray Train run: workers, strategy, optimisation, evaluation, checkpoints, recovery.

    Steps are optimizer steps; one step consumes `batch_size * grad_accum` rows per worker.
    """

    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); else CPU workers (gloo)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs Ray reserves per worker (fractional leaves room for Ray Data on a laptop)."""
    torch_threads: int = 1
    """Intra-op threads per worker (1 avoids oversubscribing a small machine; 0 = torch's)."""
    strategy: str = "ddp"
    """"ddp" (DistributedDataParallel) or "deepspeed" (ZeRO, `zero_stage`)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3) when strategy is deepspeed."""
    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16" (autocast; DeepSpeed bf16)."""
    batch_size: int = 8
    """Rows per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 500
    """Optimizer steps of the run (epochs repeat the split as needed)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of `lr`."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    freeze_vision: bool | None = None
    """Freeze the vision tower + projector; None = the stage's default (rad: frozen, as the
    paper; ar: trained)."""
    report_every: int = 10
    """Report metrics to Ray Train every this many steps (each report waits for the
    controller's poll, about 2 s; every step still goes to metrics.jsonl)."""
    eval_every: int = 100
    """Validation loss every this many steps (0 = only at the end)."""
    eval_batches: int = 4
    """Validation batches per worker per evaluation."""
    checkpoint_every: int = 250
    """Checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run directory (the newest)."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (0 = no shuffle)."""
    cache_decoded: bool = False
    """Decode + tokenize the split once and keep it in the object store (small data sets:
    epochs then cost no DICOM decoding); off streams and decodes every epoch."""
    seed: int = 0
    """Seeds shuffling, noise and the per-worker generators."""
    fail_at_step: int = 0
    """Fault drill: worker `fail_rank` raises at this step, once, in a run that did not start
    from a checkpoint (0 = off). Recovery must resume from the latest checkpoint."""
    fail_rank: int = 1
    """The rank that raises in the fault drill."""
    dcd_step_weighting: str = "linear"
    """DCD: weight of a position's KL by the teacher step that committed it: "linear"
    (step + 1: later commits, conditioned on more of the block, weigh more) or "uniform"."""
    dcd_eos_weight: float = 1.0
    """DCD: lambda, the weight of the cross-entropy pushing `<eos>` to one-hot on the
    eos-filled tail of the last block."""

    def validate(self) -> None:
        _require(self.num_workers >= 1, "train.num_workers must be >= 1")
        _require(self.cpus_per_worker > 0, "train.cpus_per_worker must be > 0")
        _require(self.torch_threads >= 0, "train.torch_threads must be >= 0")
        _require(
            self.strategy in STRATEGIES,
            f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}",
        )
        _require(self.zero_stage in (1, 2, 3), "train.zero_stage must be 1, 2 or 3")
        _require(
            self.precision in PRECISIONS,
            f"train.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _require(
            self.dcd_step_weighting in DCD_STEP_WEIGHTINGS,
            f"train.dcd_step_weighting must be one of {DCD_STEP_WEIGHTINGS}, "
            f"got {self.dcd_step_weighting!r}",
        )
        _require(self.dcd_eos_weight >= 0, "train.dcd_eos_weight must be >= 0")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        for name in ("warmup_steps", "report_every", "eval_every", "checkpoint_every",
                     "max_failures", "shuffle_buffer", "fail_at_step", "fail_rank"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0")


@dataclass
class EchoConfig:
    """The whole configuration of a run. Later stages add their sub-configs here."""

    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> EchoConfig:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        return self

    @classmethod
    def from_name(cls, name: str) -> EchoConfig:
        """A named preset (see `PRESETS`)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        return from_dict({"name": name, **PRESETS[name]})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Named presets: the differences from the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU laptop, CI and quickstart: the dataclass defaults (ModelConfig defaults are the
    # 4M-parameter model of DESIGN.md section 9), with the decoded train split cached.
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
            "freeze_vision": True,
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
        },
    },
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def from_dict(data: Mapping[str, Any], cls: type = EchoConfig) -> Any:
    """Build a config dataclass from a (nested) dict, rejecting unknown keys and wrong types."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for {cls.__name__}; allowed keys: {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields")
            kwargs[key] = from_dict(value, hint)
        else:
            kwargs[key] = _coerce(value, hint, key)
    obj = cls(**kwargs)
    if cls is EchoConfig:
        obj.validate()
    return obj


def apply_overrides(config: EchoConfig, overrides: Iterable[str]) -> EchoConfig:
    """Return a copy of `config` with `section.key=value` overrides applied and validated.

    Values are parsed to the declared field type: `true/false` for bools, comma-separated
    lists for tuples (`data.modalities=CR,DX`), `none` for optional fields.
    """
    data = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node: dict[str, Any] = data
        node_cls: type = EchoConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            known = {f.name for f in dataclasses.fields(node_cls)}
            if part not in known:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(
                    f"unknown config key {key!r}: {part!r} is not a field of {where}; "
                    f"allowed: {sorted(known)}"
                )
            hint = typing.get_type_hints(node_cls)[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.X=")
                node[part] = _parse_text(raw.strip(), hint, key)
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{'.'.join(parts[: depth + 1])!r} is not a section")
                node, node_cls = node[part], hint
    return from_dict(data)


def _parse_text(raw: str, hint: Any, key: str) -> Any:
    """Parse override text into a value of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_text(raw, inner, key)
    if origin is tuple:
        items = [s.strip() for s in raw.split(",") if s.strip()] if raw else []
        inner = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_text(s, inner, key) for s in items)
        if len(items) != len(args):
            raise ConfigError(f"{key} needs {len(args)} comma-separated values, got {raw!r}")
        return tuple(_parse_text(s, a, key) for s, a in zip(items, args, strict=True))
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(f"{key} must be {hint.__name__}, got {raw!r}") from None
    if hint is str:
        return raw
    raise ConfigError(f"{key}: cannot parse a value of type {hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a Python value against `hint` (lists become tuples; ints are accepted as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        type(value) is not hint
    ):
        raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(
    preset: str = "tiny", overrides: Iterable[str] = (), path: str | None = None
) -> EchoConfig:
    """The config a command runs with: a JSON file (e.g. a run's config.json) or a preset,
    then the overrides."""
    if path is not None:
        with open(path) as f:
            config = from_dict(json.load(f))
    else:
        config = EchoConfig.from_name(preset)
    return apply_overrides(config, overrides)
