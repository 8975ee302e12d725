"""model: the dVLM around Hugging Face Qwen2.5-VL, and its files on disk.

- dvlm.py: `EchoDVLM` (architecture only: fixed image grid and prompt, image preprocessing,
  one forward with an explicit 4D mask and explicit M-RoPE positions) and `PatchProjection`
- hf.py: the Hugging Face compatibility shims in one place: `hf_config` (a Qwen2.5-VL
  config from a `ModelConfig`), `build_model`, `load_pretrained` (a local HF folder),
  `add_mask_token`
- checkpoint.py: `save_checkpoint` / `load_checkpoint` / `load_config`, a plain HF model
  folder plus the tokenizer and the run's `echo_config.json`
- cpu_kernels.py: `PackedLinear`, prepacked linear layers for CPU decoding

May import config and text (the tokenizer's special tokens); never diffusion, decode or any
later layer, and never ray.
"""
