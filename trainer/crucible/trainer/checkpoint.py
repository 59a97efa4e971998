"""Atomic, verified, optionally asynchronous checkpoints on a local path or S3.

Layout under ``checkpoint.uri``::

    step-000000120/
        model.pt  optimizer.pt      full state, rank 0 (ddp/fsdp; see distributed.py)
        deepspeed/...               DeepSpeed's per-rank ZeRO files (strategy deepspeed)
        rng-rank-00000.pt ...       every rank's Python/NumPy/torch RNG states
        trainer.json                step, tokens, data position + skip windows, loss window
        .done-rank-00000.json ...   each rank's file list with sizes and sha256, written after its files
        manifest.json               written LAST by rank 0, once every rank's .done file is there
    metrics.jsonl  skip-windows.json

A checkpoint exists only when ``manifest.json`` does, and is valid only when every file it
lists has the listed size and sha256. :meth:`Checkpointer.latest_valid` walks the steps from
the newest down and skips torn (no manifest) or corrupted ones with a log line saying why,
so a process killed at any point of a save — between data files and manifest included — or
a flipped byte never becomes a resume point. On S3 every data object is complete (multipart
uploads included) before the manifest object is put.

Async save: the training loop blocks only while state is copied to CPU memory (and, for
ddp/fsdp, gathered to rank 0); writing, hashing, uploading and the manifest happen in a
background thread with no collectives (ranks coordinate through the ``.done`` files).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.trainer import storage as st
from crucible.trainer.distributed import DistEnv, Strategy, barrier

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
SKIPS_FILE = "skip-windows.json"
FORMAT = "crucible-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class CheckpointInvalid(Exception):
    """Why a checkpoint cannot be resumed from."""


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str
    manifest: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Checkpointer:
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
    ) -> None:
        self.uri = uri
        self.store = store
        self.env = env
        self.keep = keep
        self.async_save = async_save
        self.config_hash = config_hash
        self.log = log
        self.done_timeout_s = done_timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_blocking_s = 0.0
        self.last_total_s = 0.0
        self.last_step: int | None = None
        self._cache = Path(tempfile.mkdtemp(prefix="crucible-ckpt-"))

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict[str, Any], strategy: Strategy) -> None:
        """Snapshot now (collective: every rank calls it at the same step); write maybe in background."""
        self.wait()
        started = time.perf_counter()
        step_uri = st.join(self.uri, step_dir_name(step))
        if self.env.is_main and self.store.exists(step_uri):
            self.store.delete_prefix(step_uri)  # a torn leftover of an earlier attempt at this step
        barrier()
        files: dict[str, bytes] = {f"rng-rank-{self.env.rank:05d}.pt": _torch_bytes(rng_state())}
        local_files: list[tuple[str, Path]] = []
        if strategy.world_size_bound:
            staging = Path(step_uri) if not st.is_s3(step_uri) else self._cache / step_dir_name(step)
            for path in strategy.save_local(staging):
                local_files.append((path.relative_to(staging).as_posix(), path))
            snapshot: dict[str, Any] | None = None
        else:
            snapshot = strategy.full_state(with_optimizer=True)
        if self.env.is_main:
            files[TRAINER_STATE] = json.dumps(
                {**trainer_state, "worldSize": self.env.world_size, "strategy": strategy.name,
                 "configHash": self.config_hash},
                indent=1,
            ).encode()
        self.last_blocking_s = time.perf_counter() - started

        def write() -> None:
            if snapshot is not None:
                files["model.pt"] = _torch_bytes(snapshot["model"])
                files["optimizer.pt"] = _torch_bytes(snapshot["optimizer"])
            self._write_files(step, step_uri, files, local_files, trainer_state)
            self.last_total_s = time.perf_counter() - started

        if self.async_save:
            self._thread = threading.Thread(target=self._guard(write), name=f"ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            write()

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

    def _write_files(
        self,
        step: int,
        step_uri: str,
        files: dict[str, bytes],
        local_files: list[tuple[str, Path]],
        trainer_state: dict[str, Any],
    ) -> None:
        listing: dict[str, dict[str, Any]] = {}
        for name, data in files.items():
            self.store.write_bytes(st.join(step_uri, name), data)
            listing[name] = {"bytes": len(data), "sha256": sha256_bytes(data)}
        for rel, path in local_files:
            listing[rel] = {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}
            if st.is_s3(step_uri):
                self.store.upload_file(path, st.join(step_uri, rel))
        done = f".done-rank-{self.env.rank:05d}.json"
        self.store.write_bytes(st.join(step_uri, done), json.dumps(listing).encode())
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
        if st.is_s3(step_uri):
            shutil.rmtree(self._cache / step_dir_name(step), ignore_errors=True)
        self._prune(step)

    def _collect_done(self, step_uri: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + self.done_timeout_s
        names = [f".done-rank-{r:05d}.json" for r in range(self.env.world_size)]
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

    # -- finding and loading -------------------------------------------------------------------

    def list_steps(self) -> list[int]:
        steps = []
        for child in self.store.list(self.uri, recursive=False):
            m = _STEP_DIR.match(child.rstrip("/").rsplit("/", 1)[-1])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def verify(self, step: int) -> tuple[CheckpointRef, Path]:
        """The checkpoint's manifest and a local directory holding its verified files."""
        step_uri = st.join(self.uri, step_dir_name(step))
        try:
            manifest = json.loads(self.store.read_bytes(st.join(step_uri, MANIFEST)))
        except st.StorageNotFound as exc:
            raise CheckpointInvalid("no manifest.json: the save was interrupted before it finished") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointInvalid(f"manifest.json is not valid JSON ({exc})") from exc
        if manifest.get("format") != FORMAT or manifest.get("step") != step:
            raise CheckpointInvalid(f"manifest.json is not a {FORMAT} manifest of step {step}")
        if st.is_s3(step_uri):
            local = self._cache / f"load-{step_dir_name(step)}"
            shutil.rmtree(local, ignore_errors=True)
            for rel in manifest["files"]:
                try:
                    self.store.download_file(st.join(step_uri, rel), local / rel)
                except st.StorageNotFound as exc:
                    raise CheckpointInvalid(f"{rel} is listed in the manifest but missing") from exc
        else:
            local = Path(step_uri)
        for rel, meta in manifest["files"].items():
            path = local / rel
            if not path.is_file():
                raise CheckpointInvalid(f"{rel} is listed in the manifest but missing")
            size = path.stat().st_size
            if size != meta["bytes"]:
                raise CheckpointInvalid(f"{rel} has {size} bytes, the manifest says {meta['bytes']}")
            if _sha256_file(path) != meta["sha256"]:
                raise CheckpointInvalid(f"{rel} does not match its sha256 in the manifest (corrupted)")
        return CheckpointRef(step, step_uri, manifest), local

    def latest_valid(self) -> tuple[CheckpointRef, Path] | None:
        for step in reversed(self.list_steps()):
            try:
                return self.verify(step)
            except CheckpointInvalid as exc:
                self.log(f"checkpoint {st.join(self.uri, step_dir_name(step))} skipped: {exc}")
        return None

    def load(self, ref: CheckpointRef, local: Path, strategy: Strategy, seed: int) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG; the trainer state (step, data position...)."""
        trainer_state = json.loads((local / TRAINER_STATE).read_text())
        saved_world = int(trainer_state["worldSize"])
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
        if trainer_state.get("strategy") not in (strategy.name, None) and (
            strategy.world_size_bound or trainer_state.get("strategy") == "deepspeed"
        ):
            raise CheckpointWorldSizeError(
                f"{ref.uri} was written with strategy {trainer_state.get('strategy')}, this run uses "
                f"{strategy.name}; ddp and fsdp checkpoints are interchangeable, deepspeed ones are not"
            )
        if strategy.world_size_bound:
            strategy.load_local(local)
        else:
            model_sd = torch.load(local / "model.pt", map_location="cpu", weights_only=True)
            optim_sd = torch.load(local / "optimizer.pt", map_location="cpu", weights_only=False)
            strategy.load_full_state(model_sd, optim_sd)
        rng_file = local / f"rng-rank-{self.env.rank:05d}.pt"
        if saved_world == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            reseed(seed, ref.step, self.env.rank)
        if trainer_state.get("configHash") != self.config_hash:
            self.log(
                f"note: {ref.uri} was written with a different model/training/optimizer config "
                "(config hash differs); continuing with the current spec"
            )
        return trainer_state

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
        shutil.rmtree(self._cache, ignore_errors=True)


class CheckpointWorldSizeError(RuntimeError):
    """The checkpoint cannot continue on this world size or strategy."""


def reseed(seed: int, step: int, rank: int) -> None:
    mixed = (seed * 1_000_003 + step * 9_973 + rank) % (2**31)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def young_daly_interval(save_seconds: float, failures_per_hour: float, step_seconds: float) -> int:
    """Steps between checkpoints that minimise expected lost work: √(2·C·MTBF) (Young 1974, Daly 2006)."""
    mtbf = 3600.0 / max(failures_per_hour, 1e-9)
    optimal_s = (2.0 * max(save_seconds, 1e-3) * mtbf) ** 0.5
    return max(1, round(optimal_s / max(step_seconds, 1e-6)))
