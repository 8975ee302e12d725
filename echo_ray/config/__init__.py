"""The config tree: every option a user can set, its default written once.

- schema.py: the typed sections (data, tokenizer, model, train, decoding, pool,
  trajectories, evaluate, report, serve) and the allowed values of enumerated options.
- presets.py: named whole configurations (`tiny`, `base-7b`).
- overrides.py: building a config from a dict or JSON file, `--set key=value` overrides.
- flags.py: CLI flags declared from config fields (type, default and help from the field).

The lowest layer: imports nothing else of echo_ray (standard library only).
"""
