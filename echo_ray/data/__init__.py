"""Data: where studies come from and how they become training input.

- storage.py: `Location`, one API over local folders and s3:// (pyarrow filesystems).
- dicom.py: DICOM decoding with typed error reasons (transfer syntaxes, LUTs, windowing,
  MONOCHROME1, multi-frame) and header reads that keep patient identifiers out.
- layout.py: archive layouts (MIMIC-CXR tree and CSV tables, or a flat folder of .dcm).
- shards.py: the DICOM shards format: names, schemas, reading shards back.
- prepare.py: `echo-ray prepare`, the Ray Data job archive -> shards + tokenizer + manifest.
- ingest.py: shards -> decoded, tokenized rows streamed into Ray Train workers.

May import config, runtime and text. storage.py, dicom.py, layout.py and shards.py import no
ray (the model and decoding layers use them).
"""
