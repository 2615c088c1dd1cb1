"""resnet.data.s3 against a real S3 server (SeaweedFS, the session's `s3_server`): listing with pagination,
parallel reads, downloads and uploads, and the one-line errors for each way S3 access fails."""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from pathlib import Path

import pytest

from resnet.data import s3
from resnet.errors import DataError

integration = pytest.mark.integration


@pytest.fixture
def prefix() -> str:
    """A prefix of its own for each test: the server is shared by the whole session."""
    return f"tests/{uuid.uuid4().hex[:12]}"


def use_env(monkeypatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3.s3_client.cache_clear()


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def assert_one_line(error: DataError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --- URIs and the client (no server) ----------------------------------------------------------------------


def test_s3_uris():
    assert s3.is_s3_uri("s3://bucket/a")
    assert not s3.is_s3_uri("data/raw") and not s3.is_s3_uri("/s3://x") and not s3.is_s3_uri("S3x://b")
    assert s3.split_s3_uri("s3://bucket/a/b") == ("bucket", "a/b")
    assert s3.split_s3_uri("s3://bucket/a/") == ("bucket", "a/")
    assert s3.split_s3_uri("s3://bucket") == ("bucket", "")
    assert s3.split_s3_uri("s3://bucket/") == ("bucket", "")
    for bad in ("s3://", "s3:///x", "data/raw"):
        with pytest.raises(DataError) as caught:
            s3.split_s3_uri(bad)
        assert_one_line(caught.value, bad)


def test_client_reads_the_standard_environment_and_is_built_once(aws_isolated):
    client = s3.s3_client()
    assert client.meta.region_name == "us-east-1"  # nothing configured
    assert "amazonaws.com" in client.meta.endpoint_url
    assert client.meta.config.s3 is None or client.meta.config.s3.get("addressing_style") != "path"
    assert client.meta.config.retries["mode"] == "standard"

    aws_isolated.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    aws_isolated.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert s3.s3_client() is client  # cached until cleared
    s3.s3_client.cache_clear()
    clients: list = []
    threads = [threading.Thread(target=lambda: clients.append(s3.s3_client())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in clients}) == 1
    custom = clients[0]
    assert custom.meta.endpoint_url == "http://127.0.0.1:9"
    assert custom.meta.region_name == "eu-west-3"
    assert custom.meta.config.s3["addressing_style"] == "path"


# --- against the server -------------------------------------------------------------------------------------


@integration
def test_upload_directory_then_list_pages_through_more_than_1000_objects(s3_env, prefix, tmp_path):
    files = {f"class{i % 3}/{i:04d}.bin": f"object {i}".encode() * (1 + i % 4) for i in range(1001)}
    files["class0/nested/deeper.txt"] = b"deep"
    write_files(tmp_path / "tree", files)

    s3.upload_directory(tmp_path / "tree", f"s3://data/{prefix}/tree")

    listed = s3.list_objects(f"s3://data/{prefix}/tree")
    assert listed == sorted((f"{prefix}/tree/{name}", len(content)) for name, content in files.items())
    assert s3.list_objects(f"s3://data/{prefix}/tree/") == listed
    assert len(listed) == 1002
    # the server really pages at 1000 keys, so the listing above went through a second page
    first_page = s3.s3_client().list_objects_v2(Bucket="data", Prefix=f"{prefix}/tree/")
    assert first_page["IsTruncated"] and first_page["KeyCount"] == 1000
    assert s3.list_objects(f"s3://data/{prefix}/nothing-here") == []


@integration
def test_a_prefix_is_a_directory(s3_env, prefix, tmp_path):
    write_files(tmp_path, {"cats/a.jpg": b"a", "cats/b/c.jpg": b"bc", "cats2/d.jpg": b"d", "cats.txt": b"x"})
    s3.upload_directory(tmp_path, f"s3://data/{prefix}")

    expected = [(f"{prefix}/cats/a.jpg", 1), (f"{prefix}/cats/b/c.jpg", 2)]
    assert s3.list_objects(f"s3://data/{prefix}/cats") == expected
    assert s3.list_objects(f"s3://data/{prefix}/cats/") == expected
    assert [key for key, _ in s3.list_objects(f"s3://data/{prefix}")] == [
        f"{prefix}/cats.txt",
        f"{prefix}/cats/a.jpg",
        f"{prefix}/cats/b/c.jpg",
        f"{prefix}/cats2/d.jpg",
    ]


@integration
def test_read_objects_keeps_key_order_and_yields_a_missing_object_as_an_error(s3_env, prefix, tmp_path):
    rng = random.Random(0)
    files = {f"img/{i:03d}.bin": rng.randbytes(rng.choice([0, 10, 5_000, 300_000])) for i in range(60)}
    write_files(tmp_path, files)
    s3.upload_directory(tmp_path, f"s3://data/{prefix}")

    keys = [f"{prefix}/{name}" for name in files]
    rng.shuffle(keys)
    missing = f"{prefix}/img/missing.bin"
    keys.insert(17, missing)

    results = list(s3.read_objects("data", keys, workers=4))

    assert [key for key, _ in results] == keys
    for key, content in results:
        if key == missing:
            assert isinstance(content, DataError)
            assert_one_line(content, f"s3://data/{missing}", "no such object")
        else:
            assert content == files[key.removeprefix(f"{prefix}/")]


@integration
def test_read_objects_streams_and_stops_early(s3_env, prefix, tmp_path):
    write_files(tmp_path, {f"{i:03d}": bytes([i]) * 100 for i in range(50)})
    s3.upload_directory(tmp_path, f"s3://data/{prefix}")
    keys = [f"{prefix}/{i:03d}" for i in range(50)]

    reader = s3.read_objects("data", keys, workers=2)
    first = list(itertools.islice(reader, 3))
    reader.close()  # the pool shuts down, the rest never downloads
    assert first == [(keys[i], bytes([i]) * 100) for i in range(3)]
    assert list(s3.read_objects("data", [])) == []


class _BrokenBody:
    def __init__(self, body):
        self.body = body

    def read(self, *args):
        from botocore.exceptions import ResponseStreamingError

        raise ResponseStreamingError(
            error="Connection broken: IncompleteRead(10 bytes read, 90 more expected)"
        )

    def close(self):
        self.body.close()


class _FlakyClient:
    """The real client, but the body of some objects breaks off while streaming, a set number of times."""

    def __init__(self, client, breaks: dict[str, int]):
        self.client, self.breaks, self.calls = client, dict(breaks), dict.fromkeys(breaks, 0)
        self.lock = threading.Lock()

    def get_object(self, **kwargs):
        response = self.client.get_object(**kwargs)
        key = kwargs["Key"]
        with self.lock:
            if key in self.breaks:
                self.calls[key] += 1
                if self.breaks[key] > 0:
                    self.breaks[key] -= 1
                    response["Body"] = _BrokenBody(response["Body"])
        return response


@integration
def test_read_objects_retries_a_body_that_breaks_off(s3_env, prefix, tmp_path, monkeypatch):
    write_files(tmp_path, {"ok": b"fine", "flaky": b"second time lucky", "broken": b"never arrives"})
    s3.upload_directory(tmp_path, f"s3://data/{prefix}")
    flaky = _FlakyClient(s3.s3_client(), {f"{prefix}/flaky": 2, f"{prefix}/broken": 100})
    monkeypatch.setattr(s3, "s3_client", lambda: flaky)
    monkeypatch.setattr(s3, "BACKOFF_BASE_S", 0.01)

    results = dict(s3.read_objects("data", [f"{prefix}/ok", f"{prefix}/flaky", f"{prefix}/broken"]))

    assert results[f"{prefix}/ok"] == b"fine"
    assert results[f"{prefix}/flaky"] == b"second time lucky"
    assert flaky.calls[f"{prefix}/flaky"] == 3
    assert isinstance(results[f"{prefix}/broken"], DataError)
    assert_one_line(results[f"{prefix}/broken"], f"s3://data/{prefix}/broken", "download broke off")
    assert flaky.calls[f"{prefix}/broken"] == s3.BODY_ATTEMPTS


@integration
def test_download_file_round_trip_is_atomic(s3_env, prefix, tmp_path):
    content = random.Random(1).randbytes(9 * 1024 * 1024 + 123)  # above the multipart and progress thresholds
    (tmp_path / "big.bin").write_bytes(content)
    s3.upload_file(tmp_path / "big.bin", f"s3://data/{prefix}/archive/big.bin")
    s3.upload_file(tmp_path / "big.bin", f"s3://data/{prefix}/into/")  # "/" at the end: keep the file name
    assert s3.list_objects(f"s3://data/{prefix}") == [
        (f"{prefix}/archive/big.bin", len(content)),
        (f"{prefix}/into/big.bin", len(content)),
    ]

    out = tmp_path / "out"
    s3.download_file(f"s3://data/{prefix}/archive/big.bin", out / "copy.bin")
    assert (out / "copy.bin").read_bytes() == content
    assert [p.name for p in out.iterdir()] == ["copy.bin"]  # no temporary file left

    uri = f"s3://data/{prefix}/archive/missing.bin"
    with pytest.raises(DataError) as caught:
        s3.download_file(uri, out / "missing.bin")
    assert_one_line(caught.value, uri, "no such object")
    assert [p.name for p in out.iterdir()] == ["copy.bin"]

    with pytest.raises(DataError) as caught:
        s3.download_file(f"s3://data/{prefix}/archive/", out / "x")
    assert_one_line(caught.value, "names no object")


@integration
def test_no_such_bucket(s3_env, tmp_path):
    uri = "s3://no-such-bucket-here/images"
    for operation in (
        lambda: s3.list_objects(uri),
        lambda: s3.download_file(f"{uri}/a.jpg", tmp_path / "a.jpg"),
        lambda: list(s3.read_objects("no-such-bucket-here", ["images/a.jpg", "images/b.jpg"])),
    ):
        with pytest.raises(DataError) as caught:
            operation()
        assert_one_line(caught.value, "s3://no-such-bucket-here/", ": no such bucket")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(DataError) as caught:
        s3.upload_file(tmp_path / "f", f"{uri}/f")
    assert_one_line(caught.value, f"{uri}/f: no such bucket")
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]


@integration
def test_rejected_credentials(s3_server, s3_env, tmp_path):
    s3.upload_file(_file(tmp_path, b"x"), "s3://data/creds/x")

    use_env(s3_env, {"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    with pytest.raises(DataError) as caught:
        s3.list_objects("s3://data/creds")
    assert_one_line(caught.value, "s3://data/creds: credentials rejected (", "secret key")
    with pytest.raises(DataError) as caught:  # a HEAD answer carries no error code: asked again to name it
        s3.download_file("s3://data/creds/x", tmp_path / "x")
    assert_one_line(caught.value, "s3://data/creds/x: credentials rejected (")
    with pytest.raises(DataError) as caught:
        list(s3.read_objects("data", ["creds/x"]))
    assert_one_line(caught.value, "s3://data/creds/x: credentials rejected (")

    use_env(s3_env, {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "nothing"})
    with pytest.raises(DataError) as caught:
        s3.list_objects("s3://data/creds")
    assert_one_line(caught.value, "s3://data/creds: credentials rejected (", "access key")


def _file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"upload-{uuid.uuid4().hex[:8]}"
    path.write_bytes(content)
    return path


@integration
def test_access_denied_for_a_read_only_identity(s3_server, s3_env, prefix, tmp_path):
    s3.upload_file(_file(tmp_path, b"readable"), f"s3://data/{prefix}/ok.txt")
    s3.upload_file(_file(tmp_path, b"secret"), f"s3://dvc/{prefix}/hidden.txt")

    use_env(s3_env, s3_server.reader_env())  # may read and list `data` only
    assert s3.list_objects(f"s3://data/{prefix}") == [(f"{prefix}/ok.txt", 8)]
    assert list(s3.read_objects("data", [f"{prefix}/ok.txt"])) == [(f"{prefix}/ok.txt", b"readable")]

    with pytest.raises(DataError) as caught:
        s3.list_objects(f"s3://dvc/{prefix}")
    assert_one_line(caught.value, f"s3://dvc/{prefix}: access denied")
    with pytest.raises(DataError) as caught:
        s3.download_file(f"s3://dvc/{prefix}/hidden.txt", tmp_path / "out" / "hidden.txt")
    assert_one_line(caught.value, f"s3://dvc/{prefix}/hidden.txt: access denied")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    [(key, denied)] = s3.read_objects("dvc", [f"{prefix}/hidden.txt"])  # per object: yielded, not raised
    assert isinstance(denied, DataError)
    assert_one_line(denied, f"s3://dvc/{prefix}/hidden.txt: access denied")
    with pytest.raises(DataError) as caught:
        s3.upload_file(_file(tmp_path, b"y"), f"s3://data/{prefix}/new.txt")
    assert_one_line(caught.value, f"s3://data/{prefix}/new.txt: access denied")


def test_a_slow_endpoint_times_out_in_one_line_instead_of_hanging(aws_isolated):
    """An endpoint that accepts the connection and never answers (an overloaded or half-dead server): the read
    timeout ends the wait, one line says so. The timeout is shortened for the test (READ_TIMEOUT_S)."""
    import socket

    aws_isolated.setattr(s3, "READ_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        use_env(
            aws_isolated,
            {
                "AWS_ENDPOINT_URL_S3": url,
                "AWS_ACCESS_KEY_ID": "k",
                "AWS_SECRET_ACCESS_KEY": "s",
                "AWS_MAX_ATTEMPTS": "1",
            },
        )
        started = time.monotonic()
        with pytest.raises(DataError) as caught:
            s3.list_objects("s3://data/images")
    assert time.monotonic() - started < 10
    assert_one_line(caught.value, f"s3://data/images: the S3 endpoint {url} did not answer within 1 s")


def test_unreachable_endpoint_fails_fast(aws_isolated):
    from localservers import free_ports

    [closed] = free_ports(1)  # nothing listens there
    use_env(
        aws_isolated,
        {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed}",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_MAX_ATTEMPTS": "1",  # the standard variable: no retries, for a quick test
        },
    )
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        s3.list_objects("s3://data/images")
    assert_one_line(caught.value, f"s3://data/images: cannot reach the S3 endpoint http://127.0.0.1:{closed}")
    with pytest.raises(DataError) as caught:
        list(s3.read_objects("data", ["images/a", "images/b"]))
    assert_one_line(caught.value, "s3://data/images/a: cannot reach the S3 endpoint")
    assert time.monotonic() - started < 10


def test_no_credentials(aws_isolated):
    use_env(aws_isolated, {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    with pytest.raises(DataError) as caught:
        s3.list_objects("s3://data/images")
    assert_one_line(
        caught.value,
        "s3://data/images: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)",
    )


def test_upload_of_missing_local_paths(tmp_path):
    with pytest.raises(DataError) as caught:
        s3.upload_file(tmp_path / "nope.bin", "s3://data/x/")
    assert_one_line(caught.value, "nope.bin", "s3://data/x/nope.bin")
    with pytest.raises(DataError) as caught:
        s3.upload_directory(tmp_path / "nodir", "s3://data/x")
    assert_one_line(caught.value, "nodir", "s3://data/x")


def test_describe_error_names_the_uri_in_one_line():
    from botocore.exceptions import ClientError

    response = {
        "Error": {"Code": "SlowDown", "Message": "Please reduce\nyour request rate."},
        "ResponseMetadata": {"HTTPStatusCode": 503},
    }
    message = s3.describe_error(ClientError(response, "GetObject"), "s3://b/k")
    assert message == "s3://b/k: S3 error SlowDown: Please reduce your request rate."
    forbidden = ClientError(
        {"Error": {"Code": "403", "Message": "Forbidden"}, "ResponseMetadata": {}}, "HeadObject"
    )
    assert s3.describe_error(forbidden, "s3://b/k") == "s3://b/k: access denied"
    assert s3.describe_error(OSError(28, "No space left on device", "/x/y"), "s3://b/k") == (
        "s3://b/k: No space left on device: /x/y"
    )
