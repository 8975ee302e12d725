"""decode: reports from a trained dVLM, for the batch jobs and the HTTP endpoint alike.

- sampler.py: `generate`, the one sampler (AR, multi-step or one-step block diffusion, fused
  or not, cached or the uncached reference, by flags) and `GenerateOutput`
- modes.py: the named decoding modes (`DECODING_MODES`) and the `generate` flags of each
- predictor.py: `ReportGenerator` (images or DICOM bytes in, report dicts out) and
  `ReportScorer` (per-report NLL under an AR model)
- studies.py: a study's files -> header reads -> the frontal view chosen -> one report or a
  typed error (`report_studies`)
- replica.py: `ModelReplica`, the start-up every model-holding process shares (threads,
  device, scratch folder, model fetch, placement, warm-up) and its loaders

May import config, data, text, model and diffusion; never a later layer, and never ray.
"""
