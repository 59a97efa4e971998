"""Sharded, verified, asynchronous checkpoints on a local path or S3.

Layout under ``checkpoint.uri``::

    step-000000120/
        state/.metadata             DCP metadata: global shapes, which chunk lives in which file (rank 0)
        state/__R_0.distcp          rank R's own shards of model + optimizer (+ loss scaler), written by R
        deepspeed/...               DeepSpeed's per-rank ZeRO files instead of state/ (strategy deepspeed)
        rng/rank-RRRRR.json         every rank's Python/NumPy/torch RNG states (JSON, never pickle)
        trainer.json                step, tokens, data position + skip windows, loss window (rank 0)
        .done-rank-RRRRR.json       each rank's file list with sizes and sha256, written after its files
        manifest.json               written LAST by rank 0, once every rank's .done file is there
    metrics.jsonl  skip-windows.json

Model and optimizer state go through ``torch.distributed.checkpoint`` (DCP): every rank writes
only the shards it holds (FSDP2 DTensor shards; replicated DDP tensors are spread over the
ranks by DCP's de-duplication), in parallel, and nothing is gathered to one rank. The
metadata records global shapes, so a checkpoint loads at another world size and across
ddp ↔ fsdp (DCP reads the overlapping chunks). DeepSpeed keeps its own per-rank format.

A checkpoint exists only when ``manifest.json`` does, and is valid only when every file it
lists has the listed size and sha256. :meth:`Checkpointer.latest_valid` walks the steps from
the newest down and skips torn (no manifest) or corrupted ones with a log line saying why, so
a process killed at any point of a save — between data files and manifest included — or a
flipped byte never becomes a resume point. Verifying is shared out: each rank hashes (and on
S3 downloads) only the files its own load reads, the shared files once per node, and the
ranks agree on the verdict before anything is loaded into the model.

Nothing in a checkpoint can run code when loaded: tensors are read with
``torch.load(weights_only=True)``, DCP's pickled ``.metadata`` through an unpickler that
admits only DCP's metadata classes, DCP's non-tensor items (optimizer hyper-parameters) with
``weights_only=True``, and RNG and trainer state are JSON.

Async save: the loop blocks only while state is copied into CPU staging buffers (reused from
save to save); DCP's write, hashing, the per-rank S3 uploads and the manifest run in a
background thread whose collectives go over their own gloo process group.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import pickle
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from crucible.trainer import storage as st
from crucible.trainer.distributed import DistEnv, Strategy, all_gather_object, barrier, broadcast_object
from crucible.trainer.faults import SpecError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
SKIPS_FILE = "skip-windows.json"
STATE_DIR = "state"
DCP_METADATA = f"{STATE_DIR}/.metadata"
FORMAT = "crucible-checkpoint"
VERSION = 2
_STEP_DIR = re.compile(r"^step-(\d{9})$")
_HASH_BLOCK = 1 << 22


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def rng_file_name(rank: int) -> str:
    return f"rng/rank-{rank:05d}.json"


def done_file_name(rank: int) -> str:
    return f".done-rank-{rank:05d}.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path, progress: Callable[[str], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            if progress is not None:
                progress(f"checkpoint verification ({path.name})")
    return h.hexdigest()


class CheckpointInvalid(Exception):
    """Why a checkpoint cannot be resumed from."""


class CheckpointWorldSizeError(RuntimeError):
    """The checkpoint cannot continue on this world size or strategy."""


class CheckpointMismatch(SpecError):
    """The checkpoint verified but does not fit this run (another model shape), or holds what it never
    should (code to run); loading stops before training continues on a half-restored state."""


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str
    manifest: dict[str, Any]


# -- RNG state as JSON (a checkpoint never carries a pickle that is unpickled freely) -----------


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _b64_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _tensor_b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_b64_tensor(state["cuda"]))


def reseed(seed: int, step: int, rank: int) -> None:
    mixed = (seed * 1_000_003 + step * 9_973 + rank) % (2**31)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


# -- DCP plumbing that never runs code from the checkpoint ------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_SAFE_TORCH = {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format",
               "channels_last_3d"}
_SAFE_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                  ("builtins", "slice"), ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"),
                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
                  ("torch.serialization", "_get_layout")}  # a lookup of torch.strided & co by name


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's ``.metadata`` consists of: its dataclasses, sizes, dtypes, enums."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and (name in _SAFE_TORCH or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise CheckpointInvalid(
            f"{DCP_METADATA} references {module}.{name}, which a checkpoint never holds; the file was "
            "tampered with or is not a checkpoint — refusing to load it"
        )


def read_dcp_metadata(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except CheckpointInvalid:
        raise
    except Exception as exc:
        raise CheckpointInvalid(f"{DCP_METADATA} cannot be read ({type(exc).__name__}: {exc})") from exc


def _dcp_reader_and_planner(directory: Path, progress: Callable[[str], None] | None) -> tuple[Any, Any]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(Path(self.path) / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                found = re.search(r"unsupported GLOBAL [^ ]+", str(exc))
                why = found.group(0) if found else str(exc).splitlines()[0]
                raise CheckpointInvalid(
                    f"{STATE_DIR}/ item {read_item.dest_index.fqn} is not plain data ({why}); refusing to load it"
                ) from exc
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element as set_nested

                set_nested(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

        def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
            if progress is not None:
                progress("checkpoint load")

    return SafeReader(str(directory)), SafePlanner()


def _dcp_files_for(state_dict: dict[str, Any], metadata: Any) -> set[str]:
    """The DCP files this rank's load of ``state_dict`` reads (its own shards, or the overlapping ones)."""
    _, planner = _dcp_reader_and_planner(Path("."), None)
    planner.set_up_planner(state_dict, metadata, False)
    plan = planner.create_local_plan()
    return {f"{STATE_DIR}/{metadata.storage_data[item.storage_index].relative_path}" for item in plan.items}


# -- the checkpointer ----------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the training state; one instance per rank, every method collective."""

    def __init__(
        self,
        uri: str,
        store: st.Storage,
        env: DistEnv,
        keep: int,
        async_save: bool,
        config_hash: str,
        log: Callable[[str], None],
        done_timeout_s: float = 1800.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.uri = uri
        self.store = store
        self.env = env
        self.keep = keep
        self.async_save = async_save
        self.config_hash = config_hash
        self.log = log
        self.progress = progress
        self.done_timeout_s = done_timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stager: Any = None
        self._pg: Any = None
        self.last_blocking_s = 0.0
        self.last_total_s = 0.0
        self.last_write_s = 0.0
        self.last_bytes_written = 0
        self.last_step: int | None = None
        self._cache = Path(tempfile.mkdtemp(prefix="crucible-ckpt-"))
        self._node_cache: Path | None = None

    def _beat(self, what: str) -> None:
        if self.progress is not None:
            self.progress(what)

    @property
    def _distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def _process_group(self) -> Any:
        """A gloo group of its own: the background writer's collectives never interleave with training's."""
        if self._pg is None and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else dist.group.WORLD
        return self._pg

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict[str, Any], strategy: Strategy) -> None:
        """Snapshot now (collective: every rank calls it at the same step); write maybe in background."""
        self.wait()  # a save still running when the next one is due is finished first
        started = time.perf_counter()
        step_uri = st.join(self.uri, step_dir_name(step))
        if self.env.is_main and self.store.exists(step_uri):
            self.store.delete_prefix(step_uri)  # a torn leftover of an earlier attempt at this step
        pg = self._process_group()
        barrier()
        local = Path(step_uri) if not st.is_s3(step_uri) else self._cache / step_dir_name(step)
        files: dict[str, bytes] = {rng_file_name(self.env.rank): json.dumps(rng_state()).encode()}
        if self.env.is_main:
            files[TRAINER_STATE] = json.dumps(
                {**trainer_state, "worldSize": self.env.world_size, "strategy": strategy.name,
                 "configHash": self.config_hash, "formatVersion": VERSION},
                indent=1,
            ).encode()
        if strategy.world_size_bound:  # DeepSpeed writes its own files, synchronously
            local_files = [p.relative_to(local).as_posix() for p in strategy.save_local(local)]
            staged: dict[str, Any] | None = None
        else:
            local_files = []
            state = strategy.state_dict()
            staged = self._stage(state) if self.async_save else state
        self.last_blocking_s = time.perf_counter() - started

        def write() -> None:
            written = time.perf_counter()
            own = list(local_files)
            if staged is not None:
                own += self._write_dcp(staged, local / STATE_DIR, pg)
            self._finish(step, step_uri, local, files, own, trainer_state)
            self.last_write_s = time.perf_counter() - written
            self.last_total_s = time.perf_counter() - started

        if self.async_save:
            self._thread = threading.Thread(target=self._guard(write), name=f"ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            write()

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """Copy the state into CPU staging buffers that are reused from save to save (pinned on CUDA)."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            cuda = self.env.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        staged = self._stager.stage(state)
        assert isinstance(staged, dict)
        return staged

    def _write_dcp(self, state: dict[str, Any], directory: Path, pg: Any) -> list[str]:
        """DCP save of this rank's shards into ``directory``; the files this rank wrote (relative to the step)."""
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, sync_files=True, thread_count=1)
        with warnings_quiet():
            dcp.save(state, storage_writer=writer, process_group=pg)
        mine = sorted(p.name for p in directory.glob(f"__{self.env.rank}_*.distcp"))
        if self.env.is_main:
            mine.append(".metadata")
        return [f"{STATE_DIR}/{name}" for name in mine]

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self._error = exc

        return run

    def wait(self) -> None:
        """Block until the background save is finished; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    @property
    def saving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _finish(
        self,
        step: int,
        step_uri: str,
        local: Path,
        files: dict[str, bytes],
        own_files: list[str],
        trainer_state: dict[str, Any],
    ) -> None:
        """Small files, hashes and uploads of this rank's files, its .done file; rank 0: the manifest."""
        listing: dict[str, dict[str, Any]] = {}
        rank = self.env.rank
        for name, data in files.items():
            self.store.write_bytes(st.join(step_uri, name), data)
            listing[name] = {"bytes": len(data), "sha256": sha256_bytes(data), "rank": rank}
        for rel in own_files:
            path = local / rel
            digest = _sha256_file(path)
            listing[rel] = {"bytes": path.stat().st_size, "sha256": digest, "rank": rank}
            if st.is_s3(step_uri):
                self.store.upload_file(path, st.join(step_uri, rel), sha256=digest)
        self.last_bytes_written = sum(int(m["bytes"]) for m in listing.values())
        self.store.write_bytes(st.join(step_uri, done_file_name(rank)), json.dumps(listing).encode())
        if st.is_s3(step_uri):
            shutil.rmtree(local, ignore_errors=True)
        if not self.env.is_main:
            return
        merged = self._collect_done(step_uri)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "tokens": trainer_state.get("tokens", 0),
            "worldSize": self.env.world_size,
            "configHash": self.config_hash,
            "createdAt": time.time(),
            "files": merged,
        }
        self.store.write_bytes(st.join(step_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
        self.last_step = step
        self._prune(step)

    def _collect_done(self, step_uri: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + self.done_timeout_s
        names = [done_file_name(r) for r in range(self.env.world_size)]
        merged: dict[str, dict[str, Any]] = {}
        pending = list(names)
        while pending:
            still = []
            for name in pending:
                try:
                    merged.update(json.loads(self.store.read_bytes(st.join(step_uri, name))))
                except st.StorageNotFound:
                    still.append(name)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{step_uri}: ranks never finished writing ({', '.join(pending)})")
                time.sleep(0.05)
        return merged

    def _prune(self, newest: int) -> None:
        steps = self.list_steps()
        valid = [s for s in steps if self.store.exists(st.join(self.uri, step_dir_name(s), MANIFEST))]
        keep = set(sorted(valid)[-self.keep :])
        for s in steps:
            if s in keep or s > newest:
                continue
            self.store.delete_prefix(st.join(self.uri, step_dir_name(s)))

    # -- finding and verifying ----------------------------------------------------------------------

    def list_steps(self) -> list[int]:
        steps = []
        for child in self.store.list(self.uri, recursive=False):
            m = _STEP_DIR.match(child.rstrip("/").rsplit("/", 1)[-1])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def read_manifest(self, step: int) -> dict[str, Any]:
        step_uri = st.join(self.uri, step_dir_name(step))
        try:
            manifest = json.loads(self.store.read_bytes(st.join(step_uri, MANIFEST)))
        except st.StorageNotFound as exc:
            raise CheckpointInvalid("no manifest.json: the save was interrupted before it finished") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointInvalid(f"manifest.json is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("step") != step:
            raise CheckpointInvalid(f"manifest.json is not a {FORMAT} manifest of step {step}")
        if manifest.get("version") != VERSION:
            raise CheckpointInvalid(
                f"manifest.json has format version {manifest.get('version')}, this trainer reads {VERSION}; "
                "resume it with the Crucible release that wrote it, or set checkpoint.resume: never"
            )
        if not isinstance(manifest.get("files"), dict):
            raise CheckpointInvalid("manifest.json lists no files")
        return manifest

    def _local_dir(self, step: int) -> Path:
        """Where this node's copy of the step lives: the path itself, or a per-node download cache."""
        step_uri = st.join(self.uri, step_dir_name(step))
        if not st.is_s3(step_uri):
            return Path(step_uri)
        if self._node_cache is None:
            name = broadcast_object(f"crucible-ckpt-{uuid.uuid4().hex[:12]}")  # one folder name, every node
            self._node_cache = Path(tempfile.gettempdir()) / name
        return self._node_cache / step_dir_name(step)

    def _fetch_and_check(self, step: int, rels: list[str], manifest: dict[str, Any], local: Path) -> None:
        step_uri = st.join(self.uri, step_dir_name(step))
        for rel in rels:
            meta = manifest["files"].get(rel)
            if meta is None:
                raise CheckpointInvalid(f"{rel} is needed but not listed in the manifest")
            path = local / rel
            if st.is_s3(step_uri) and not (path.is_file() and path.stat().st_size == meta["bytes"]):
                part = path.with_name(f".{path.name}.{self.env.rank}.part")
                try:
                    self.store.download_file(st.join(step_uri, rel), part,
                                             progress=lambda n: self._beat("checkpoint download"))
                except st.StorageNotFound as exc:
                    raise CheckpointInvalid(f"{rel} is listed in the manifest but missing") from exc
                part.replace(path)
            if not path.is_file():
                raise CheckpointInvalid(f"{rel} is listed in the manifest but missing")
            size = path.stat().st_size
            if size != meta["bytes"]:
                raise CheckpointInvalid(f"{rel} has {size} bytes, the manifest says {meta['bytes']}")
            if _sha256_file(path, self._beat) != meta["sha256"]:
                raise CheckpointInvalid(f"{rel} does not match its sha256 in the manifest (corrupted)")
            if rel.endswith(".json"):
                try:
                    json.loads(path.read_text())
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise CheckpointInvalid(f"{rel} is not valid JSON ({exc})") from exc

    def _needed_files(self, manifest: dict[str, Any], local: Path, strategy: Strategy | None) -> list[str]:
        """The files this rank reads to load: its own shards (or, resharding, the overlapping ones)."""
        files = manifest["files"]
        if strategy is None:
            return sorted(files)  # an offline check: everything
        same_world = manifest.get("worldSize") == self.env.world_size
        needed = {r for r in (rng_file_name(self.env.rank),) if r in files and same_world}
        if strategy.world_size_bound:
            needed |= {r for r in files if r.startswith(f"{strategy.name}/")
                       and strategy.owns_checkpoint_file(Path(r).name)}
            return sorted(needed)
        if DCP_METADATA not in files:
            raise CheckpointInvalid(f"no {DCP_METADATA} in the manifest: not a sharded (DCP) checkpoint")
        metadata = read_dcp_metadata(local / DCP_METADATA)
        needed |= _dcp_files_for(strategy.state_dict(), metadata)
        return sorted(needed)

    def verify(self, step: int, strategy: Strategy | None = None) -> tuple[CheckpointRef, Path]:
        """The checkpoint's manifest and a local directory holding the verified files this rank needs.

        With a strategy this is collective: rank 0 reads the manifest, one rank per node fetches and
        checks the shared files, every rank the files its own load reads, and all agree on the verdict.
        Without one (an offline check, one process), every file is fetched and checked.
        """
        collective = strategy is not None and self._distributed
        step_uri = st.join(self.uri, step_dir_name(step))
        reason: str | None = None
        manifest: dict[str, Any] | None = None
        if self.env.is_main or not collective:
            try:
                manifest = self.read_manifest(step)
            except CheckpointInvalid as exc:
                reason = str(exc)
        if collective:
            manifest, reason = broadcast_object((manifest, reason))
        if reason is not None:
            raise CheckpointInvalid(reason)
        assert manifest is not None
        local = self._local_dir(step)
        shared = [TRAINER_STATE] + ([DCP_METADATA] if DCP_METADATA in manifest["files"] else [])
        try:
            if self.env.local_rank == 0 or not collective:
                self._fetch_and_check(step, shared, manifest, local)
        except CheckpointInvalid as exc:
            reason = str(exc)
        if collective:
            reason = _first_reason(all_gather_object(reason))
        if reason is None:
            try:
                needed = [r for r in self._needed_files(manifest, local, strategy) if r not in shared]
                self._fetch_and_check(step, needed, manifest, local)
            except CheckpointInvalid as exc:
                reason = str(exc)
            if collective:
                reason = _first_reason(all_gather_object(reason))
        if reason is not None:
            raise CheckpointInvalid(reason)
        return CheckpointRef(step, step_uri, manifest), local

    def latest_valid(self, strategy: Strategy | None = None) -> tuple[CheckpointRef, Path] | None:
        steps = self.list_steps() if (self.env.is_main or strategy is None) else []
        if strategy is not None:
            steps = broadcast_object(steps)
        for step in reversed(steps):
            try:
                return self.verify(step, strategy)
            except CheckpointInvalid as exc:
                self.log(f"checkpoint {st.join(self.uri, step_dir_name(step))} skipped: {exc}")
        return None

    # -- loading --------------------------------------------------------------------------------

    def load(self, ref: CheckpointRef, local: Path, strategy: Strategy, seed: int) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG; the trainer state (step, data position...)."""
        trainer_state = json.loads((local / TRAINER_STATE).read_text())
        saved_world = int(trainer_state["worldSize"])
        saved_strategy = trainer_state.get("strategy")
        if saved_strategy != strategy.name and "deepspeed" in (saved_strategy, strategy.name):
            raise CheckpointWorldSizeError(
                f"{ref.uri} was written with strategy {saved_strategy}, this run uses {strategy.name}; "
                "ddp and fsdp checkpoints are interchangeable, deepspeed ones are not. Keep "
                f"training.strategy: {saved_strategy}, or start fresh with checkpoint.resume: never"
            )
        if saved_world != self.env.world_size:
            if strategy.world_size_bound:
                raise CheckpointWorldSizeError(
                    f"{ref.uri} was written by {saved_world} ranks with strategy deepspeed, whose ZeRO "
                    f"files are per rank; this attempt has {self.env.world_size}. Resume with "
                    f"{saved_world} ranks (resources.nodes × GPUs per node), convert it with DeepSpeed's "
                    "ds_to_universal, or use strategy ddp/fsdp, whose checkpoints reshard"
                )
            self.log(
                f"resharding {ref.uri}: written by {saved_world} ranks, resuming on {self.env.world_size}; "
                "the data order continues unchanged, per-rank RNG streams are reseeded"
            )
        if strategy.world_size_bound:
            strategy.load_local(local)
        else:
            self._load_dcp(local / STATE_DIR, strategy)
        rng_file = local / rng_file_name(self.env.rank)
        if saved_world == self.env.world_size and rng_file.is_file():
            try:
                set_rng_state(json.loads(rng_file.read_text()))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointMismatch(f"{rng_file}: not an RNG state ({type(exc).__name__}: {exc})") from exc
        else:
            reseed(seed, ref.step, self.env.rank)
        if trainer_state.get("configHash") != self.config_hash:
            self.log(
                f"note: {ref.uri} was written with a different model/training/optimizer config "
                "(config hash differs); continuing with the current spec"
            )
        if st.is_s3(ref.uri):
            shutil.rmtree(local, ignore_errors=True)
        return trainer_state

    def _load_dcp(self, directory: Path, strategy: Strategy) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        state = strategy.state_dict()
        saved = read_dcp_metadata(directory / ".metadata").state_dict_metadata
        if "scaler" in state and not any(k.startswith("scaler.") for k in saved):
            state.pop("scaler")  # written by an fp32/bf16 run: the fp16 loss scale starts fresh
            self.log("note: the checkpoint has no fp16 loss-scaler state; the loss scale starts fresh")
        reader, planner = _dcp_reader_and_planner(directory, self._beat)
        try:
            with warnings_quiet():
                dcp.load(state, storage_reader=reader, planner=planner, process_group=self._process_group())
        except CheckpointException as exc:
            failures = [pair[0] for pair in exc.failures.values()]
            for failure in failures:
                if isinstance(failure, CheckpointInvalid):
                    raise CheckpointMismatch(f"{directory}: {failure}") from exc
            raise CheckpointMismatch(_shape_message(directory.parent, failures)) from exc
        strategy.load_state_dict(state)

    # -- skip windows outside any checkpoint (so a crash right after a rollback keeps them) -----

    def read_skips(self) -> list[list[int]]:
        try:
            return [list(map(int, w)) for w in json.loads(self.store.read_bytes(st.join(self.uri, SKIPS_FILE)))]
        except st.StorageNotFound:
            return []

    def write_skips(self, windows: list[list[int]]) -> None:
        if self.env.is_main:
            self.store.write_bytes(st.join(self.uri, SKIPS_FILE), json.dumps(windows).encode())

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        shutil.rmtree(self._cache, ignore_errors=True)
        if self._node_cache is not None and self.env.local_rank == 0:
            shutil.rmtree(self._node_cache, ignore_errors=True)


def _first_reason(reasons: list[str | None]) -> str | None:
    for rank, reason in enumerate(reasons):
        if reason is not None:
            return f"{reason} (found by rank {rank})" if len(reasons) > 1 else reason
    return None


def _shape_message(step_dir: Path, failures: list[BaseException]) -> str:
    text = "\n".join(f"{type(f).__name__}: {f}" for f in failures)
    hint = re.findall(r"[Ss]ize mismatch[^\n]*|Missing key[^\n]*|mismatch sizes[^\n]*", text)
    detail = "; ".join(list(dict.fromkeys(hint))[:3]) or (text.splitlines() or ["unknown error"])[0][:500]
    return (
        f"{step_dir} does not fit this model: {detail}. The checkpoint was written for another model "
        "shape; restore the model fields it was written with, point checkpoint.uri elsewhere, or set "
        "checkpoint.resume: never to start fresh"
    )


@contextlib.contextmanager
def warnings_quiet() -> Any:
    """DCP warns on every save about overwriting and on single-process use; neither is news here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def young_daly_interval(save_seconds: float, failures_per_hour: float, step_seconds: float) -> int:
    """Steps between checkpoints that minimise expected lost work: √(2·C·MTBF) (Young 1974, Daly 2006)."""
    mtbf = 3600.0 / max(failures_per_hour, 1e-9)
    optimal_s = (2.0 * max(save_seconds, 1e-3) * mtbf) ** 0.5
    return max(1, round(optimal_s / max(step_seconds, 1e-6)))
