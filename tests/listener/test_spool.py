"""The node's spool and ledger rules (`listener.spool`) and the send retries of its reporting
thread, in-process and without a model."""

from __future__ import annotations

import threading

import pytest

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
from echo_ray.data.storage import PathError
from echo_ray.listener.node import Reporter, display_uri, run_listener
from echo_ray.listener.spool import LEDGER, Spool, safe_name

STUDY = "1.2.826.0.1.3680043.8.498.3001"


def _due(spool: Spool):
    (study,) = spool.due(0, 10)
    return study


def test_store_writes_the_file_and_its_row_and_names_by_uid_only(tmp_path):
    spool = Spool(str(tmp_path))
    assert spool.store(STUDY, "1.2.3.1", b"one", calling_ae="A") == ("new", 1)
    assert spool.store(STUDY, "1.2.3.2", b"two") == ("added", 2)
    assert spool.store(STUDY, "1.2.3.2", b"two again") == ("added", 2)  # a resend replaces
    assert (tmp_path / "studies" / STUDY / "1.2.3.2.dcm").read_bytes() == b"two again"
    assert (tmp_path / LEDGER).exists() and not list((tmp_path / "tmp").iterdir())
    assert safe_name("../../etc") != "../../etc" and safe_name("../../etc").startswith("h")
    spool.store("../evil", "x/y", b"three")
    assert [p.name for p in (tmp_path / "studies").iterdir() if p.name.startswith("h")]
    assert not (tmp_path / "evil").exists()
    study = spool.study(STUDY)
    assert (study["state"], study["num_files"]) == ("receiving", 2)


def test_quiet_period_rearm_and_the_ledger_states(tmp_path):
    spool = Spool(str(tmp_path))
    spool.store(STUDY, "1.2.3.1", b"one")
    assert spool.due(60, 10) == []  # still inside its quiet period
    study = _due(spool)
    assert [p.rsplit("/", 1)[1] for p in study.files] == ["1.2.3.1.dcm"]

    # a file arriving while the study is reported: the stale result is not recorded
    spool.store(STUDY, "1.2.3.2", b"two")
    assert not spool.mark_reported(study, "2.25.1", spool.sr_path(STUDY))
    assert spool.study(STUDY)["state"] == "receiving"

    # an error study gets a file: re-armed
    assert spool.mark_error(_due(spool), "no_frontal_view", "only laterals")
    assert spool.study(STUDY)["reason"] == "no_frontal_view"
    assert spool.store(STUDY, "1.2.3.3", b"three")[0] == "rearmed"
    assert spool.study(STUDY)["state"] == "receiving"

    assert spool.mark_reported(_due(spool), "2.25.1", spool.sr_path(STUDY))
    assert spool.due(0, 10) == []
    assert spool.store(STUDY, "1.2.3.4", b"four")[0] == "late"
    row = spool.study(STUDY)
    assert (row["state"], row["late_files"], row["sr_file"]) == \
        ("reported", 1, f"sr/{STUDY}.dcm")
    spool.close()

    reopened = Spool(str(tmp_path))  # a restart: same ledger
    assert reopened.rearm() == {"receiving": 0, "reported": 1, "sent": 0, "error": 0}
    assert reopened.to_send() == [(STUDY, str(tmp_path / "sr" / f"{STUDY}.dcm"))]
    reopened.mark_sent(STUDY)
    assert reopened.to_send() == [] and reopened.due(0, 10) == []
    assert reopened.study(STUDY)["state"] == "sent"


def test_a_failed_send_is_retried_later_and_logged_without_credentials(tmp_path, capsys):
    spool = Spool(str(tmp_path))
    spool.store(STUDY, "1.2.3.1", b"one")
    sr = spool.sr_path(STUDY)
    with open(sr, "wb") as f:
        f.write(b"SR")
    assert spool.mark_reported(_due(spool), "2.25.7", sr)
    config = apply_overrides(EchoConfig(), [
        "listen.destination=dicomweb://user:secret@pacs.example:8042/dicom-web"])
    calls = []

    def failing(destination, blob, *, calling_ae):
        calls.append((blob, calling_ae))
        raise ConnectionError("pacs down")

    reporter = Reporter(spool, None, config, threading.Event(), sender=failing)
    reporter.send_pending()
    row = spool.study(STUDY)
    assert calls == [(b"SR", "ECHO")]
    assert (row["state"], row["reason"], row["send_attempts"]) == ("reported", "send_failed", 1)
    assert spool.to_send() == []  # not before its next try
    out = capsys.readouterr().out
    assert "next try in 5 s" in out and "secret" not in out
    assert "dicomweb://pacs.example:8042/dicom-web" in out

    spool.rearm()  # a restart tries again at once
    reporter.sender = lambda destination, blob, *, calling_ae: None
    reporter.send_pending()
    row = spool.study(STUDY)
    assert (row["state"], row["reason"]) == ("sent", None)


@pytest.mark.parametrize(("uri", "shown"), [
    ("dimse://PACS@10.0.0.1:104", "dimse://PACS@10.0.0.1:104"),
    ("dicomwebs://u:p@h/x", "dicomwebs://h/x"),
])
def test_display_uri(uri, shown):
    assert display_uri(uri) == shown


def test_a_spool_that_cannot_be_one_is_a_one_line_path_error(tmp_path):
    """Refused before the model loads (the checkpoint is not even looked at)."""
    (tmp_path / "file").write_text("x")
    for spool, words in (("s3://bucket/spool", "must be a local folder"),
                         (str(tmp_path / "file"), "cannot be the node's spool folder")):
        with pytest.raises(PathError, match=words) as err:
            run_listener("no-such-model", spool, EchoConfig())
        assert "\n" not in str(err.value)
    held = Spool(str(tmp_path / "spool"))  # another node's
    with pytest.raises(PathError, match="spool of another running echo-ray listen"):
        run_listener("no-such-model", str(tmp_path / "spool"), EchoConfig())
    held.close()
    Spool(str(tmp_path / "spool")).close()  # free again
