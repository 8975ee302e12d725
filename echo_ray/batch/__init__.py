"""batch: `echo-ray report`, the exactly-once, resumable bulk job over a DICOM archive.

- sources.py: where the studies come from: a folder / S3 prefix or a PACS over DICOMweb
  (`ArchiveSource`: `discover` the studies to report, `read` one file)
- discovery.py: the archive listed and grouped into studies (a folder's files, or a
  DICOMweb archive's CR/DX instances by QIDO-RS), the studies cut into units
- ledger.py: the part files (schema, which studies are done, the file stamps of error
  rows) and their consolidation into reports.parquet / reports.jsonl / fhir.ndjson /
  errors.parquet / errors.csv
- decoder.py: the CPU decode stage: a unit's files read, its studies prepared for the model
- actor.py: `ArchiveActor`, the model actor that reports a unit, builds, writes and
  stores each report's DICOM SR (`--sr`, `--store-sr`) and writes the unit's part file
- job.py: `report_archive` (the run from discovery to summary.json) and `format_summary`

May import config, runtime, text, data, model, diffusion, decode and interop. torch and the
model load only inside the actor, so the driver never imports torch.
"""
