"""DeepSpeed set-up of a training worker, without Ray (the training-memory bench runs it on a
bare GPU machine): the DeepSpeed config of a run, and ZeRO-3's partitioned model, built
(`partitioned_construction` + `initialize_partitioned`) or loaded (`partitioned_loading`) so
that no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from echo_ray.config.schema import TrainConfig


@contextlib.contextmanager
def partitioned_construction(zero3: dict[str, Any]) -> Iterator[None]:
    """Modules constructed inside are partitioned as soon as they exist (`deepspeed.zero.Init`
    with `zero3`, the run's DeepSpeed config) and left uninitialised: transformers' own recipe
    (`PreTrainedModel._from_config` under ZeRO-3). Follow with `initialize_partitioned`."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(
        config_dict_or_path=zero3
    ):
        yield


def initialize_partitioned(model, seed: int) -> None:
    """Initialise a model built under `partitioned_construction` as transformers would, module
    by module (each gathered to rank 0, initialised, partitioned again), then tie weights."""
    from transformers.integrations.deepspeed import initialize_weights_zero3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        initialize_weights_zero3(model.backbone)
    model.backbone.tie_weights()


class _HfZero3Config:
    """What transformers' DeepSpeed integration reads of its registered `HfDeepSpeedConfig`
    (`is_zero3()`, `config`); that class itself requires accelerate, which is not installed
    here."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def partitioned_loading(zero3: dict[str, Any] | None):
    """ZeRO-3 (`zero3` = the DeepSpeed config): `from_pretrained` builds the model under
    `deepspeed.zero.Init` and rank 0 reads each layer's weights into its partitions, so no
    rank ever holds the whole model. Other strategies: nothing changes."""
    if zero3 is None:
        yield
        return
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    registered = _HfZero3Config(zero3)  # transformers keeps a weak reference
    set_hf_deepspeed_config(registered)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def deepspeed_config(tcfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run (also what ZeRO-3 builds the model under). Sets the
    CPU accelerator for CPU workers: DeepSpeed reads it when first imported."""
    if not tcfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return {
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": {"stage": tcfg.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
