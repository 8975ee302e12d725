"""diffusion: the block-diffusion math, with shape comments; no sampling, no training loop.

- masks.py: `attention_mask` of every sequence layout (`LAYOUTS`: causal, block, rad,
  full_copy), built from named sub-masks
- noise.py: `pad_responses` (reports padded to whole blocks) and `noise_response` (block-wise
  masking, `Noised`)
- losses.py: `rad_loss` and `ar_loss` on logits, `build_layout` (a layout's model inputs), and
  through the model `compute_rad_loss`, `compute_ar_loss`, `ar_report_nll`
- dcd.py: Direct Conditional Distillation, `dcd_loss` and `compute_dcd_loss`

May import config and model; never decode or any later layer, and never ray.
"""
