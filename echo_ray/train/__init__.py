"""train: `echo-ray train`, the AR, RAD and DCD stages on Ray Train.

- driver.py: `train` (Ray Data inputs, the TorchTrainer, export of the final model) and
  `TrainResult`
- worker.py: `train_worker`, the per-rank loop: model, DDP / DeepSpeed, steps, validation,
  metrics.jsonl, checkpoints and resumption
- objectives.py: `Objective` (the stage's loss as one module), `lr_lambda` (warm-up +
  cosine learning-rate schedule), `vision_frozen` (the one freezing decision),
  `training_attention` (`train.attention` on a device) and `set_up_for_training` (freezing
  and activation checkpointing)

May import the layers below it: config, runtime, text, data, model, diffusion, decode,
interop and distill (not eval, serving or batch, which share its layer).
"""
