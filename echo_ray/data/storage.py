"""Local paths and `s3://bucket/prefix` URIs behind one pyarrow filesystem interface.

The S3 endpoint is configurable (MinIO, a moto server on loopback, an on-prem object store):
pass `endpoint` or set `AWS_ENDPOINT_URL`; credentials come from the usual AWS environment
variables. `check_input_folder` / `check_output_folder` are the commands' up-front path checks
(errors that say what to pass instead, also for relative paths inside a Ray job). No ray
imports: Ray Data is handed the (filesystem, path) pair this module returns.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from echo_ray.runtime.job import current_ray_job, relative_path_hint


@dataclass(frozen=True)
class Location:
    """A resolved storage location: a pyarrow filesystem and a path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts)
        return Location(self.fs, path, uri)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8", errors="replace")

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file; on a local disk atomically (see `open_output`)."""
        if self.is_s3:  # an S3 PUT is atomic already, no spool needed for bytes in memory
            self._create_parent()
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        with self.open_output() as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    @contextlib.contextmanager
    def open_output(self) -> Iterator[BinaryIO | pa.NativeFile]:
        """A binary stream (`write(bytes)`) that writes this file, for outputs too large to
        build in memory.

        The file appears only when the block ends without an error: on a local disk the
        stream is a temporary file renamed at the end (removed on an error); for S3 it is a
        temporary file on local disk, uploaded at the end in one upload.
        """
        self._create_parent()
        if self.is_s3:
            with tempfile.TemporaryFile() as spool:
                yield spool
                spool.seek(0)
                with self.fs.open_output_stream(self.path) as f:
                    shutil.copyfileobj(spool, f, length=8 << 20)
            return
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                yield f
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise
        self.fs.move(tmp, self.path)

    def _create_parent(self) -> None:
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)

    def write_parquet(self, table: pa.Table) -> None:
        """Write a table as one Parquet file, whole (see `write_bytes`): a job killed
        mid-write leaves no partial file."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(sink.getvalue().to_pybytes())

    def list_files(self, suffix: str | None = None) -> list[str]:
        """All files below this location, as paths relative to it, sorted."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri} does not exist")
        if info.type == pafs.FileType.File:
            raise NotADirectoryError(f"{self.uri} is a file; expected a folder or prefix")
        selector = pafs.FileSelector(self.path, recursive=True)
        base = self.path.rstrip("/") + "/"
        out = []
        for item in self.fs.get_file_info(selector):
            if item.type != pafs.FileType.File:
                continue
            rel = item.path[len(base):] if item.path.startswith(base) else item.path
            if suffix is None or rel.lower().endswith(suffix):
                out.append(rel)
        return sorted(out)

    def delete_dir(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def copy_to(self, dst: Location, exclude: tuple[str, ...] = ()) -> None:
        """Copy this folder (recursively) to `dst`, across filesystems, streaming each file.

        Args:
            exclude: top-level names (files or folders) not to copy.
        """
        for rel in self.list_files():
            if rel.split("/", 1)[0] in exclude:
                continue
            target = dst.join(rel)
            target._create_parent()
            pafs.copy_files(
                self.join(rel).path, target.path,
                source_filesystem=self.fs, destination_filesystem=dst.fs,
            )


class PathError(ValueError):
    """An input or output path a command cannot use; the message says what to pass instead."""


def _file_type(loc: Location) -> pafs.FileType | None:
    """The type of `loc`, or None when S3 could not be asked (the job will report it)."""
    try:
        return loc.fs.get_file_info(loc.path).type
    except OSError as e:
        if loc.is_s3:
            return None
        raise PathError(f"{loc.uri} cannot be read: {e}") from None


def check_input_folder(
    uri: str, *, flag: str, missing_hint: str, s3_endpoint: str | None = None
) -> Location:
    """`uri` as a folder a command reads, checked before any work starts.

    Local paths are checked exactly; an s3:// prefix with one request (when S3 cannot be
    reached the check is left to the job, which then names the error). Inside a `ray job
    submit` entrypoint a relative path that does not exist is explained: it names a file of
    the uploaded working dir.

    Args:
        flag: the argument, e.g. "--data", named in the error.
        missing_hint: what to do when the folder does not exist, e.g. "run `echo-ray
            prepare` first".

    Raises:
        PathError: the folder does not exist or is a file.
    """
    return _check_input(uri, flag, missing_hint, s3_endpoint, want=pafs.FileType.Directory)


def check_input_file(
    uri: str, *, flag: str, missing_hint: str, s3_endpoint: str | None = None
) -> Location:
    """`uri` as a file a command reads (e.g. an API keys file); see `check_input_folder`."""
    return _check_input(uri, flag, missing_hint, s3_endpoint, want=pafs.FileType.File)


_KIND_NAMES = {pafs.FileType.Directory: "folder", pafs.FileType.File: "file"}


def _check_input(uri: str, flag: str, missing_hint: str, s3_endpoint: str | None,
                 want: pafs.FileType) -> Location:
    """`check_input_folder` / `check_input_file`: `uri` exists and is a `want`."""
    loc = _resolve_checked(uri, flag, s3_endpoint)
    kind = _file_type(loc)
    name = _KIND_NAMES[want]
    if kind == pafs.FileType.NotFound:
        job = current_ray_job()
        if job is not None and _is_relative(uri):
            raise PathError(f"{flag} {relative_path_hint(uri, job)}")
        raise PathError(f"{flag} {uri}: no such {name}; {missing_hint}")
    other = pafs.FileType.File if want == pafs.FileType.Directory else pafs.FileType.Directory
    if kind == other:
        raise PathError(f"{flag} {uri} is a {_KIND_NAMES[other]}, not a {name}; {missing_hint}")
    return loc


def check_output_folder(uri: str, *, flag: str, s3_endpoint: str | None = None) -> Location:
    """`uri` as a folder a command writes: not a file, and creatable or writable.

    Inside a `ray job submit` entrypoint a relative output is refused: it would be written
    into the job's temporary copy of the working dir, which Ray deletes.

    Raises:
        PathError: with what to pass instead.
    """
    loc = _resolve_checked(uri, flag, s3_endpoint)
    job = current_ray_job()
    if job is not None and _is_relative(uri):
        raise PathError(f"{flag} {relative_path_hint(uri, job, output=True)}")
    kind = _file_type(loc)
    if kind == pafs.FileType.File:
        raise PathError(f"{flag} {uri} is an existing file, not a folder: pass a new folder "
                        "(or this command's earlier output folder, to continue it)")
    if loc.is_s3:
        return loc  # S3 permissions show only when writing: the job reports them
    path = loc.path
    if kind == pafs.FileType.Directory:
        if not os.access(path, os.W_OK | os.X_OK):
            raise PathError(f"{flag} {uri} is not writable by this user: pass a folder you "
                            "can write, or fix its permissions")
        return loc
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise PathError(f"{flag} {uri} cannot be created: {parent} is a file; pass a folder "
                        "path that does not run through a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {uri} cannot be created: {parent} is not writable by this "
                        "user; pass a folder you can write")
    return loc


def _resolve_checked(uri: str, flag: str, s3_endpoint: str | None) -> Location:
    try:
        return resolve(uri, s3_endpoint=s3_endpoint)
    except ValueError as e:
        raise PathError(f"{flag} {uri}: {e}") from None


def _is_relative(uri: str) -> bool:
    return "://" not in uri and not os.path.isabs(os.path.expanduser(uri))


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem; `endpoint` (or AWS_ENDPOINT_URL) like `http://127.0.0.1:9000`."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, object] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"S3 endpoint must look like http(s)://host:port, got {endpoint!r}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    # Carry the driver's credentials when set, so Ray workers started earlier (with another
    # environment) still reach the store; otherwise pyarrow's default chain (instance roles).
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, *, s3_endpoint: str | None = None) -> Location:
    """Resolve a local path or an `s3://bucket/prefix` URI."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"S3 URI needs a bucket: {uri!r}")
        path = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        return Location(s3_filesystem(s3_endpoint), path, uri.rstrip("/"))
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


# A finished training run exports its final model to this sub-folder.
RUN_MODEL_DIR = "model"


def resolve_model_dir(uri: str, *, s3_endpoint: str | None = None, what: str = "model") -> Location:
    """A model directory (config.json inside), local or S3; a run folder stands for its
    exported `model/` sub-folder.

    Args:
        what: how the caller names this path in errors (e.g. "--init").
    """
    loc = resolve(uri, s3_endpoint=s3_endpoint)
    if not loc.exists():
        raise FileNotFoundError(f"{what} {uri} does not exist")
    if not loc.join("config.json").exists() and loc.join(RUN_MODEL_DIR, "config.json").exists():
        loc = loc.join(RUN_MODEL_DIR)
    if not loc.join("config.json").exists():
        raise FileNotFoundError(
            f"{what} {uri} is neither a model directory (no config.json) nor a finished run "
            f"folder (no {RUN_MODEL_DIR}/config.json)"
        )
    return loc


def local_model_dir(loc: Location, cache: str) -> str:
    """A local path for model directory `loc`: itself on local disk, else a copy in `cache`."""
    if not loc.is_s3:
        return loc.path
    loc.copy_to(Location(pafs.LocalFileSystem(), cache, cache))
    return cache


def model_name(checkpoint: str) -> str:
    """A model id from its path: the directory name, or the run's name for `RUN/model`."""
    parts = [p for p in checkpoint.rstrip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else "echo-ray"
