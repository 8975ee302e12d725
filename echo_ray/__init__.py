"""echo-ray: one-step block-diffusion chest X-ray report generation on Ray."""

__version__ = "0.1.0"
