"""Discovery: an archive's DICOM files grouped into studies, less those the ledger holds, and
the studies cut into work units (driver side: a listing, and header reads for files
outside a MIMIC tree). Steps 1 and 3 of `echo_ray.batch.job`."""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from echo_ray.batch.ledger import FileStamp
from echo_ray.data.dicom import DicomError, read_header
from echo_ray.data.layout import MIMIC_IMAGE
from echo_ray.data.storage import Location

DICOM_SUFFIXES = (".dcm", ".dicom")
HEADER_PREFIX = 64 * 1024  # bytes read to find a flat file's StudyInstanceUID
_READ_ATTEMPTS = 3


@dataclass
class ArchiveStudy:
    """One study to report: its key and its files (archive paths, output names, and size
    and modification time as listed: the ledger records them)."""

    key: str
    paths: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    sizes: list[int | None] = field(default_factory=list)
    mtimes_ns: list[int | None] = field(default_factory=list)
    newest: float = 0.0  # latest modification time of its files (epoch seconds)

    def add(self, file: _Listed, name: str) -> None:
        self.paths.append(file.rel)
        self.names.append(name)
        self.sizes.append(file.size)
        self.mtimes_ns.append(file.mtime_ns)
        self.newest = max(self.newest, file.mtime)


@dataclass(frozen=True, slots=True)
class _Listed:
    """A candidate file of the listing."""

    rel: str  # path relative to the archive
    mtime: float  # epoch seconds
    mtime_ns: int | None
    size: int | None
    named_dicom: bool  # .dcm / .dicom
    key: str  # file_key(rel)
    mimic: str | None  # its study key when the path is a MIMIC image path


@dataclass
class Discovery:
    """What an archive holds, less what the ledger already has."""

    studies: list[ArchiveStudy]  # to report, sorted by key
    layout: str  # mimic, flat, mixed or empty
    dicom_files: int  # candidate files in the archive
    side_files: int  # skipped: not DICOM by name (reports, CSV, ...) or content
    late_files: int  # new files of studies that are already reported
    before_since: int  # studies (MIMIC) or files (flat) older than `since`
    changed_studies: int = 0  # error studies reported again: a file changed or was added


def file_key(path: str) -> str:
    """The ledger's name for an archive path (a hash: paths may hold patient identifiers)."""
    return hashlib.sha256(path.encode()).hexdigest()[:24]


def discover_studies(
    src: Location,
    *,
    done: set[str] = frozenset(),
    known_files: set[str] = frozenset(),
    error_files: Mapping[str, FileStamp] | None = None,
    since: float | None = None,
    include_phi: bool = False,
    io_threads: int = 8,
    exclude: str | None = None,
) -> Discovery:
    """Group the archive's DICOM files into studies (`echo_ray.batch.job` docstring, step 1).

    Args:
        done: study keys already reported (skipped).
        known_files: `file_key`s of files already reported (not even read).
        error_files: `file_key` -> stamp of the files of studies whose current row is an
            error (`ledger.read_ledger`). Such a study is reported again when one of its
            files changed (size or modification time) or it got a new file: a file caught
            mid-copy, or a study exported in pieces, is reported once it is whole.
        since: only studies (MIMIC) or files (flat) modified at or after this epoch time.
        exclude: a path under `src` to leave out (the output folder, when inside it).
    """
    error_files = error_files or {}
    files, side = _candidates(_list(src, exclude))
    named_side = side
    mimic_files = sum(f.mimic is not None for f in files)
    error_keys = {stamp.study for stamp in error_files.values()}
    reopened = set()
    for f in files:  # changed files of error studies, and new files of MIMIC error studies
        stamp = error_files.get(f.key)
        if stamp is not None and stamp.changed(f.size, f.mtime_ns):
            reopened.add(stamp.study)
        elif f.mimic in error_keys and f.key not in known_files:
            reopened.add(f.mimic)

    def is_done(key: str) -> bool:
        return key in done and key not in reopened

    def is_known(f: _Listed) -> bool:
        stamp = error_files.get(f.key)
        return f.key in known_files and (stamp is None or stamp.study not in reopened)

    mimic: dict[str, ArchiveStudy] = {}
    flat: list[_Listed] = []
    late = old = 0
    for f in files:
        if is_known(f):
            continue
        if f.mimic:
            if is_done(f.mimic):
                late += 1
                continue
            mimic.setdefault(f.mimic, ArchiveStudy(f.mimic)).add(
                f, f.rel if include_phi else f"{f.mimic}/{posixpath.basename(f.rel)}")
        elif since is not None and f.mtime < since:
            old += 1
        else:
            flat.append(f)
    studies = []
    for study in mimic.values():
        if since is not None and study.newest < since:
            old += 1
        else:
            studies.append(study)
    grouped: dict[str, ArchiveStudy] = {}
    late_flat: list[tuple[str, _Listed]] = []
    with ThreadPoolExecutor(io_threads) as pool:
        keys = pool.map(lambda f: _header_study(src, f.rel, f.size), flat)
        for f, (uid, reason) in zip(flat, keys, strict=True):
            if reason == "not_dicom" and not f.named_dicom:
                side += 1  # not named .dcm and not DICOM: a side file (README, ...)
                continue
            key = uid or f"file:{f.rel}"
            if is_done(key):
                late_flat.append((key, f))
                continue
            grouped.setdefault(key, ArchiveStudy(key)).add(f, f.rel)
    # A new file of a flat error study reopens it: its files already in the ledger join in.
    for key, f in late_flat:
        if key in error_keys:
            if key not in reopened:
                reopened.add(key)
                for g in files:
                    stamp = error_files.get(g.key)
                    if stamp is not None and stamp.study == key and g.mimic is None:
                        grouped.setdefault(key, ArchiveStudy(key)).add(g, g.rel)
            grouped.setdefault(key, ArchiveStudy(key)).add(f, f.rel)
        else:
            late += 1
    studies += grouped.values()
    for study in studies:  # files in a stable order: the view choice breaks ties by order
        order = sorted(range(len(study.paths)), key=study.paths.__getitem__)
        for name in ("paths", "names", "sizes", "mtimes_ns"):
            setattr(study, name, [getattr(study, name)[i] for i in order])
    dicom_files = len(files) - (side - named_side)  # less those not DICOM by content
    other = dicom_files - mimic_files
    layout = ("empty" if not dicom_files else "mimic" if not other else
              "flat" if not mimic_files else "mixed")
    found = sorted(studies, key=lambda s: s.key)
    changed = sum(s.key in reopened and s.key in done for s in found)
    return Discovery(found, layout, dicom_files, side, late, old, changed)


def _candidates(listing) -> tuple[list[_Listed], int]:
    """The listing's candidate DICOM files, and how many side files it holds."""
    files, side = [], 0
    for rel, mtime, mtime_ns, size in listing:
        base = posixpath.basename(rel)
        suffix = posixpath.splitext(base)[1].lower()
        named_dicom = suffix in DICOM_SUFFIXES
        # Candidates: .dcm/.dicom, and names PACS exports use (no extension, or a UID
        # such as 1.2.840.113619.2.1.5) when their content turns out to be DICOM.
        if base.startswith(".") or base.upper() == "DICOMDIR" or not (
                named_dicom or not suffix or suffix[1:].isdigit()):
            side += 1
            continue
        m = MIMIC_IMAGE.search(rel)
        files.append(_Listed(rel, mtime, mtime_ns, size, named_dicom, file_key(rel),
                             f"s{m.group('study')}" if m else None))
    return files, side


def _list(src: Location, exclude: str | None
          ) -> list[tuple[str, float, int | None, int | None]]:
    """(path relative to src, modification time in s and in ns, size) of every file under
    src, sorted."""
    info = src.fs.get_file_info(src.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"archive {src.uri} does not exist")
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"archive {src.uri} is a file; expected a folder or prefix")
    base = src.path.rstrip("/") + "/"
    out = []
    for item in src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        if exclude and (item.path == exclude or item.path.startswith(exclude.rstrip("/") + "/")):
            continue
        rel = item.path[len(base):] if item.path.startswith(base) else item.path
        mtime = item.mtime.timestamp() if item.mtime is not None else 0.0
        out.append((rel, mtime, item.mtime_ns, item.size))
    return sorted(out)


def _header_study(src: Location, rel: str, size: int | None) -> tuple[str | None, str | None]:
    """(StudyInstanceUID, None) of a file, or (None, error reason) when it cannot be read.

    Reads the first HEADER_PREFIX bytes; the whole file only when the header goes on
    past them (an element cut short raises `truncated`; an element read whole is right).
    """
    loc = src.join(rel)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            data = f.read(HEADER_PREFIX)
        whole = size is not None and len(data) >= size
        try:
            header = read_header(data)
        except DicomError as err:
            if whole or err.reason != "truncated":
                return None, err.reason
            header = None
        if header is None or (header["study_instance_uid"] is None and not whole):
            header = read_header(read_with_retries(loc))
        return header["study_instance_uid"], None
    except DicomError as err:
        return None, err.reason
    except OSError:
        return None, "read_failed"


def read_with_retries(loc: Location) -> bytes:
    """The file's bytes; a failed read is tried again (a missing file is not)."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return loc.read_bytes()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def plan_units(studies: Sequence[ArchiveStudy], unit_size: int) -> list[dict[str, Any]]:
    """Cut the (sorted) studies into work units, each named by a hash of its study keys."""
    units = []
    for i in range(0, len(studies), unit_size):
        chunk = studies[i:i + unit_size]
        digest = hashlib.sha256("\n".join(s.key for s in chunk).encode()).hexdigest()[:16]
        units.append({
            "unit": f"part-{digest}",
            "studies": json.dumps([{"key": s.key, "paths": s.paths, "names": s.names,
                                    "sizes": s.sizes, "mtimes_ns": s.mtimes_ns}
                                   for s in chunk]),
            "num_studies": len(chunk),
        })
    return units


def instance_path(path: str) -> tuple[str, str, str]:
    """(study, series, SOP instance UID) of a DICOMweb archive path
    (`studies/S/series/E/instances/I`, what `discover_dicomweb` lists)."""
    parts = path.split("/")
    if len(parts) != 6 or parts[0::2] != ["studies", "series", "instances"]:
        raise ValueError(f"not a DICOMweb instance path: {path!r}")
    return parts[1], parts[3], parts[5]


def discover_dicomweb(
    client,
    *,
    modalities: Sequence[str],
    done: set[str] = frozenset(),
    known_files: set[str] = frozenset(),
    error_files: Mapping[str, FileStamp] | None = None,
    since=None,
    io_threads: int = 8,
) -> Discovery:
    """The studies of a DICOMweb archive (`interop.dicomweb.DicomwebClient`) to report, with
    the exactly-once rules of `discover_studies`.

    A study is its StudyInstanceUID; its files are the instances of its series of
    `modalities` (QIDO-RS: the studies holding such a series, of StudyDate on or after
    `since` when given, then each study's series and instances, `io_threads` studies at
    once). A file's archive path is its WADO-RS path `studies/S/series/E/instances/I` (its
    `file_key` is the hash of that), its name in the outputs `E/I.dcm`; sizes and
    modification times are unknown (None): an instance never changes in a PACS, so an error
    study is reopened only by a new instance (a lateral-only study whose PA arrived), and a
    new instance of a reported study is a late file. `before_since` is 0: the server
    filters on StudyDate.
    """
    error_files = error_files or {}
    error_keys = {stamp.study for stamp in error_files.values()}
    found = client.search_studies(modalities, since)
    with ThreadPoolExecutor(io_threads) as pool:
        listed = list(pool.map(lambda s: client.instances(s["study_uid"], modalities), found))
    studies, late, changed, dicom_files = [], 0, 0, 0
    for entry, instances in zip(found, listed, strict=True):
        key = entry["study_uid"]
        dicom_files += len(instances)
        study = ArchiveStudy(key)
        for i in instances:
            path = f"studies/{key}/series/{i['series_uid']}/instances/{i['sop_uid']}"
            study.paths.append(path)
            study.names.append(f"{i['series_uid']}/{i['sop_uid']}.dcm")
            study.sizes.append(None)
            study.mtimes_ns.append(None)
        new = sum(file_key(p) not in known_files for p in study.paths)
        if key in done:
            if key in error_keys and new:
                changed += 1  # reopened: reported again with every instance
            else:
                late += new
                continue
        if study.paths:
            studies.append(study)
    layout = "dicomweb" if dicom_files else "empty"
    return Discovery(sorted(studies, key=lambda s: s.key), layout, dicom_files, 0, late, 0,
                     changed)
