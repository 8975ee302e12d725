"""`StudyDecoder`, the CPU deployment between the ingress and the model replicas.

It turns one uploaded study (its DICOM files) into what the model reads: the headers read,
the frontal view chosen, its pixels decoded and resized to the model's grid
(`decode.studies.prepare_study`), the DICOM bytes dropped (`PreparedStudy.shipped`). With
a preview it also encodes the review page's PNGs here: the model's input as `image_png`
and the reader's view of the file as `view_png`, so the model replica neither decodes a
DICOM nor encodes an image. When the client asks for a DICOM SR, it also hands the
ingress the reported file's header (`DecodedStudy.source_header`), never the model.
Decoding a 2,560 px compressed radiograph takes up to a second of one core, so this
deployment scales on its own (autoscaling on its ongoing requests, one logical CPU per
replica by default) while the model replicas only run the model.

Imports numpy, pydicom and Pillow only: no torch, no transformers.
"""

import asyncio
import base64
import io
from dataclasses import dataclass, field, replace

import numpy as np
from ray import serve

from echo_ray.decode.studies import PreparedStudy, prepare_study
from echo_ray.serving.options import AppArgs

DECODER_DEPLOYMENT = "StudyDecoder"


@dataclass(frozen=True)
class DecodedStudy:
    """What the decoder hands the ingress for one request."""

    study: PreparedStudy
    """The study as the model reads it: the image at the model's grid and its metadata, or
    the error; never the DICOM bytes, never the reader's view."""
    pngs: dict[str, str] = field(default_factory=dict)
    """With a preview and no error: {"image_png", "view_png"}, base64 PNGs."""
    source_header: bytes | None = None
    """With `keep_header` and no error: the reported file's header (no pixels), for the
    DICOM SR the ingress builds. Holds patient identifiers: never logged, never in a JSON
    body, and never sent on to the model replica (`study` does not carry it)."""


@serve.deployment(name=DECODER_DEPLOYMENT)
class StudyDecoder:
    """DICOM files in, a `DecodedStudy` out (module docstring)."""

    def __init__(self, options: dict) -> None:
        args = AppArgs.parse(options)
        self.modalities = args.modalities
        self.include_phi = args.serve.include_phi

    async def prepare(self, files: list[tuple[str, bytes]], size: int,
                      preview: bool = False, keep_header: bool = False) -> DecodedStudy:
        """Decode a study for a model reading `size` x `size` images (`ReportModel.info`'s
        `image_size`). A study that cannot be reported comes back with its `error` set.
        `keep_header`: also return the reported file's header (`DecodedStudy.source_header`,
        what a DICOM SR of the draft needs)."""
        return await asyncio.to_thread(self._prepare, files, size, preview, keep_header)

    def _prepare(self, files, size: int, preview: bool, keep_header: bool) -> DecodedStudy:
        study = prepare_study(files, size=size, modalities=self.modalities,
                              include_phi=self.include_phi, with_view=preview,
                              keep_header=keep_header)
        header = study.source_header if study.error is None else None
        shipped = replace(study.shipped(), source_header=None)  # the model needs no header
        if study.error is not None or not preview:
            return DecodedStudy(shipped, source_header=header)
        pngs = {"image_png": png_base64(study.image), "view_png": png_base64(study.view)}
        return DecodedStudy(replace(shipped, view=None), pngs, source_header=header)


def png_base64(image: np.ndarray) -> str:
    """A float image in [0, 1] as a base64 8-bit grey PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
