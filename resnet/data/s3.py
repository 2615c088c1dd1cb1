"""S3 access through boto3: list a prefix, read many objects in parallel, download and upload files.

Where the endpoint and the credentials come from: the standard AWS environment and config files, exactly as
the AWS CLI finds them, never params.yaml or any committed file.

- Credentials: boto3's chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and
  ~/.aws/credentials, SSO, container and instance roles).
- Endpoint: AWS by default; for SeaweedFS, MinIO or another S3-compatible store set AWS_ENDPOINT_URL_S3 (or
  AWS_ENDPOINT_URL, or `endpoint_url` in the profile), e.g. AWS_ENDPOINT_URL_S3=http://127.0.0.1:8333. boto3
  reads these itself; with such an endpoint the client uses path-style addresses (http://host/bucket/key).
- Region: AWS_REGION / AWS_DEFAULT_REGION or the profile, else us-east-1.
- Retries: botocore's "standard" mode, 5 retries of each request; AWS_MAX_ATTEMPTS and AWS_RETRY_MODE (or the
  profile's max_attempts / retry_mode) override them.

Every failure that stops an operation raises DataError with one line naming the s3:// URI and the problem.
boto3 and botocore are imported here only, and only when a function needs them.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from resnet.errors import DataError, one_line
from resnet.io import atomic_path
from resnet.progress import progress

SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MAX_RETRIES = 5  # botocore retries of one request, after the first attempt
MAX_POOL_CONNECTIONS = 64  # above read_objects' default workers, so no thread waits for a connection
BODY_ATTEMPTS = 4  # read_objects: tries of one object whose body breaks off while streaming
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0
PROGRESS_MIN_BYTES = 8 * 1024 * 1024  # download_file shows a progress bar from this size on
SINGLE_PUT_MAX_BYTES = 8 * 1024 * 1024  # uploads above this go through boto3's multipart transfer


def is_s3_uri(path: str) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """ "s3://bucket/a/b" -> ("bucket", "a/b"); "s3://bucket" -> ("bucket", "")."""
    if not is_s3_uri(uri):
        raise DataError(f"{uri}: not an s3:// URI (expected s3://BUCKET/PREFIX)")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise DataError(f"{uri}: the S3 URI names no bucket (expected s3://BUCKET/PREFIX)")
    return bucket, key


# --- the client -----------------------------------------------------------------------------------------------

_client_lock = threading.Lock()
_client_cache: list[Any] = []  # at most one client: boto3 clients are thread-safe, sessions are not


def s3_client() -> Any:
    """The process's S3 client, built once from the AWS environment/config (see the module docstring).

    Thread-safe; `s3_client.cache_clear()` forgets it, so that the next call reads the environment again (tests
    that change AWS_* variables). A forked child builds its own."""
    if _client_cache:
        return _client_cache[0]
    with _client_lock:
        if not _client_cache:
            _client_cache.append(_new_client())
        return _client_cache[0]


def _cache_clear() -> None:
    with _client_lock:
        _client_cache.clear()


def _after_fork_in_child() -> None:
    global _client_lock
    _client_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _client_cache.clear()  # connections of the parent's pool must not be shared


s3_client.cache_clear = _cache_clear  # type: ignore[attr-defined]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _new_client() -> Any:
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        core = botocore.session.get_session()
        session = boto3.session.Session(botocore_session=core)
        retries: dict[str, Any] = {
            "mode": os.environ.get("AWS_RETRY_MODE")
            or core.get_scoped_config().get("retry_mode")
            or "standard"
        }
        configured_attempts = core.get_config_variable("max_attempts")  # AWS_MAX_ATTEMPTS: all attempts
        if configured_attempts:
            retries["total_max_attempts"] = int(configured_attempts)
        else:
            retries["max_attempts"] = MAX_RETRIES
        settings: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": retries,
            "max_pool_connections": MAX_POOL_CONNECTIONS,
            "tcp_keepalive": True,
        }
        region = session.region_name or DEFAULT_REGION
        client = session.client("s3", region_name=region, config=Config(**settings))
        if _is_custom_endpoint(client.meta.endpoint_url):
            # SeaweedFS, MinIO & co. serve buckets as paths, not as host names (bucket.host)
            client = session.client(
                "s3", region_name=region, config=Config(**settings, s3={"addressing_style": "path"})
            )
        return client
    except (BotoCoreError, ValueError) as exc:
        raise DataError(f"cannot set up the S3 client: {one_line(exc)}") from exc


def _is_custom_endpoint(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return not host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def _client_for(uri: str) -> Any:
    try:
        return s3_client()
    except DataError as exc:
        raise DataError(f"{uri}: {exc}") from exc


# --- errors ---------------------------------------------------------------------------------------------------

_CREDENTIALS_REJECTED = {
    "InvalidAccessKeyId": "the server does not know this access key; check AWS_ACCESS_KEY_ID or the profile",
    "SignatureDoesNotMatch": "the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY",
    "InvalidToken": "the session token is invalid; check AWS_SESSION_TOKEN",
    "ExpiredToken": "the session token has expired; refresh the credentials",
    "TokenRefreshRequired": "the session token has expired; refresh the credentials",
}


def describe_error(exc: BaseException, uri: str) -> str:
    """One line, "<uri>: <problem in plain words>", for an exception raised while working on `uri`."""
    return f"{uri}: {_problem(exc)}"


def _problem(exc: BaseException) -> str:
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return "no such bucket"
        if code in ("NoSuchKey", "NotFound", "404"):
            return "no such object"
        if code in _CREDENTIALS_REJECTED:
            return f"credentials rejected ({_CREDENTIALS_REJECTED[code]})"
        if code in ("AccessDenied", "Forbidden", "403", "AllAccessDisabled") or status == 403:
            return "access denied"
        if code == "InvalidBucketName":
            return "invalid bucket name"
        message = one_line(error.get("Message") or "")
        return f"S3 error {code or status}" + (f": {message}" if message else "")
    if isinstance(exc, bx.NoCredentialsError):
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    if isinstance(exc, bx.PartialCredentialsError | bx.CredentialRetrievalError | bx.ProfileNotFound):
        return f"AWS credentials unusable ({one_line(exc)})"
    if isinstance(exc, bx.ConnectTimeoutError):
        return f"cannot reach the S3 endpoint {_endpoint(exc)} (connection timed out)"
    if isinstance(exc, bx.SSLError):
        return (
            f"cannot reach the S3 endpoint {_endpoint(exc)} (TLS failed: {one_line(exc.kwargs.get('error'))})"
        )
    if isinstance(exc, bx.ConnectionError):  # EndpointConnectionError, ProxyConnectionError
        return f"cannot reach the S3 endpoint {_endpoint(exc)}"
    if isinstance(exc, bx.ReadTimeoutError):
        return f"the S3 endpoint {_endpoint(exc)} did not answer within {READ_TIMEOUT_S} s"
    if isinstance(exc, bx.ConnectionClosedError):
        return f"the S3 endpoint {_endpoint(exc)} closed the connection"
    if isinstance(exc, bx.ResponseStreamingError | bx.IncompleteReadError):
        return f"the download broke off ({one_line(exc)})"
    if isinstance(exc, bx.FlexibleChecksumError | bx.ChecksumError):
        return "the object arrived corrupted (checksum mismatch)"
    if isinstance(exc, bx.BotoCoreError):
        return one_line(exc)
    # boto3's transfer wrappers: the botocore error they replace
    inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
    if inner is not None and type(exc).__module__.startswith(("boto3", "s3transfer")):
        return _problem(inner)
    if isinstance(exc, DataError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {one_line(exc)}"


def _endpoint(exc: Exception) -> str:
    """scheme://host:port of the URL a botocore connection error carries."""
    url = getattr(exc, "kwargs", {}).get("endpoint_url") or ""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(url) or "(unknown)"


def _data_error(exc: BaseException, uri: str) -> DataError:
    error = DataError(describe_error(exc, uri))
    error.__cause__ = exc
    return error


def _affects_every_object(exc: BaseException) -> bool:
    """Errors no other key would escape: a missing bucket, rejected or missing credentials, no connection."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code == "NoSuchBucket" or code in _CREDENTIALS_REJECTED
    return isinstance(
        exc,
        bx.NoCredentialsError
        | bx.PartialCredentialsError
        | bx.CredentialRetrievalError
        | bx.ProfileNotFound
        | bx.ConnectionError,
    )


# --- listing and reading --------------------------------------------------------------------------------------


def list_objects(uri: str) -> list[tuple[str, int]]:
    """(key, size) of every object under the prefix, sorted by key. A non-empty prefix is a directory:
    s3://b/cats lists s3://b/cats/..., not s3://b/cats2/... Folder markers (keys ending in "/") are left out."""
    bucket, prefix = split_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = _client_for(uri)
    objects: list[tuple[str, int]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(
                (item["Key"], int(item["Size"]))
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")
            )
    except Exception as exc:
        raise _data_error(exc, uri) from exc
    objects.sort()
    return objects


def read_objects(
    bucket: str, keys: Sequence[str], *, workers: int = 16
) -> Iterator[tuple[str, bytes | Exception]]:
    """(key, content) for every key, in the order of `keys`, downloaded by `workers` threads.

    At most 2 x workers objects are in flight or waiting to be taken, so memory stays bounded however many keys
    there are. An object whose body breaks off while streaming is fetched again (exponential backoff with
    jitter; botocore itself retries the requests). An object that still fails comes as a DataError in place of
    its bytes, with a one-line message naming its URI; the others still arrive. A failure no object would
    escape (no such bucket, credentials missing or rejected, endpoint unreachable) is raised as DataError
    instead, at the first key it hits, rather than repeated for every key."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    client = _client_for(f"{SCHEME}{bucket}")
    window = 2 * workers
    key_iter = iter(keys)
    pending: deque[tuple[str, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-read")

    def submit_next() -> None:
        for key in key_iter:
            pending.append((key, pool.submit(_read_object, client, bucket, key)))
            return

    try:
        for _ in range(window):
            submit_next()
        while pending:
            key, future = pending.popleft()
            result = future.result()
            if isinstance(result, Exception) and _affects_every_object(result.__cause__):
                raise result
            submit_next()
            yield key, result
    finally:  # also when the consumer stops early: drop what has not started
        pool.shutdown(wait=True, cancel_futures=True)


def _transient_body_errors() -> tuple[type[BaseException], ...]:
    from http.client import IncompleteRead

    from botocore import exceptions as bx
    from urllib3.exceptions import HTTPError as URLLib3Error

    return (
        bx.ReadTimeoutError,
        bx.ResponseStreamingError,
        bx.IncompleteReadError,
        bx.ConnectionClosedError,
        bx.FlexibleChecksumError,
        URLLib3Error,
        IncompleteRead,
        ConnectionError,
        TimeoutError,
    )


def _backoff(attempt: int) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def _read_object(client: Any, bucket: str, key: str) -> bytes | Exception:
    uri = f"{SCHEME}{bucket}/{key}"
    transient = _transient_body_errors()
    for attempt in range(BODY_ATTEMPTS):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore has already retried the request
            return _data_error(exc, uri)
        try:
            with contextlib.closing(response["Body"]) as body:
                return body.read()
        except transient as exc:
            if attempt + 1 == BODY_ATTEMPTS:
                return _data_error(exc, uri)
            time.sleep(_backoff(attempt))
        except Exception as exc:
            return _data_error(exc, uri)
    raise AssertionError("unreachable")


# --- files ----------------------------------------------------------------------------------------------------


def read_object(uri: str) -> bytes:
    """One object's bytes (with read_objects' retries); DataError with one line naming the URI if it fails."""
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise DataError(f"{uri}: names no object (expected s3://bucket/key)")
    _, content = next(read_objects(bucket, [key], workers=1))
    if isinstance(content, Exception):
        raise content if isinstance(content, DataError) else _data_error(content, uri)
    return content


def download_file(uri: str, destination: str | Path) -> None:
    """One object to a local file: written beside it under a temporary name, renamed once complete."""
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise DataError(f"{uri}: names no object (expected s3://BUCKET/KEY)")
    client = _client_for(uri)
    from botocore.exceptions import ClientError

    try:
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as exc:
        raise _data_error(_explain_head_error(client, bucket, key, exc), uri) from exc
    except Exception as exc:
        raise _data_error(exc, uri) from exc

    bar = None
    if size >= PROGRESS_MIN_BYTES:
        bar = progress(desc=f"download {uri}", total=size, unit="B")
        bar.unit_scale, bar.unit_divisor = True, 1024
    try:
        with atomic_path(destination) as tmp:
            client.download_file(bucket, key, str(tmp), Callback=bar.update if bar is not None else None)
    except Exception as exc:
        raise _data_error(exc, uri) from exc
    finally:
        if bar is not None:
            bar.close()


def _explain_head_error(client: Any, bucket: str, key: str, exc: Exception) -> Exception:
    """A HEAD answer has no body, so its error is a bare status ("404": no bucket or no key? "403": no
    permission or bad credentials?). Ask again with a GET of one byte, whose answer names the error."""
    if exc.response.get("Error", {}).get("Code") not in ("400", "403", "404"):
        return exc
    try:
        client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
    except Exception as detailed:
        return detailed
    return exc


def upload_file(path: str | Path, uri: str) -> None:
    """A local file to s3://bucket/key (to s3://bucket/prefix/<file name> if the URI ends with "/")."""
    path = Path(path)
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        key += path.name
    target = f"{SCHEME}{bucket}/{key}"
    if not path.is_file():
        raise DataError(f"{path}: no such file to upload to {target}")
    _upload(_client_for(target), path, bucket, key)


def upload_directory(local_dir: str | Path, uri: str, *, workers: int = 16) -> None:
    """Every file under `local_dir` to s3://bucket/prefix/<relative posix path>, `workers` at a time."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise DataError(f"{local_dir}: no such directory to upload to {uri}")
    bucket, prefix = split_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    files = sorted(path for path in local_dir.rglob("*") if path.is_file())
    client = _client_for(uri)
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-upload") as pool,
        progress(desc=f"upload {uri}", total=len(files), unit="file") as bar,
    ):
        futures = [
            pool.submit(_upload, client, path, bucket, prefix + path.relative_to(local_dir).as_posix())
            for path in files
        ]
        try:
            for future in futures:
                future.result()
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _upload(client: Any, path: Path, bucket: str, key: str) -> None:
    uri = f"{SCHEME}{bucket}/{key}"
    try:
        if path.stat().st_size <= SINGLE_PUT_MAX_BYTES:
            with open(path, "rb") as body:
                client.put_object(Bucket=bucket, Key=key, Body=body)
        else:
            client.upload_file(str(path), bucket, key)
    except Exception as exc:
        raise _data_error(exc, uri) from exc
