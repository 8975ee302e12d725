"""listener: `echo-ray listen`, a DICOM node. A pynetdicom C-STORE and C-ECHO SCP takes the
studies a PACS or a modality routes to it into a spool folder, reports each study once no
file of it has arrived for a quiet period (one model in this process, the same
`decode.studies` halves as every other path), writes its DICOM Structured Report and sends
it on (C-STORE or STOW-RS), with a persistent ledger in the spool folder so that a restart
loses nothing and reports nothing twice.

May import config, runtime, text, data, model, diffusion, decode and interop; no ray.
"""
