"""Where DICOM objects (the reports' Structured Reports) are stored: one call for both kinds of
destination URI.

    dicomweb://HOST:PORT/PATH, dicomwebs://...   STOW-RS (`dicomweb.DicomwebClient.store`),
                                                 credentials from the environment
    dimse://AE_TITLE@HOST:PORT                   C-STORE over one association
                                                 (`dimse.send_instances`)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from echo_ray.interop.dicomweb import DicomwebClient


class DestinationError(Exception):
    """The objects could not be stored: one line naming the destination (no credentials)."""


def store_instances(destination: str | DicomwebClient, blobs: Sequence[bytes], *,
                    calling_ae: str = "ECHO") -> None:
    """Store Part 10 `blobs` at `destination` (module docstring); nothing to do for none.

    Args:
        destination: a URI, or a `DicomwebClient` built already (its credentials read
            where it was built: a Ray worker need not have them in its environment).
        calling_ae: our AE title on a DIMSE association.

    Raises:
        DestinationError: the destination is not a known kind, or refused or missed an
            object; the message is one line.
    """
    if not blobs:
        return
    from echo_ray.interop.dicomweb import DicomwebClient, DicomwebError

    if isinstance(destination, DicomwebClient):
        try:
            destination.store(list(blobs))
        except DicomwebError as err:
            raise DestinationError(str(err)) from None
        return
    scheme = destination.split("://", 1)[0]
    if scheme in ("dicomweb", "dicomwebs"):
        try:
            DicomwebClient.from_uri(destination).store(list(blobs))
        except DicomwebError as err:
            raise DestinationError(str(err)) from None
        return
    if scheme == "dimse":
        from echo_ray.interop.dimse import DimseError, send_instances

        try:
            send_instances(destination, list(blobs), calling_ae=calling_ae)
        except DimseError as err:
            raise DestinationError(" ".join(str(err).split())) from None
        return
    raise DestinationError(f"{destination!r}: expected dicomweb://HOST:PORT/PATH, "
                           "dicomwebs://... or dimse://AE_TITLE@HOST:PORT")
