"""The DICOM side of `echo-ray listen`: a pynetdicom AE that takes C-ECHO and C-STORE
from the calling AE titles it knows, and the C-STORE handler that spools what it is sent.

Every storage SOP class is negotiated, in every transfer syntax pydicom knows, so a node
that routes a whole study (or a non-radiograph) gets an answer per instance rather than a
refused association. The C-STORE answer:

    0x0000  success: the instance is on disk and in the ledger (`Spool.store`)
    0xA900  refused, not a radiograph: its Modality is not one of `data.modalities` (a CT,
            an MR, a Structured Report, a presentation state ...), or it has no
            StudyInstanceUID; ErrorComment says which
    0xC000  refused, cannot understand: pydicom cannot read the dataset (ErrorComment:
            the `DicomError` reason)
    0xA700  refused, out of resources: the spool could not be written (disk full ...)

Nothing is written for a refused instance, and each refusal is one log line (the reason,
the calling AE title; never a patient identifier).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from echo_ray.data.dicom import DicomError, read_header
from echo_ray.listener.spool import Spool

SUCCESS, NOT_A_RADIOGRAPH, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xA900, 0xC000, 0xA700


def _status(code: int, comment: str | None = None):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


class StoreHandler:
    """The C-STORE handler (`evt.EVT_C_STORE`): check, spool, answer (module docstring).

    Args:
        spool: where instances go.
        modalities: accepted Modality values (upper case); empty accepts every modality.
        log: one line per event.
    """

    def __init__(self, spool: Spool, modalities: Collection[str],
                 log: Callable[[str], None]) -> None:
        self.spool = spool
        self.modalities = {m.upper() for m in modalities}
        self.log = log

    def __call__(self, event):
        calling = str(event.assoc.requestor.ae_title).strip()
        data = event.encoded_dataset(include_meta=True)
        try:
            header = read_header(data)
        except DicomError as err:
            self.log(f"refused an instance from {calling}: {err.reason} (status 0xC000)")
            return _status(CANNOT_UNDERSTAND, f"cannot read the dataset: {err.reason}")
        modality = (header["modality"] or "").strip().upper()
        if self.modalities and modality not in self.modalities:
            found = f"Modality {modality}" if modality else "no Modality"
            self.log(f"refused an instance from {calling}: {found}, not a radiograph "
                     f"({'/'.join(sorted(self.modalities))}) (status 0xA900)")
            return _status(NOT_A_RADIOGRAPH, f"not a radiograph ({found})")
        study_uid = header["study_instance_uid"]
        if not study_uid:
            self.log(f"refused an instance from {calling}: no StudyInstanceUID (status 0xA900)")
            return _status(NOT_A_RADIOGRAPH, "no StudyInstanceUID")
        try:
            outcome, count = self.spool.store(study_uid, header["sop_instance_uid"], data,
                                              calling_ae=calling)
        except OSError as err:
            self.log(f"study {study_uid}: could not spool an instance from {calling} "
                     f"({type(err).__name__}: {err.strerror or err}) (status 0xA700)")
            return _status(OUT_OF_RESOURCES, "could not store the instance")
        if outcome == "late":
            self.log(f"study {study_uid}: late file from {calling} (the study is already "
                     "reported); kept in the spool, not reported again")
        elif outcome == "rearmed":
            self.log(f"study {study_uid}: new file after an error; the study will be "
                     "reported again after its quiet period")
        else:
            self.log(f"study {study_uid}: received file {count} from {calling}")
        return _status(SUCCESS)


def build_ae(ae_title: str, allowed_callers: Collection[str], handler: StoreHandler,
             log: Callable[[str], None]):
    """The pynetdicom AE (Verification + every storage SOP class, all transfer syntaxes,
    only `allowed_callers`) and its event handlers, for `AE.start_server`."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(allowed_callers)

    def rejected(event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        log(f"refused an association from calling AE title {calling!r} (not one of "
            f"--allowed-callers {','.join(allowed_callers)})")

    def echo(event) -> int:
        log(f"C-ECHO from {str(event.assoc.requestor.ae_title).strip()}")
        return SUCCESS

    handlers = [(evt.EVT_C_STORE, handler), (evt.EVT_C_ECHO, echo),
                (evt.EVT_REJECTED, rejected)]
    return ae, handlers
