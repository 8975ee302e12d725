"""A model replica: what every process that holds a model does first, whoever hosts it.

The Serve model deployment, the bulk job's actors, the evaluation actors and the trajectory
teachers all start the same way: torch threads set, transformers' load-time progress bars
and info logs off (noise in job logs), a device chosen, a scratch folder of their own, the
model directory fetched there when it lives on S3, the model placed (`place_model`), and a
warm-up decode so one-off costs do not land on the first real batch. `ModelReplica` is that
start-up, once. Plain torch: the hosts are Ray actors, but this module imports no ray.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from echo_ray.config.schema import DecodingConfig, ModelConfig
from echo_ray.data.storage import Location, local_model_dir


class ModelReplica:
    """The process-wide set-up of one model replica, and the loaders that use it.

    Args:
        threads: torch intra-op threads; 0: one per CPU the host reserved (`cpus`), at
            least 1.
        cpus: logical CPUs the host reserved (for `threads=0`).
        use_gpu: place models on CUDA when a GPU is visible.
        name: prefix of the scratch folder (e.g. "report", "eval", "teacher").
    """

    def __init__(self, *, threads: int = 0, cpus: float = 1.0, use_gpu: bool = False,
                 name: str = "model") -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        torch.set_num_threads(threads or max(1, int(cpus)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.scratch = tempfile.mkdtemp(prefix=f"echo-{name}-")

    def fetch(self, model: Location, name: str = "model") -> str:
        """A local path of model directory `model`: itself on local disk, else a copy in this
        replica's scratch folder (replicas on one node never write the same files)."""
        return local_model_dir(model, os.path.join(self.scratch, name))

    def generator(self, model: Location, decoding: DecodingConfig, *, warm_up: int = 1,
                  plain_model: ModelConfig | None = None, **kwargs: Any):
        """A `ReportGenerator` of `model`, decoding as `decoding` says, placed on this
        replica's device and warmed up on `warm_up` blank images (0: no warm-up).

        Args:
            plain_model: the model section of a plain Hugging Face folder (zero-shot).
            kwargs: further `ReportGenerator` arguments (model_id, include_phi, modalities).
        """
        from echo_ray.decode.predictor import ReportGenerator

        generator = ReportGenerator.from_checkpoint(
            self.fetch(model), plain_model=plain_model, decoding=decoding.mode,
            steps=decoding.steps,
            threshold=decoding.threshold, max_new_tokens=decoding.max_new_tokens,
            low_confidence=decoding.low_confidence, **kwargs,
        ).to(self.device)
        if warm_up:
            generator.warm_up(warm_up)
        return generator

    def scorer(self, model: Location, plain_model: ModelConfig | None = None):
        """A `ReportScorer` (fluency NLL under an AR model) on this replica's device."""
        from echo_ray.decode.predictor import ReportScorer

        return ReportScorer.from_checkpoint(
            self.fetch(model, "scorer"), plain_model=plain_model
        ).to(self.device)

    def model(self, model: Location):
        """The bare `EchoDVLM` of `model`, placed for inference (eval mode)."""
        from echo_ray.decode.predictor import place_model
        from echo_ray.model.checkpoint import load_checkpoint

        loaded, _ = load_checkpoint(self.fetch(model))
        return place_model(loaded, self.device).eval()
