"""C-STORE of DICOM instances to a DICOM node (pynetdicom SCU): how a Structured Report
reaches a PACS that speaks DIMSE rather than DICOMweb.

A destination is written `dimse://AE_TITLE@HOST:PORT` (the called AE title, the node's
host and DICOM port). `send_instances` opens one association per call, proposes for each
SOP class among the instances each of their own transfer syntaxes plus explicit and
implicit VR little endian (what every node accepts; an uncompressed instance is sent in
whichever the peer took), C-STOREs each instance and releases. Anything short of success for every
instance (association refused or aborted, a context the peer rejected, a failure status)
raises `DimseError` with one line that names the peer and the status, never a patient
identifier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from io import BytesIO

DIMSE_SCHEME = "dimse://"
_URI = re.compile(r"^dimse://(?P<ae>[^@/]{1,16})@(?P<host>[^:/@]+|\[[0-9a-fA-F:]+\]):"
                  r"(?P<port>[0-9]{1,5})/?$")
# Seconds to wait for the association and for each DIMSE answer.
TIMEOUT_S = 30.0


class DimseError(Exception):
    """A DIMSE exchange with a node failed; str(err) is one line (peer and status)."""


def parse_dimse(uri: str) -> tuple[str, str, int]:
    """`dimse://AE_TITLE@HOST:PORT` -> (ae_title, host, port).

    Raises:
        DimseError: not such a URI (the AE title is 1-16 characters, the port 1-65535).
    """
    match = _URI.match(uri.strip())
    port = int(match["port"]) if match else 0
    ae = match["ae"].strip() if match else ""
    if not match or not ae or not 0 < port < 65536:
        raise DimseError(f"{uri!r} is not a DIMSE destination: expected "
                         "dimse://AE_TITLE@HOST:PORT (AE title 1-16 characters)")
    return ae, match["host"].strip("[]"), port


def send_instances(uri: str, blobs: Sequence[bytes], *, calling_ae: str = "ECHO",
                   timeout: float = TIMEOUT_S) -> None:
    """C-STORE each DICOM Part 10 file of `blobs` to the node `uri` in one association.

    Args:
        uri: `dimse://AE_TITLE@HOST:PORT`.
        blobs: Part 10 files (preamble and file meta included).
        calling_ae: this node's AE title (the peer may accept known callers only).

    Raises:
        DimseError: a blob is not DICOM, the node cannot be reached, refused or aborted
            the association, rejected a presentation context, or answered a C-STORE with
            a failure (or no) status. Warnings count as success.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.status import code_to_category

    called, host, port = parse_dimse(uri)
    if not blobs:
        return
    datasets = []
    for i, blob in enumerate(blobs):
        try:
            ds = pydicom.dcmread(BytesIO(blob))
            sop_class, syntax = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        except Exception as err:  # noqa: BLE001 - any parse failure is one message
            raise DimseError(f"instance {i} is not a DICOM Part 10 file "
                             f"({type(err).__name__})") from None
        datasets.append((ds, sop_class, syntax))
    # A context carries one accepted transfer syntax: one context per (SOP class, the
    # instance's syntax), and one per SOP class with the uncompressed fallbacks.
    contexts: dict[tuple[str, ...], None] = {}
    for _, sop_class, syntax in datasets:
        contexts[(sop_class, syntax)] = None
        contexts[(sop_class, ExplicitVRLittleEndian, ImplicitVRLittleEndian)] = None
    if len(contexts) > 128:
        raise DimseError(f"{len(contexts)} presentation contexts needed; an association "
                         "carries at most 128 (send fewer SOP classes per call)")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, *wanted in contexts:
        ae.add_requested_context(sop_class, wanted)
    peer = f"{called}@{host}:{port}"
    assoc = ae.associate(host, port, ae_title=called)
    if assoc.is_rejected:
        raise DimseError(f"{peer} refused the association from calling AE title {calling_ae!r}"
                         f" ({_reject_reason(assoc)})")
    if not assoc.is_established:
        raise DimseError(f"{peer}: no association (connection refused, timed out or aborted)")
    try:
        for i, (ds, sop_class, _) in enumerate(datasets):
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as err:  # no accepted context for it
                raise DimseError(f"{peer} cannot take instance {i} (SOP class {sop_class}): "
                                 f"{str(err).splitlines()[0]}") from None
            if assoc.is_aborted:
                raise DimseError(f"{peer} aborted the association during C-STORE")
            code = getattr(status, "Status", None)
            if code is None:
                raise DimseError(f"{peer} gave no answer to C-STORE of instance {i} "
                                 f"within {timeout:g} s")
            if code_to_category(code) not in ("Success", "Warning"):
                comment = str(getattr(status, "ErrorComment", "") or "").strip()
                raise DimseError(f"{peer} refused instance {i} (SOP class {sop_class}): "
                                 f"status 0x{code:04X}" + (f" {comment}" if comment else ""))
    finally:
        if assoc.is_established:
            assoc.release()


def _reject_reason(assoc) -> str:
    """The A-ASSOCIATE-RJ's reason as words (pynetdicom keeps the primitive)."""
    try:
        rj = assoc.acceptor.primitive
        return f"{rj.reason_str}, {rj.result_str}"
    except Exception:  # noqa: BLE001 - the reason is only decoration
        return "rejected"
