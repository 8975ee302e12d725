"""`echo-ray listen`: the DICOM node's process (`run_listener`).

Threads: the main thread loads the model, opens the spool, starts the DICOM server and
then only waits for SIGTERM / SIGINT; pynetdicom runs one thread per association (the
C-STORE handler of `scp.py` writes each instance into the spool before answering); one
reporting thread (`Reporter`) takes the studies whose quiet period has passed, up to
`listen.batch_size` per model call, writes each one's Structured Report and sends it on.
The model is loaded once, before the node accepts associations, so the first study costs
no start-up.

Log lines start with `[echo-ray listen]` and name a study by its StudyInstanceUID only:
never a patient's name, ID, birth date or accession number.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable

from echo_ray.config.schema import ConfigError, EchoConfig
from echo_ray.listener.scp import StoreHandler, build_ae
from echo_ray.listener.spool import DueStudy, Spool, SpoolInUse, write_durably

UNEXPECTED = "unexpected_error"
READ_FAILED = "read_failed"
SR_FAILED = "sr_failed"


def log(message: str) -> None:
    """One line of the node's log (stdout)."""
    print(f"[echo-ray listen] {message}", file=sys.stdout, flush=True)


def display_uri(uri: str) -> str:
    """A destination as logs show it: any `user:password@` part dropped."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    host, slash, path = rest.partition("/")
    if scheme != "dimse" and "@" in host:
        host = host.rsplit("@", 1)[1]
    return f"{scheme}://{host}{slash}{path}"


def send(destination: str, blob: bytes, *, calling_ae: str) -> None:
    """One SR to `destination` (`interop.destinations.store_instances`: C-STORE for
    dimse://, STOW-RS for dicomweb(s)://).

    Raises:
        DestinationError: one line.
    """
    from echo_ray.interop.destinations import store_instances

    store_instances(destination, [blob], calling_ae=calling_ae)


class Reporter(threading.Thread):
    """The reporting thread: due studies -> `prepare_study` (with the chosen file's
    header) -> `report_prepared` in batches -> SR written to `spool/sr/` -> ledger
    `reported` -> sent -> ledger `sent` (rules in `spool.py`).

    Args:
        spool: the node's spool.
        generator: a `ReportGenerator` (the node's one model).
        config: `listen` (quiet_s, batch_size, destination, ae_title) and `data`
            (modalities) are used.
        stop: set to stop after the current batch.
        sender: the send function (`send`); tests may pass another.
    """

    def __init__(self, spool: Spool, generator, config: EchoConfig, stop: threading.Event,
                 sender: Callable[..., None] = send) -> None:
        super().__init__(name="echo-ray-reporter", daemon=True)
        self.spool, self.generator, self.stop = spool, generator, stop
        self.listen = config.listen
        self.modalities = tuple(config.data.modalities) or None
        self.sender = sender
        self.tick = min(0.5, self.listen.quiet_s / 4)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                due = self.spool.due(self.listen.quiet_s, self.listen.batch_size)
                if due:
                    self.report(due)
                if self.listen.destination:
                    self.send_pending()
            except Exception as err:  # noqa: BLE001 - the node keeps running; logged
                log(f"reporting loop: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            self.stop.wait(self.tick)

    def report(self, due: list[DueStudy]) -> None:
        """One batch of due studies: each becomes `reported` (SR written) or `error`."""
        from echo_ray.decode.studies import prepare_study

        size = self.generator.model.config.image_size
        prepared = []
        for study in due:
            try:
                files = [(os.path.basename(p), _read(p)) for p in study.files]
            except OSError as err:
                self._error(study, READ_FAILED, f"a spooled file could not be read "
                            f"({type(err).__name__})")
                continue
            prepared.append((study, prepare_study(
                files, size=size, study_id=study.study_uid, modalities=self.modalities,
                keep_header=True)))
        for (study, prep), result in zip(prepared, self._model(prepared), strict=True):
            if result.get("error") is not None:
                self._error(study, result["error"], result.get("message") or "")
                continue
            self._write_sr(study, prep, result)

    def _model(self, prepared: list) -> list[dict]:
        """`report_prepared` on the batch; should it raise, study by study (one study that
        breaks the code is one error row, as in the bulk job)."""
        from echo_ray.decode.studies import report_prepared

        studies = [p for _, p in prepared]
        if not studies:
            return []
        try:
            return report_prepared(self.generator, studies)
        except Exception:  # noqa: BLE001 - retried one by one just below
            pass
        results = []
        for study in studies:
            try:
                (result,) = report_prepared(self.generator, [study])
            except Exception as err:  # noqa: BLE001 - one error row, the node goes on
                result = {"error": UNEXPECTED, "message": f"reporting raised {type(err).__name__}"}
            results.append(result)
        return results

    def _write_sr(self, study: DueStudy, prepared, report: dict) -> None:
        from echo_ray.interop.sr import build_sr, sr_bytes

        try:
            ds = build_sr(report, prepared.source_header)
            blob = sr_bytes(ds)
        except Exception as err:  # noqa: BLE001 - ValueError by contract; any is one row
            self._error(study, SR_FAILED, f"the Structured Report could not be built "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            return
        path = self.spool.sr_path(study.study_uid)
        write_durably(path, blob, self.spool.tmp)
        if self.spool.mark_reported(study, str(ds.SOPInstanceUID), path):
            files = f"{prepared.num_files} file{'s' if prepared.num_files != 1 else ''}"
            log(f"study {study.study_uid}: reported ({files}, view "
                f"{report.get('view_position') or 'unnamed'}); SR {ds.SOPInstanceUID} written")
        else:
            log(f"study {study.study_uid}: a file arrived while it was reported; it will be "
                "reported again after its quiet period")

    def _error(self, study: DueStudy, reason: str, message: str) -> None:
        if self.spool.mark_error(study, reason, message):
            log(f"study {study.study_uid}: not reported: {reason} ({message})")

    def send_pending(self) -> None:
        """Send each `reported` study's SR whose send is due; `sent` on success."""
        target = display_uri(self.listen.destination)
        for study_uid, path in self.spool.to_send():
            if self.stop.is_set():
                return
            try:
                self.sender(self.listen.destination, _read(path),
                            calling_ae=self.listen.ae_title)
            except Exception as err:  # noqa: BLE001 - retried later, logged
                message = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                wait = self.spool.mark_send_failed(study_uid, message)
                log(f"study {study_uid}: SR not sent to {target} ({message}); next try in "
                    f"{wait:g} s")
                continue
            self.spool.mark_sent(study_uid)
            log(f"study {study_uid}: SR sent to {target}")


def open_spool(path: str) -> Spool:
    """The node's spool at `path`, created if need be.

    Raises:
        PathError: a URI (the spool is local: SQLite and fsync), or a path that cannot be
            the spool (a file, no permission); one line.
    """
    from echo_ray.data.storage import PathError

    if "://" in path:
        raise PathError(f"--spool {path}: the spool must be a local folder (its ledger is "
                        "SQLite and each received file is fsynced), not a URI")
    try:
        return Spool(path)
    except SpoolInUse as err:
        raise PathError(f"--spool {path}: {err}; stop it first, or give this node a "
                        "spool of its own") from None
    except (OSError, sqlite3.Error) as err:
        what = getattr(err, "strerror", None) or str(err)
        raise PathError(f"--spool {path}: cannot be the node's spool folder "
                        f"({type(err).__name__}: {what})") from None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_listener(checkpoint: str, spool: str, config: EchoConfig, *,
                 s3_endpoint: str | None = None) -> None:
    """Run the DICOM node until SIGTERM or SIGINT (module docstring).

    Args:
        checkpoint: the model directory (local or s3://; a run folder means its model/).
        spool: a local folder: received files, the ledger, the SRs. The same folder after
            a restart continues where the node stopped.
        config: `listen`, `decoding`, `pool.threads` and `data.modalities` are used.
    """
    from echo_ray.data.storage import model_name, resolve_model_dir
    from echo_ray.decode.replica import ModelReplica

    listen = config.listen
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log(f"{signal.Signals(signum).name}: stopping")
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        store = open_spool(spool)
        started = time.perf_counter()
        model = resolve_model_dir(checkpoint, s3_endpoint=s3_endpoint, what="--checkpoint")
        replica = ModelReplica(threads=config.pool.threads, cpus=_cpus(), name="listen")
        generator = replica.generator(
            model, config.decoding, model_id=model_name(checkpoint), include_phi=False,
            modalities=tuple(config.data.modalities) or None)
        log(f"model {model_name(checkpoint)} loaded in {time.perf_counter() - started:.1f} s "
            f"({config.decoding.mode} decoding)")
        if stop.is_set():
            store.close()
            return
        # Quiet periods of studies a previous run left `receiving` count from now, when
        # their missing files can arrive again.
        counts = store.rearm()
        log(f"spool {store.root}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        ae, handlers = build_ae(listen.ae_title, listen.allowed_callers,
                                StoreHandler(store, config.data.modalities, log), log)
        try:
            server = ae.start_server((listen.host, listen.port), block=False,
                                     evt_handlers=handlers)
        except OSError as err:
            store.close()
            raise ConfigError(f"cannot listen on {listen.host}:{listen.port} "
                              f"({err.strerror or err}): pass a free --port") from None
        reporter = Reporter(store, generator, config, stop)
        reporter.start()
        target = display_uri(listen.destination) if listen.destination else \
            "none (SRs stay in the spool)"
        log(f"listening on {listen.host}:{listen.port} as {listen.ae_title} (callers "
            f"{','.join(listen.allowed_callers)}; quiet period {listen.quiet_s:g} s; "
            f"destination {target})")
        try:
            while not stop.wait(0.5):
                if not reporter.is_alive():  # pragma: no cover - run() catches everything
                    log("the reporting thread stopped; stopping")
                    break
        finally:
            server.shutdown()
            stop.set()
            reporter.join(timeout=120)
            store.close()
        log("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
