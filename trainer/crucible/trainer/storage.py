"""One small storage API over local paths and ``s3://bucket/prefix`` (boto3).

Every trainer-side area reads and writes artefacts through this module, so a spec's URIs can
be a directory on a PVC in one run and an S3 prefix in the next::

    store = Storage.from_config(spec.storage)           # S3 settings from spec.storage.s3
    store.write_bytes("s3://b/run/_SUCCESS", b"{}")
    store.upload_file("/tmp/model.safetensors", "s3://b/run/model.safetensors")  # multipart
    store.download_prefix("s3://b/run/", "/tmp/model")  # -> local copy of the folder
    store.list("s3://b/run/")                           # URIs of the objects below it

Credentials never come from the spec: boto3 reads ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (the Secret the backends mount) or the pod's ambient identity.
``AWS_ENDPOINT_URL`` overrides the endpoint when the spec has none.

Errors: :class:`StorageNotFound` for a missing object (a caller's or user's mistake), and
:class:`StorageUnavailable` when the store cannot be reached or answers with a server error —
an infrastructure fault that :mod:`crucible.trainer.faults` maps to the retriable exit code.
Local writes are atomic (temporary file + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import base64
import builtins
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.trainer.config.common import S3Config, StorageConfig

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


class StorageError(Exception):
    """A storage operation failed; the message names the URI."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object or path does not exist."""


class StorageUnavailable(StorageError):
    """The store could not be reached or failed on its side (retriable infrastructure fault)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, '/'-separated for S3 and os.path for local paths."""
    if is_s3(uri):
        out = uri.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return str(Path(uri, *parts))


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri!r}: an S3 URI needs a bucket, like s3://bucket/prefix")
        return cls(bucket, key)


class Storage:
    """Local paths and s3:// URIs behind one API. Thread-safe (boto3 clients are)."""

    def __init__(self, s3: S3Config | None = None) -> None:
        self.s3_config = s3 or S3Config()
        self._client: Any = None

    @classmethod
    def from_config(cls, storage: StorageConfig | None) -> Storage:
        return cls(storage.s3 if storage is not None else None)

    # -- S3 plumbing -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = self.s3_config
            style = {"auto": "auto", "path": "path", "virtual": "virtual"}[cfg.addressing_style]
            self._client = boto3.client(
                "s3",
                endpoint_url=cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
                region_name=cfg.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(
                    s3={"addressing_style": style},
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        return self._client

    def _s3_call(self, uri: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise StorageNotFound(f"{uri}: not found ({code})") from exc
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
                raise StorageUnavailable(f"{uri}: storage error {code} (HTTP {status})") from exc
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StorageError(
                    f"{uri}: access denied ({code}); check the credentials Secret named in "
                    "storage.s3.credentialsSecret and its AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                ) from exc
            raise StorageError(f"{uri}: {code or 'error'}: {exc}") from exc
        except NoCredentialsError as exc:
            raise StorageError(
                f"{uri}: no S3 credentials; set storage.s3.credentialsSecret to a Secret with "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from exc
        except (EndpointConnectionError, ConnectionError) as exc:
            raise StorageUnavailable(f"{uri}: cannot reach the S3 endpoint ({exc})") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{uri}: S3 transport error ({exc})") from exc

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=8
        )

    # -- the API -----------------------------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            loc = S3Location.parse(uri)
            resp = self._s3_call(uri, self.client.get_object, Bucket=loc.bucket, Key=loc.key)
            return bytes(self._s3_call(uri, resp["Body"].read))
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError as exc:
            raise StorageNotFound(f"{uri}: no such file") from exc

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one."""
        if is_s3(uri):
            loc = S3Location.parse(uri)
            self._s3_call(uri, self.client.put_object, Bucket=loc.bucket, Key=loc.key, Body=data)
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def upload_file(self, local: str | os.PathLike[str], uri: str, sha256: str | None = None) -> None:
        """Copy a local file to ``uri``; multipart above 64 MiB on S3, atomic rename locally.

        With ``sha256`` (the file's hex digest) S3 checks the object against it on arrival (one
        part), or every part against its own SHA-256 checksum (multipart), so a byte flipped on
        the wire fails the upload instead of landing in a checkpoint.
        """
        if is_s3(uri):
            loc = S3Location.parse(uri)
            size = Path(local).stat().st_size
            if sha256 is not None and size < MULTIPART_THRESHOLD:
                checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
                with open(local, "rb") as body:
                    self._s3_call(uri, self.client.put_object, Bucket=loc.bucket, Key=loc.key, Body=body,
                                  ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)
                return
            extra = {"ChecksumAlgorithm": "SHA256"} if sha256 is not None else None
            self._s3_call(
                uri, self.client.upload_file, str(local), loc.bucket, loc.key, Config=self._transfer_config(),
                ExtraArgs=extra,
            )
            return
        dest = Path(uri)
        if Path(local).resolve() == dest.resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(local, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)

    def download_file(
        self, uri: str, local: str | os.PathLike[str], progress: Callable[[int], None] | None = None
    ) -> None:
        """Copy ``uri`` to the local file ``local``; ``progress(bytes)`` is called as the bytes arrive."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if is_s3(uri):
            loc = S3Location.parse(uri)
            self._s3_call(
                uri, self.client.download_file, loc.bucket, loc.key, str(local), Config=self._transfer_config(),
                Callback=progress,
            )
            return
        if not Path(uri).is_file():
            raise StorageNotFound(f"{uri}: no such file")
        shutil.copyfile(uri, local)

    def exists(self, uri: str) -> bool:
        """True for an existing file/object, or a directory/prefix with anything below it."""
        if is_s3(uri):
            loc = S3Location.parse(uri)
            try:
                self._s3_call(uri, self.client.head_object, Bucket=loc.bucket, Key=loc.key)
                return True
            except StorageNotFound:
                return any(True for _ in self._iter_s3(uri.rstrip("/") + "/", limit=1))
        return Path(uri).exists()

    def list(self, uri: str, recursive: bool = True) -> list[str]:
        """URIs of the files below ``uri`` (a directory or prefix), sorted.

        ``recursive=False`` lists only the immediate children; sub-directories (prefixes) are
        returned with a trailing '/'.
        """
        if is_s3(uri):
            prefix = uri.rstrip("/") + "/"
            if recursive:
                return sorted(self._iter_s3(prefix))
            return sorted(self._iter_s3(prefix, delimiter="/"))
        root = Path(uri)
        if not root.is_dir():
            return []
        if recursive:
            return sorted(str(p) for p in root.rglob("*") if p.is_file())
        return sorted(str(p) + ("/" if p.is_dir() else "") for p in root.iterdir())

    def _iter_s3(self, prefix_uri: str, delimiter: str | None = None, limit: int | None = None) -> Iterator[str]:
        loc = S3Location.parse(prefix_uri)
        paginator = self.client.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": loc.key}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if limit:
            kwargs["PaginationConfig"] = {"MaxItems": limit}
        pages = self._s3_call(prefix_uri, lambda: list(paginator.paginate(**kwargs)))
        for page in pages:
            for obj in page.get("Contents", []):
                yield f"s3://{loc.bucket}/{obj['Key']}"
            for common in page.get("CommonPrefixes", []):
                yield f"s3://{loc.bucket}/{common['Prefix']}"

    def delete(self, uri: str) -> None:
        """Delete one file/object; missing is fine."""
        if is_s3(uri):
            loc = S3Location.parse(uri)
            self._s3_call(uri, self.client.delete_object, Bucket=loc.bucket, Key=loc.key)
            return
        Path(uri).unlink(missing_ok=True)

    def delete_prefix(self, uri: str) -> None:
        """Delete everything below a directory/prefix (the prefix itself for local dirs)."""
        if is_s3(uri):
            loc = S3Location.parse(uri)
            keys = [S3Location.parse(u).key for u in self._iter_s3(uri.rstrip("/") + "/")]
            for i in range(0, len(keys), 1000):
                batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
                self._s3_call(uri, self.client.delete_objects, Bucket=loc.bucket, Delete=batch)
            return
        shutil.rmtree(uri, ignore_errors=True)

    def download_prefix(self, uri: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy every object below ``uri`` into ``local_dir`` (keeping relative paths)."""
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        if not is_s3(uri):
            if not Path(uri).is_dir():
                raise StorageNotFound(f"{uri}: no such directory")
            shutil.copytree(uri, local, dirs_exist_ok=True)
            return local
        prefix = uri.rstrip("/") + "/"
        found = False
        for obj_uri in self._iter_s3(prefix):
            rel = obj_uri[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            found = True
            self.download_file(obj_uri, local / rel)
        if not found:
            raise StorageNotFound(f"{uri}: no objects under this prefix")
        return local

    def upload_dir(self, local_dir: str | os.PathLike[str], uri: str, last: tuple[str, ...] = ()) -> None:
        """Copy a local folder to ``uri``; files named in ``last`` go after all others."""
        root = Path(local_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(root).as_posix() in last)
        for path in files:
            self.upload_file(path, join(uri, path.relative_to(root).as_posix()))

    def node_local_path(self, uri: str, field: str = "model source", log: Callable[[str], None] | None = None) -> Path:
        """:meth:`local_path` fetched once per node, not once per rank.

        A local path is returned as it is. An ``s3://`` prefix (or a ``.gguf`` to convert) goes into
        the node's cache (``$CRUCIBLE_NODE_CACHE``, default ``<tmp>/crucible-node-cache``) under a key
        of the URI and the objects' names, sizes and ETags: the first rank of the node to take the
        entry's file lock downloads it (into a temporary folder, renamed when complete); the others
        wait on the lock and find it there, as does a restarted run whose source has not changed.
        """
        import fcntl
        import hashlib

        from crucible.trainer import gguf_import

        if not is_s3(uri) and not gguf_import.is_gguf(uri):
            return self.local_path(uri, tempfile.gettempdir(), field=field)
        signature = [uri]
        if is_s3(uri):
            signature += self._signature(uri)
        elif Path(uri).is_file():  # a local .gguf: converted again when the file changes
            info = Path(uri).stat()
            signature.append(f"{info.st_size} {info.st_mtime_ns}")
        key = hashlib.sha256("\n".join(signature).encode()).hexdigest()[:24]
        root = Path(os.environ.get("CRUCIBLE_NODE_CACHE") or Path(tempfile.gettempdir()) / "crucible-node-cache")
        root.mkdir(parents=True, exist_ok=True)
        entry = root / key
        with open(root / f"{key}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks of the node wait here
            try:
                done = entry / ".crucible-complete"
                if done.is_file():
                    found = Path(done.read_text().strip() or entry)
                    if log is not None:
                        log(f"{field} {uri}: from the node cache {found}")
                    return found
                partial = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=root))
                try:
                    got = self.local_path(uri, partial, field=field)
                    rel = got.relative_to(partial) if got.is_relative_to(partial) else None
                    shutil.rmtree(entry, ignore_errors=True)
                    partial.rename(entry)
                except BaseException:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
                found = entry / rel if rel is not None else got
                (entry / ".crucible-complete").write_text(str(found))
                if log is not None:
                    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                    log(f"{field} {uri}: downloaded once for this node ({size} bytes) into {found}")
                return found
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _signature(self, uri: str) -> builtins.list[str]:
        """Name, size and ETag of every object below an S3 prefix (what decides a cache entry)."""
        loc = S3Location.parse(uri.rstrip("/") + "/")
        paginator = self.client.get_paginator("list_objects_v2")
        out: builtins.list[str] = []
        pages = self._s3_call(uri, lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=loc.key)))
        for page in pages:
            for obj in page.get("Contents", []):
                out.append(f"{obj['Key']} {obj['Size']} {obj.get('ETag', '')}")
        return sorted(out)

    def local_path(self, uri: str, cache_dir: str | os.PathLike[str], field: str = "model source") -> Path:
        """A local directory holding ``uri``: the path itself, or an S3 prefix downloaded to cache_dir.

        A ``.gguf`` file is a model too: it is converted once into a Hugging Face directory
        (``crucible.trainer.gguf_import``) and that directory is returned.
        """
        from crucible.trainer import gguf_import

        if gguf_import.is_gguf(uri):
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            return gguf_import.materialize(uri, self, cache_dir, field=field)
        if not is_s3(uri):
            if not Path(uri).exists():
                raise StorageNotFound(f"{uri}: no such file or directory")
            return Path(uri)
        return self.download_prefix(uri, cache_dir)
