"""serving: the Ray Serve HTTP report endpoint (`echo-ray serve`, `serve_config.yaml`).

- options.py: `ServeOptions` (the app's `args`) and the API keys (loaded, digested)
- model.py: `ReportModel`, the batched, autoscaled model replicas (+ the preview PNG)
- ingress.py: `ReportAPI`, the FastAPI ingress: auth, limits, uploads, routes, errors
- app.py: `build_app`, the Serve application both make (`import_path` of serve_config.yaml)
- review_page.html: the upload-and-review page served at `/`

May import config, data, text, model, diffusion, decode, interop and runtime. Nothing here
works at import time, and ingress.py (with options.py) imports neither torch nor
transformers: the ingress replica only parses and routes.
"""
