"""serving: the Ray Serve HTTP report endpoint (`echo-ray serve`, `serve_config.yaml`).

- options.py: the app's `args` read into the config tree (`AppArgs`), the API keys, and
  `served_modes` (the decoding modes a server offers)
- decoder.py: `StudyDecoder`, the autoscaled CPU replicas that decode a study's DICOM files
  to the model's grid (and encode the preview PNGs) before the model sees it
- model.py: `ReportModel`, the batched, autoscaled model replicas (prepared studies only)
- ingress.py: `ReportAPI`, the FastAPI ingress: auth, limits, uploads, routes, errors,
  `/docs` with local Swagger UI files
- schemas.py: the API's bodies as pydantic models (the OpenAPI schema's)
- app.py: `build_app`, the Serve application both make (`import_path` of serve_config.yaml)
- review_page.html: the upload-and-review page served at `/`

May import config, runtime, text, data, model, diffusion, decode and interop. Nothing here
works at import time, and ingress.py and decoder.py (with options.py, schemas.py and page.py)
import neither torch nor transformers: the ingress replica only parses and routes, the
decoder replicas only read DICOM (numpy, pydicom, Pillow).
"""
