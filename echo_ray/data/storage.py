"""Local paths and `s3://bucket/prefix` URIs behind one pyarrow filesystem interface.

The S3 endpoint is configurable (MinIO, a moto server on loopback, an on-prem object store):
pass `endpoint` or set `AWS_ENDPOINT_URL`; credentials come from the usual AWS environment
variables. No ray imports: Ray Data is handed the (filesystem, path) pair this module returns.
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
