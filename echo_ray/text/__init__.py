"""Report text: structure, labels, normalization and tokenization.

- labels: the CheXpert label set and values, the label hierarchy, the report regions.
- sections: MIMIC-CXR section parsing, findings_text, split_sentences.
- mentions: the labeler's phrase tables (what names each observation, and where it is filed).
- labeler: label_report, the rule-based CheXpert-style labeler (the clinical metric).
- normalizer: normalize_report, the ECHO normalization (every region stated, in order).
- tokenizer: the byte-level BPE report tokenizer.

Imports nothing of echo_ray outside text. All modules but tokenizer are plain Python (no
torch, no ray); tokenizer uses tokenizers / transformers.
"""
