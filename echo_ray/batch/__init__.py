"""batch: `echo-ray report`, the exactly-once, resumable bulk job over a DICOM archive.

- discovery.py: the archive listed and grouped into studies, the studies cut into units
- ledger.py: the part files (schema, which studies are done, the file stamps of error
  rows) and their consolidation into reports.parquet / reports.jsonl / fhir.ndjson /
  errors.parquet / errors.csv
- decoder.py: the CPU decode stage: a unit's files read, its studies prepared for the model
- actor.py: `ArchiveActor`, the model actor that reports a unit and writes its part file
- job.py: `report_archive` (the run from discovery to summary.json) and `format_summary`

May import config, runtime, text, data, model, diffusion, decode and interop. torch and the
model load only inside the actor, so the driver never imports torch.
"""
