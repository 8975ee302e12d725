"""Location's streaming writer: the file appears whole or not at all, local and S3."""

import pytest

from echo_ray.data.storage import resolve


class Boom(Exception):
    pass


def test_local_stream_appears_whole_and_an_error_leaves_the_old_file(tmp_path):
    loc = resolve(str(tmp_path / "out" / "reports.jsonl"))
    with loc.open_output() as f:
        f.write(b"first\n")
        assert not loc.exists()  # nothing under the final name while writing
        f.write(b"second\n")
    assert loc.read_bytes() == b"first\nsecond\n"
    with pytest.raises(Boom), loc.open_output() as f:
        f.write(b"half of a new version")
        raise Boom
    assert loc.read_bytes() == b"first\nsecond\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["reports.jsonl"]


def test_s3_stream_uploads_at_the_end_and_not_on_an_error(s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="stream")
    loc = resolve("s3://stream/night/reports.jsonl", s3_endpoint=s3_endpoint)
    def keys():
        return {o["Key"] for o in s3.list_objects_v2(Bucket="stream").get("Contents", [])}

    with pytest.raises(Boom), loc.open_output() as f:
        f.write(b"never uploaded")
        raise Boom
    assert "night/reports.jsonl" not in keys()
    payload = b"".join(b"row %d\n" % i for i in range(200_000))  # 1.5 MB, several writes
    with loc.open_output() as f:
        for start in range(0, len(payload), 100_000):
            f.write(payload[start : start + 100_000])
        assert "night/reports.jsonl" not in keys()
    assert s3.get_object(Bucket="stream", Key="night/reports.jsonl")["Body"].read() == payload
