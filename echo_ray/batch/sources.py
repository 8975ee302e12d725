"""Where the job's studies come from, behind one small interface: a folder or S3 prefix
(`FolderSource`, a `data.storage.Location`) or a PACS over DICOMweb (`DicomwebSource`).
A source lists the studies to report (`discover`: driver side) and reads one file of a
listed study (`read`: in the decode tasks, or the actors with `pool.decode_in_actors`).

A read that fails raises `OSError`, which the decode stage records as the file's
`read_failed` error: a folder's file is read again twice (`discovery.read_with_retries`), a
DICOMweb instance is retried by the client (3 tries on connection errors, timeouts and 5xx
answers); a DICOMweb instance gone since the listing is a `FileNotFoundError`.
"""

from __future__ import annotations

from datetime import datetime

from echo_ray.batch.discovery import (
    Discovery,
    discover_dicomweb,
    discover_studies,
    instance_path,
    read_with_retries,
)
from echo_ray.batch.ledger import Ledger
from echo_ray.config.schema import ReportConfig
from echo_ray.data.storage import Location, resolve
from echo_ray.interop.dicomweb import DicomwebClient, DicomwebError, is_dicomweb


class FolderSource:
    """A MIMIC-CXR tree or flat folder of DICOM files, local or on S3."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.uri = loc.uri

    def discover(self, ledger: Ledger, options: ReportConfig, *,
                 exclude: str | None = None) -> Discovery:
        """The archive listed (`discovery.discover_studies`), `exclude` (the output folder,
        when inside the archive) left out."""
        return discover_studies(
            self.loc, done=ledger.done, known_files=ledger.known_files,
            error_files=ledger.error_files, since=options.since_timestamp(),
            include_phi=options.include_phi, io_threads=options.io_threads, exclude=exclude)

    def read(self, path: str) -> bytes:
        return read_with_retries(self.loc.join(path))


class DicomwebSource:
    """A PACS's DICOMweb root: studies by QIDO-RS, instances by WADO-RS."""

    def __init__(self, client: DicomwebClient, modalities: tuple[str, ...]) -> None:
        self.client = client
        self.modalities = modalities
        self.uri = client.uri

    def discover(self, ledger: Ledger, options: ReportConfig, *,
                 exclude: str | None = None) -> Discovery:
        """The studies of `modalities` (`discovery.discover_dicomweb`), `report.since` as a
        StudyDate filter of the search."""
        since = datetime.fromisoformat(options.since).date() if options.since else None
        return discover_dicomweb(
            self.client, modalities=self.modalities, done=ledger.done,
            known_files=ledger.known_files, error_files=ledger.error_files, since=since,
            io_threads=options.io_threads)

    def read(self, path: str) -> bytes:
        study, series, sop = instance_path(path)
        try:
            return self.client.retrieve_instance(study, series, sop)
        except DicomwebError as err:  # the decode stage's read_failed, named by type only
            raise (FileNotFoundError if err.status == 404 else ConnectionError)(
                str(err)) from None


ArchiveSource = FolderSource | DicomwebSource


def archive_source(archive: str, *, s3_endpoint: str | None = None,
                   modalities: tuple[str, ...] = ()) -> ArchiveSource:
    """The source of `--archive`: dicomweb(s):// (credentials read here, on the driver, and
    shipped inside the client) or a folder / s3:// prefix."""
    if is_dicomweb(archive):
        from echo_ray.config.schema import RADIOGRAPH_MODALITIES

        return DicomwebSource(DicomwebClient.from_uri(archive),
                              tuple(modalities) or RADIOGRAPH_MODALITIES)
    return FolderSource(resolve(archive, s3_endpoint=s3_endpoint))


def as_source(src: Location | ArchiveSource) -> ArchiveSource:
    """A source; a bare `Location` is a folder."""
    return FolderSource(src) if isinstance(src, Location) else src
