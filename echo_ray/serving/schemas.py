"""The HTTP API's bodies as pydantic models: what `/openapi.json` declares, and what the
tests check real responses against. Plain Python (no ray, no torch).

The ingress builds its bodies as dicts (the model replica's report dict, less internals);
`ReportBody` is their contract: `REPORT_FIELDS` are copied from the report dict,
`PHI_FIELDS` too with `include_phi`, and the ingress adds the rest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields the report body copies from the model replica's report dict, in order.
REPORT_FIELDS = (
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number",
    "study_date", "view_position", "used_file", "findings", "impression", "report",
    "sentences", "labels", "model_id", "model_version", "decoding", "num_tokens",
    "num_forwards", "tokens_per_forward", "num_files", "file_errors",
)
# ... and with `include_phi` only.
PHI_FIELDS = ("patient_name", "patient_id", "patient_birth_date", "source_file")

_CLOSED = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every error: a reason code, a message that says what to do, the request id (also the
    `x-request-id` response header)."""

    model_config = _CLOSED
    error: str = Field(description="Reason code: unauthorized, not_found, "
                       "method_not_allowed, invalid_request, unsupported_mode, bad_multipart, "
                       "too_large, too_many_files, not_acceptable, unsupported_media_type, "
                       "invalid_signoff, a DICOM or study reason (422), cannot_build_sr, "
                       "timeout, unavailable, internal.",
                       examples=["unauthorized"])
    message: str = Field(description="What was wrong and what to do.")
    request_id: str = Field(description="The same as the `x-request-id` response header.")


class FileError(BaseModel):
    """A file of the study that could not be read (the study may still be reported)."""

    model_config = _CLOSED
    file: str = Field(description='"file1", "file2", ...: the K-th uploaded file.')
    error: str = Field(description="DICOM reason: not_dicom, truncated, no_pixel_data, ...")
    message: str


class StudyErrorBody(ErrorBody):
    """422: the study could not be reported (the DICOM or study reason in `error`)."""

    file_errors: list[FileError] | None = Field(
        None, description="Each unreadable file (study errors only).")
    num_files: int | None = Field(None, description="Files in the study (study errors only).")


class Sentence(BaseModel):
    """A sentence of the report and the decoder's own confidence in it."""

    model_config = _CLOSED
    section: str = Field(description='The section the sentence is in: "findings" (also text '
                         'before any header), "impression", or another header\'s key.')
    text: str
    confidence: float = Field(ge=0, le=1, description="Geometric mean of the probabilities "
                              "the decoder gave the sentence's tokens when it committed them.")
    low_confidence: bool = Field(description="confidence < decoding.low_confidence.")


class ReportBody(BaseModel):
    """`POST /v1/reports`: the draft report of one study (also the `report` event of a
    stream)."""

    model_config = _CLOSED
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    accession_number: str | None = Field(description="(0008,0050), when the DICOM has one.")
    study_date: str | None = Field(
        description='From StudyDate/StudyTime: "YYYY-MM-DD" or "YYYY-MM-DDTHH:MM:SS".')
    view_position: str | None
    used_file: str = Field(description='The reported file: "fileK" is the K-th uploaded.')
    findings: str
    impression: str
    report: str = Field(description="The whole generated text.")
    sentences: list[Sentence] = Field(description="The report's sentences, in order.")
    labels: dict[str, float | None] = Field(
        description="The 14 CheXpert labels read from the text: 1 present, -1 uncertain, "
        "0 absent, null not mentioned.")
    model_id: str
    model_version: str
    decoding: str = Field(description="The decoding mode used.")
    num_tokens: int
    num_forwards: int
    tokens_per_forward: float
    num_files: int
    file_errors: list[FileError]
    patient_name: str | None = Field(None, description="include_phi only.")
    patient_id: str | None = Field(None, description="include_phi only.")
    patient_birth_date: str | None = Field(None, description="include_phi only.")
    source_file: str | None = Field(None, description="include_phi only: the uploaded name.")
    image_png: str | None = Field(
        None, description="preview=true: the model's input image, base64 8-bit PNG.")
    view_png: str | None = Field(
        None, description="preview=true: the reported file at up to 1024 px, aspect ratio "
        "kept, base64 8-bit grayscale PNG.")
    request_id: str
    model_latency_ms: float = Field(description="The batch's decoding.")
    latency_ms: float = Field(description="The whole request in the ingress.")
    batch_size: int = Field(description="Studies that shared the forwards.")


class Limits(BaseModel):
    model_config = _CLOSED
    max_upload_mb: float
    max_files: int
    request_timeout_s: float


class ModelInfo(BaseModel):
    """The model served and how."""

    model_config = _CLOSED
    id: str
    version: str
    default_decoding: str = Field(description="The mode of a request without `mode`.")
    modes: list[str] = Field(description="Modes a request may ask for, the default first.")
    trained_modes: list[str] = Field(description="The modes the checkpoint was trained for.")
    block_length: int
    image_size: int
    max_new_tokens: int
    max_batch_size: int
    batch_wait_timeout_s: float
    limits: Limits


class ModelList(BaseModel):
    """`GET /v1/models`."""

    model_config = _CLOSED
    data: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    model: str | None = None


class NotReady(ErrorBody):
    """`GET /readyz` while no model replica answers (503)."""

    ready: Literal[False] = False
