"""eval: `echo-ray evaluate`, quality and speed of several systems on one split.

- label_metrics.py: CheXpert label F1 (clinical efficacy): `label_f1`, `majority_baseline`,
  `labels_from_vectors`, `format_f1_table`, `UNCERTAIN_POLICIES`, and the same F1s on
  bootstrap resamples (`positive_matrix`, `resampled_label_f1`, `f1_from_counts`)
- text_metrics.py: SemScore (and its offline sentence encoder), ROUGE-L, BLEU-4, perplexity,
  RaTEScore, the known-sentence rate (and their per-report forms for the bootstrap);
  `MetricUnavailable` for what cannot run here
- scoring.py: `score_systems` (every system's figures from its report rows), `speed_figures`,
  the train split's sentences and labels (`training_reference`), `RESULT_KEYS`
- bootstrap.py: 95% bootstrap intervals of every quality figure (`intervals`) and paired
  differences between systems (`paired_difference`), vectorized over resamples from
  per-row scores (`RowScores`)
- tables.py: the results table and results.md (with the intervals: `format_intervals`), the
  quality-vs-speed plot, `write_outputs`
- systems.py: `System`, one evaluated system (the `--system NAME=PATH:MODE` spec)
- job.py: `evaluate` (the Ray Data batch inference over an actor pool per system, under the
  config's evaluate, pool and decoding sections)

May import the layers below it: config, runtime, text, data, model, diffusion, decode,
interop and distill (not train, serving or batch, which share its layer). The two metric
modules and bootstrap.py import neither ray nor torch at import time (the metrics' libraries
load lazily).
"""
