"""model: the dVLM around Hugging Face Qwen2.5-VL, and its files on disk.

- dvlm.py: `EchoDVLM` (architecture only: fixed image grid and prompt, image preprocessing,
  one forward with an explicit mask and explicit M-RoPE positions) and `PatchProjection`
- attention.py: the "echo_ray" attention function registered with transformers: SDPA for a
  4D bool mask (exactly "sdpa"), flex attention for a `BlockMask`, causal SDPA for "causal"
- prompt.py: `render_prompt_ids`, the fixed prompt from the checkpoint's chat template
  (built from shapes: the simple vision-tokens-then-instruction layout)
- hf.py: the Hugging Face compatibility shims in one place: `hf_config` (a Qwen2.5-VL
  config from a `ModelConfig`), `build_model`, `load_pretrained` (a local HF folder, its
  chat template and preprocessor_config.json), `add_mask_token`
- checkpoint.py: `save_checkpoint` / `load_checkpoint` / `load_config`, a plain HF model
  folder plus the tokenizer, chat template, preprocessor_config.json and the run's
  `echo_config.json`; a plain HF folder loads zero-shot
- folder.py (torch-free): `check_hf_model_folder` (the CLI's up-front check of a plain HF
  folder), preprocessor_config.json read and written
- cpu_kernels.py: `PackedLinear`, prepacked linear layers for CPU decoding

May import config and text (the tokenizer's special tokens); never diffusion, decode or any
later layer, and never ray.
"""
