"""Distillation data: the RAD teacher's rollouts that DCD trains the one-step student on.

- records.py: per-position trajectory records of a multi-step decode (committed token, the
  step that committed it, the teacher's top-k distribution then), the degenerate-rollout
  filter, and collating records into DCD training targets.
- rollout.py: `echo-ray trajectories`, the Ray Data batch-inference job (an actor pool of
  teacher replicas) that writes them as Parquet shards with a manifest.

May import everything below it (config, runtime, text, data, model, diffusion, decode);
train imports records.py.
"""
