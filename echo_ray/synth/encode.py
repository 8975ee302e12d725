"""One rendered view -> DICOM bytes: a drawn transfer syntax, photometric interpretation, bit
depth and detector crop, and a header with the subject's fake identity and stable UIDs."""

from __future__ import annotations

from typing import Any

import numpy as np

from echo_ray.synth.dicom_writer import TRANSFER_SYNTAXES, make_uid, write_dicom
from echo_ray.synth.findings import StudySpec
from echo_ray.synth.grammar import EXAMINATION_TEXT
from echo_ray.synth.report import _exam_key
from echo_ray.synth.sampling import Subject, fake_name
from echo_ray.synth.streams import _pick, _rng, _u

# (short name, weight): lossless syntaxes dominate, as in a research export.
# (pydicom's RLE encoder is slow, ~0.1 s per 512 px image: rarer than in real archives.)
TRANSFER_SYNTAX_WEIGHTS: dict[str, float] = {
    "explicit_le": 0.32, "implicit_le": 0.14, "explicit_be": 0.03, "deflated": 0.1,
    "rle": 0.03, "jpeg_ls": 0.22, "jpeg2000_lossless": 0.12, "jpeg2000": 0.04,
}
BITS_STORED_WEIGHTS: dict[int, float] = {12: 0.55, 16: 0.2, 14: 0.12, 10: 0.1, 8: 0.03}

_INSTITUTIONS = ("Saint Varlo Hospital", "Menet General", "Ravenoak Medical Center",
                 "Quindel University Hospital")


def encode_view(pixels: np.ndarray, spec: StudySpec, subject: Subject, view: str,
                view_index: int, dicom_id: str) -> tuple[bytes, dict[str, Any]]:
    """Encode one rendered view as DICOM with a drawn syntax / photometric / bit depth.

    Returns the bytes and the encoding facts (for metadata.csv and the summary).
    """
    rng = _rng(spec.seed, "dicom", spec.index, view_index)
    study_rng = _rng(spec.seed, "header", spec.index)  # shared by the study's images
    names = [n for n in TRANSFER_SYNTAX_WEIGHTS if n in TRANSFER_SYNTAXES]
    ts = _pick(rng, names, [TRANSFER_SYNTAX_WEIGHTS[n] for n in names])
    bits = int(_pick(rng, list(BITS_STORED_WEIGHTS), list(BITS_STORED_WEIGHTS.values())))
    modality = "CR" if rng.random() < (0.5 if view == "AP" else 0.25) else "DX"
    photometric = "MONOCHROME1" if rng.random() < (0.45 if modality == "CR" else 0.15) else \
        "MONOCHROME2"
    maxval = 2**bits - 1
    lo = _u(rng, 0.0, 0.08) * maxval
    hi = _u(rng, 0.85, 1.0) * maxval
    values = np.rint(lo + pixels.astype(np.float64) * (hi - lo))
    if photometric == "MONOCHROME1":
        values = maxval - values
    values = values.astype(np.uint8 if bits <= 8 else np.uint16)
    rows, cols = values.shape
    if rng.random() < 0.15:  # some detectors are not square: crop columns
        cols = int(cols * _u(rng, 0.8, 0.95)) // 2 * 2
        off = (values.shape[1] - cols) // 2
        values = np.ascontiguousarray(values[:, off:off + cols])
    attrs: dict[str, Any] = {
        "PatientName": subject.name,
        "PatientID": subject.patient_id,
        "PatientBirthDate": subject.birth_date,
        "PatientSex": spec.sex,
        "PatientAge": f"{spec.age:03d}Y",
        "StudyInstanceUID": make_uid("echo-ray-synth", spec.seed, "study", spec.study_id),
        "SeriesInstanceUID": make_uid("echo-ray-synth", spec.seed, "series", spec.study_id,
                                      view_index),
        "SOPInstanceUID": make_uid("echo-ray-synth", spec.seed, "sop", dicom_id),
        "StudyDate": spec.study_date,
        "SeriesDate": spec.study_date,
        "StudyTime": spec.study_time,
        "AccessionNumber": f"{int(study_rng.integers(10**7, 10**8))}",
        "StudyID": str(spec.study_id),
        "SeriesNumber": view_index + 1,
        "InstanceNumber": 1,
        "Modality": modality,
        "ViewPosition": view,
        "StudyDescription": EXAMINATION_TEXT[_exam_key(spec.views)],
        "SeriesDescription": {"PA": "CHEST PA", "AP": "CHEST AP PORTABLE", "LATERAL": "CHEST LAT",
                              "LL": "CHEST LAT"}[view],
        "InstitutionName": _pick(study_rng, _INSTITUTIONS),
        "ReferringPhysicianName": fake_name(study_rng),
        "Manufacturer": _pick(study_rng, ("Phantom Imaging", "Synthex", "Varlo Medical")),
        "PixelSpacing": [round(380.0 / rows, 4), round(380.0 / rows, 4)],
        "PatientOrientation": ["L", "F"] if view in ("PA", "AP") else ["A", "F"],
    }
    if rng.random() < 0.5:  # a window covering the data, as modalities write
        span = float(values.max()) - float(values.min())
        attrs["WindowCenter"] = round(float(values.min()) + span * _u(rng, 0.45, 0.55), 1)
        attrs["WindowWidth"] = round(span * _u(rng, 1.0, 1.15) + 1, 1)
    if rng.random() < 0.3:
        intercept = _pick(rng, (0.0, -1024.0, -512.0))
        attrs["RescaleSlope"] = 1.0
        attrs["RescaleIntercept"] = intercept
        attrs["RescaleType"] = "US"
        if "WindowCenter" in attrs:
            attrs["WindowCenter"] = round(attrs["WindowCenter"] + intercept, 1)
    data = write_dicom(values, transfer_syntax=ts, photometric=photometric, bits_stored=bits,
                       attrs=attrs)
    facts = {"TransferSyntax": ts, "PhotometricInterpretation": photometric,
             "BitsStored": bits, "Modality": modality, "Rows": rows, "Columns": cols}
    return data, facts
