"""A study (one or more DICOM files of one examination) in, one report or one error out.

The HTTP endpoint (`serve.py`) and the bulk archive job (`archive.py`) both go through
`report_studies`, so a study gives the same report, the same fields and the same error
reasons whichever way it came in. Plain numpy/torch: no Ray here.

Which image is reported: the model takes one image, so the frontal view is chosen, PA before
AP before a view the header does not name (ViewPosition absent or unusual); lateral views
are never reported on their own (a study with only laterals is a `no_frontal_view` error).
Headers are read first (cheap, no pixels); the best candidate is decoded, and when its
pixels are broken the next candidate is tried.

Two halves, so the DICOM work can run on CPU processes apart from the model
(docs/ARCHITECTURE.md section 1.3): `prepare_study` (numpy + pydicom, no torch: read the
headers, choose the view, decode and resize it to the model's grid) gives a
`PreparedStudy`; `report_prepared` runs the model on a batch of them. `report_studies` is
both in one process.

A study result is the `ReportGenerator` report dict plus:

    study_id          the caller's key (the archive's folder or UID, the request's id)
    view_position     of the reported image
    source_file       the reported file's name
    num_files         files in the study
    file_errors       [{file, error, message}] for files that could not be read
    image             with `with_image`: the model's input
    view              with `with_view`: the reported file at up to `VIEW_SIZE` px (aspect
                      ratio kept) for a reader to look at (`view_image`)

or, when no report could be written, `{study_id, study_instance_uid, error, message,
num_files, file_errors}` with `error` one of `STUDY_ERROR_REASONS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from echo_ray.data.dicom import (
    DICOM_ERROR_REASONS,
    DicomError,
    decode_dicom,
    header_bytes,
    read_header,
)
from echo_ray.runtime.cluster import peak_rss_kib

# ViewPosition values (DICOM PS3.3 C.8.11.5) and their spelled-out variants that are
# lateral projections: decubitus and cross-table views included.
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "XTABLE"})
_FRONTAL_RANK = {"PA": 0, "AP": 1}
_UNNAMED_RANK = 2
# Longest side of the `view` a reader looks at (zoomable; the model reads `image_size`).
VIEW_SIZE = 1024

STUDY_ERROR_REASONS = (
    *DICOM_ERROR_REASONS,
    "no_files",  # the study has no file at all
    "no_usable_image",  # every file failed, for different reasons (see file_errors)
    "mixed_studies",  # the files carry more than one StudyInstanceUID
    "no_frontal_view",  # only lateral views: the model reports on a frontal image
)


def view_rank(view: str | None) -> int | None:
    """Preference of a ViewPosition: 0 PA, 1 AP, 2 unnamed/other; None for laterals."""
    name = (view or "").strip().upper()
    if name in LATERAL_VIEWS:
        return None
    return _FRONTAL_RANK.get(name, _UNNAMED_RANK)


@dataclass
class PreparedStudy:
    """A study after reading its files: the chosen image, or the reason there is none."""

    study_id: str | None
    num_files: int
    image: np.ndarray | None = None
    meta: dict | None = None
    source_file: str | None = None
    source_data: bytes | None = None
    file_errors: list[dict] = field(default_factory=list)
    error: str | None = None
    message: str | None = None
    study_instance_uid: str | None = None
    view: np.ndarray | None = None
    # With `keep_header`: the chosen file's header (`data.dicom.header_bytes`, no pixels),
    # for a Structured Report about it. Holds patient identifiers: never logged or written.
    source_header: bytes | None = None

    def shipped(self) -> PreparedStudy:
        """This study without the chosen file's bytes: what a decode stage hands the model
        (the model's `image` and, when asked for, the reader's `view`, not the DICOM)."""
        return replace(self, source_data=None)

    def error_row(self) -> dict:
        return {
            "study_id": self.study_id,
            "study_instance_uid": self.study_instance_uid,
            "error": self.error,
            "message": self.message,
            "num_files": self.num_files,
            "file_errors": self.file_errors,
        }


def prepare_study(
    files: Sequence[tuple[str, bytes]],
    *,
    size: int,
    study_id: str | None = None,
    modalities=None,
    include_phi: bool = False,
    with_view: bool = False,
    keep_header: bool = False,
) -> PreparedStudy:
    """Read a study's files and decode the one to report on (see the module docstring).

    Args:
        files: (name, bytes) per file; the name only labels errors and `source_file`.
        size: the model's image side.
        modalities: accepted DICOM Modality values (None: any), as `decode_dicom`.
        with_view: also decode the reader's `view` of the chosen file (`view_image`).
        keep_header: keep the chosen file's header (`source_header`), which
            `PreparedStudy.shipped` keeps: what a DICOM Structured Report needs.
    """
    study = PreparedStudy(study_id=study_id, num_files=len(files))
    if not files:
        study.error, study.message = "no_files", "the study has no DICOM file"
        return study

    def fail(name: str, err: DicomError) -> None:
        study.file_errors.append({"file": name, "error": err.reason, "message": str(err)})

    candidates, uids, laterals = [], set(), 0
    for order, (name, data) in enumerate(files):
        try:
            header = read_header(data)
        except DicomError as err:
            fail(name, err)
            continue
        if header["study_instance_uid"]:
            uids.add(header["study_instance_uid"])
        rank = view_rank(header["view_position"])
        if rank is None:
            laterals += 1
        else:
            candidates.append((rank, order, name, data))
    if len(uids) > 1:
        study.error = "mixed_studies"
        study.message = (
            f"the files belong to {len(uids)} different studies (StudyInstanceUID); send "
            "one study per request"
        )
        return study
    study.study_instance_uid = next(iter(uids), None)
    for _, _, name, data in sorted(candidates):
        try:
            image = decode_dicom(data, size=size, modalities=modalities, include_phi=include_phi)
        except DicomError as err:
            fail(name, err)
            continue
        study.image, study.meta, study.source_file = image.pixels, image.meta, name
        study.source_data = data
        if keep_header:
            study.source_header = header_bytes(data)
        if with_view:
            study.view = view_image(data, modalities=modalities)
        return study
    if laterals and not candidates:
        study.error = "no_frontal_view"
        study.message = (
            f"the study has only lateral views ({laterals}); the model reports on a frontal "
            "(PA or AP) image"
        )
    else:
        reasons = sorted({e["error"] for e in study.file_errors})
        study.error = reasons[0] if len(reasons) == 1 else "no_usable_image"
        first = study.file_errors[0]["message"]
        study.message = (
            first
            if len(study.file_errors) == 1
            else f"none of the {len(study.file_errors)} files could be used "
            f"({', '.join(reasons)}); first: {first}"
        )
    return study


def report_studies(
    generator,
    studies: Sequence[Sequence[tuple[str, bytes]]],
    *,
    study_ids: Sequence[str | None] | None = None,
    decoding: str | None = None,
    with_image: bool = False,
    with_view: bool = False,
    on_text=None,
) -> list[dict]:
    """One result per study, in order: a report dict or an error row (module docstring):
    `prepare_study` on each, then `report_prepared` on all of them, in this process.

    Args:
        generator: a `predictor.ReportGenerator`.
        decoding: this call's decoding mode (default: the generator's).
        with_image: add "image", the model's input (float32 `(S, S)` in [0, 1]), to reports.
        with_view: add "view", the reported file at up to `VIEW_SIZE` px (`view_image`;
            a second decode of the file, so only when a reader will look at it).
        on_text: streaming, as `ReportGenerator.generate` (texts of the studies with an
            image, in order).
    """
    ids = list(study_ids) if study_ids is not None else [None] * len(studies)
    if len(ids) != len(studies):
        raise ValueError(f"{len(studies)} studies but {len(ids)} study ids")
    prepared = [
        prepare_study(
            files,
            size=generator.model.config.image_size,
            study_id=sid,
            modalities=generator.modalities,
            include_phi=generator.include_phi,
            with_view=with_view,
        )
        for files, sid in zip(studies, ids, strict=True)
    ]
    return report_prepared(generator, prepared, decoding=decoding, with_image=with_image,
                           on_text=on_text)


def report_prepared(
    generator,
    prepared: Sequence[PreparedStudy],
    *,
    decoding: str | None = None,
    with_image: bool = False,
    on_text=None,
) -> list[dict]:
    """The model half: one result per prepared study, in order. Every study with an image
    is decoded in one `generator.generate` call (one batch); a study prepared with an error
    gives its error row. A study's `view`, when it was prepared with one, is added as
    "view".

    Raises:
        ValueError: an image is not the generator's `(S, S)` grid (prepared for another
            model).
    """
    size = generator.model.config.image_size
    good = [p for p in prepared if p.error is None]
    for p in good:
        if p.image.shape != (size, size):
            raise ValueError(f"study {p.study_id}: image {p.image.shape} prepared for another "
                             f"model; this one reads ({size}, {size})")
    reports = iter(
        generator.generate(
            [p.image for p in good], [p.meta for p in good], decoding=decoding, on_text=on_text
        )
    )
    results = []
    for p in prepared:
        if p.error is not None:
            results.append(p.error_row())
            continue
        report = next(reports)
        results.append(
            {
                "study_id": p.study_id,
                **report,
                "view_position": p.meta.get("view_position"),
                "source_file": p.source_file,
                "num_files": p.num_files,
                "file_errors": p.file_errors,
            }
        )
        if with_image:
            results[-1]["image"] = p.image
        if p.view is not None:
            results[-1]["view"] = p.view
    return results


def view_image(data: bytes, *, size: int = VIEW_SIZE, modalities=None) -> np.ndarray:
    """A DICOM file's image for a reader: the model's decoding (VOI LUT, MONOCHROME1
    inverted, float32 in [0, 1]) at its own aspect ratio, longest side at most `size`
    (area-averaged down, never up, never letterboxed)."""
    from PIL import Image

    pixels = decode_dicom(data, size=None, modalities=modalities).pixels
    h, w = pixels.shape
    scale = size / max(h, w)
    if scale >= 1:
        return pixels
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(new, Image.Resampling.BOX), np.float32)


def decode_images(batch: pa.Table, *, size: int, modalities=None,
                  include_phi: bool = False) -> pa.Table:
    """The CPU decode stage of evaluation and trajectories (a Ray Data task; numpy and
    pydicom, no torch): each row's `dicom` decoded to the model's `(size, size)` grid, as
    `ReportGenerator.decode_dicoms` does (docs/ARCHITECTURE.md section 1.3).

    Returns:
        The batch without its `dicom` column, plus `image` (float32 `(size, size)` as bytes,
        `image_from_bytes`; null when the file does not decode), `decode_error` /
        `decode_message` (the `DicomError`'s reason and message) and `decode_rss_kb` (this
        process's peak RSS, KiB).
    """
    images, reasons, messages = [], [], []
    for blob in batch.column("dicom").to_pylist():
        try:
            image = decode_dicom(blob, size=size, modalities=modalities, include_phi=include_phi)
        except DicomError as err:
            images.append(None)
            reasons.append(err.reason)
            messages.append(str(err))
            continue
        images.append(np.ascontiguousarray(image.pixels, np.float32).tobytes())
        reasons.append(None)
        messages.append(None)
    return (batch.drop_columns(["dicom"])
            .append_column("image", pa.array(images, pa.binary()))
            .append_column("decode_error", pa.array(reasons, pa.string()))
            .append_column("decode_message", pa.array(messages, pa.string()))
            .append_column("decode_rss_kb",
                           pa.array([peak_rss_kib()] * batch.num_rows, pa.int64())))


def image_from_bytes(blob: bytes, size: int) -> np.ndarray:
    """An image of `decode_images` back as float32 `(size, size)` (read-only, no copy).

    Raises:
        ValueError: the bytes are not a `(size, size)` image (decoded for another model).
    """
    if len(blob) != 4 * size * size:
        raise ValueError(f"an image of {len(blob)} bytes was decoded for another model; "
                         f"this one reads float32 ({size}, {size})")
    return np.frombuffer(blob, np.float32).reshape(size, size)
