"""Checkpoints: verified resume points only; torn/corrupt ones skipped with a reason; keep K; S3 manifest last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainlib import LOG, make_engine

from crucible.trainer import storage as st
from crucible.trainer.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointInvalid,
    CheckpointMismatch,
    step_dir_name,
    young_daly_interval,
)
from crucible.trainer.config.common import S3Config


def _train(engine, steps: int) -> None:
    for _ in range(steps):
        engine.tokens += engine.train_step()[2]
        engine.step += 1


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.strategy.module.state_dict().items()}


def test_save_resume_restores_model_optimizer_data_and_rng(shards: Path, tmp_path: Path) -> None:
    engine = make_engine(shards, tmp_path)
    _train(engine, 3)
    engine.save()
    engine.checkpointer.wait()
    saved = _params(engine)
    position = engine.train_iter.position
    torch_rng = torch.get_rng_state()
    _train(engine, 2)
    expected_next = engine.train_step()[0]  # step 6's loss after training 3..5

    fresh = make_engine(shards, tmp_path)
    assert fresh.resume() == 3
    assert fresh.train_iter.position == position
    assert torch.equal(torch.get_rng_state(), torch_rng)
    for key, value in _params(fresh).items():
        assert torch.equal(value, saved[key]), key
    _train(fresh, 2)
    assert fresh.train_step()[0] == expected_next  # bit for bit
    manifest = json.loads((tmp_path / "checkpoints" / step_dir_name(3) / MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["tokens"] == 3 * 256 and manifest["configHash"]
    assert set(manifest["files"]) >= {"state/.metadata", "state/__0_0.distcp", "trainer.json", "rng/rank-00000.json"}
    assert manifest["version"] == 2 and all(meta["rank"] == 0 for meta in manifest["files"].values())
    engine.close()
    fresh.close()


def test_corrupt_and_torn_checkpoints_are_skipped_with_a_reason(shards: Path, tmp_path: Path) -> None:
    engine = make_engine(shards, tmp_path, checkpoint={"keep": 10})
    for _ in range(4):
        _train(engine, 1)
        engine.save()
    engine.checkpointer.wait()
    root = tmp_path / "checkpoints"
    # step 4: a byte flipped in the shards; step 3: no manifest (torn); step 2: a file missing
    model = root / step_dir_name(4) / "state" / "__0_0.distcp"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    (root / step_dir_name(3) / MANIFEST).unlink()
    (root / step_dir_name(2) / "rng" / "rank-00000.json").unlink()
    LOG.clear()
    found = engine.checkpointer.latest_valid()
    assert found is not None and found[0].step == 1
    reasons = "\n".join(LOG)
    assert "step-000000004 skipped: state/__0_0.distcp does not match its sha256" in reasons
    assert "step-000000003 skipped: no manifest.json" in reasons
    assert "step-000000002 skipped: rng/rank-00000.json is listed in the manifest but missing" in reasons
    fresh = make_engine(shards, tmp_path)
    assert fresh.resume() == 1
    engine.close()
    fresh.close()


def test_interrupted_save_at_every_write_never_becomes_a_resume_point(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate the process dying after each write of a save (data files, .done, manifest)."""
    engine = make_engine(shards, tmp_path, checkpoint={"keep": 10})
    _train(engine, 1)
    engine.save()
    _train(engine, 1)
    writes: list[str] = []
    real_write = st.Storage.write_bytes
    monkeypatch.setattr(st.Storage, "write_bytes", lambda self, uri, data: (writes.append(uri), real_write(self, uri, data)))
    engine.save()  # step 2, counting its writes
    monkeypatch.undo()
    assert writes[-1].endswith(MANIFEST)
    for cut in range(len(writes)):
        step_dir = tmp_path / "checkpoints" / step_dir_name(2)
        count = {"n": 0}

        class Killed(BaseException):
            pass

        def dying_write(self, uri, data, cut=cut, count=count):
            if count["n"] == cut:
                raise Killed
            count["n"] += 1
            real_write(self, uri, data)

        monkeypatch.setattr(st.Storage, "write_bytes", dying_write)
        with pytest.raises(Killed):
            engine.save()
        monkeypatch.undo()
        assert not (step_dir / MANIFEST).exists()
        with pytest.raises(CheckpointInvalid, match="no manifest"):
            engine.checkpointer.verify(2)
        found = engine.checkpointer.latest_valid()
        assert found is not None and found[0].step == 1, f"cut after {cut} writes"
    engine.close()


def test_keep_last_k(shards: Path, tmp_path: Path) -> None:
    engine = make_engine(shards, tmp_path, checkpoint={"keep": 2, "asyncSave": True})
    for _ in range(5):
        _train(engine, 1)
        engine.save()
    engine.checkpointer.wait()
    assert engine.checkpointer.list_steps() == [4, 5]
    engine.close()


def test_s3_checkpoint_manifest_is_the_last_object(
    shards: Path, tmp_path: Path, s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/run/checkpoints"
    engine = make_engine(shards, tmp_path, checkpoint={"uri": uri, "asyncSave": True},
                         storage={"s3": {"endpointUrl": s3_server, "addressingStyle": "path"}})
    order: list[str] = []
    real_write = st.Storage.write_bytes
    monkeypatch.setattr(st.Storage, "write_bytes", lambda self, u, d: (real_write(self, u, d), order.append(u)))
    _train(engine, 2)
    engine.save()
    engine.checkpointer.wait()
    monkeypatch.undo()
    assert order[-1] == f"{uri}/{step_dir_name(2)}/{MANIFEST}"
    store = st.Storage(S3Config(endpoint_url=s3_server, addressing_style="path"))
    keys = store.list(f"{uri}/{step_dir_name(2)}")
    assert any(k.endswith("state/__0_0.distcp") for k in keys) and any(k.endswith("state/.metadata") for k in keys)
    saved = _params(engine)
    fresh = make_engine(shards, tmp_path, checkpoint={"uri": uri},
                        storage={"s3": {"endpointUrl": s3_server, "addressingStyle": "path"}})
    assert fresh.resume() == 2
    for key, value in _params(fresh).items():
        assert torch.equal(value, saved[key])
    # a corrupted object on S3 is caught by the checksum as well
    obj = store.read_bytes(f"{uri}/{step_dir_name(2)}/state/__0_0.distcp")
    store.write_bytes(f"{uri}/{step_dir_name(2)}/state/__0_0.distcp", obj[:-1] + bytes([obj[-1] ^ 0xFF]))
    checkpointer = Checkpointer(uri, store, fresh.env, 3, False, "x", LOG.append)
    assert checkpointer.latest_valid() is None
    engine.close()
    fresh.close()


def test_interval_auto_follows_young_daly(shards: Path, tmp_path: Path) -> None:
    engine = make_engine(shards, tmp_path, training={"maxSteps": 30},
                         checkpoint={"interval": "auto", "asyncSave": False},
                         failurePolicy={"failureRatePerHour": 3600.0})  # one fault a second: save often
    assert engine.interval == 1  # the first checkpoint follows step 1: the save cost is measured, not assumed
    LOG.clear()
    engine.fit()
    engine.close()
    assert any("checkpoint interval auto" in line and "Young/Daly" in line for line in LOG), LOG
    assert engine._save_cost() is not None and engine._save_cost() > 0
    assert engine.interval == young_daly_interval(engine._save_cost(), 3600.0, engine._median_step_s)
    # no failure seen yet and no rate given: Young/Daly with one a day, bounded by 1 % of the time on saves
    unseen = make_engine(shards, tmp_path / "unseen", training={"maxSteps": 30}, checkpoint={"interval": "auto"})
    unseen._save_costs, unseen._median_step_s = [0.1], 0.01
    unseen._retune_interval()
    assert unseen.interval == round(0.1 / 0.01 / 0.01) < young_daly_interval(0.1, 1 / 24, 0.01)
    unseen._save_costs, unseen._median_step_s = [100.0], 1.0  # a slow save: one a day checkpoints more often
    unseen._retune_interval()
    assert unseen.interval == young_daly_interval(100.0, 1 / 24, 1.0) < 100.0 / 0.01
    unseen.close()


class _RunsCode:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _rehash(step_dir: Path) -> None:
    """What an attacker with write access does after editing files: make the manifest agree again."""
    import hashlib

    manifest = json.loads((step_dir / MANIFEST).read_text())
    for rel, meta in manifest["files"].items():
        data = (step_dir / rel).read_bytes()
        meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["metadata", "bytes_item", "rng"])
def test_a_tampered_checkpoint_with_a_rehashed_manifest_cannot_run_code(
    shards: Path, tmp_path: Path, target: str
) -> None:
    import io
    import pickle

    engine = make_engine(shards, tmp_path)
    _train(engine, 1)
    engine.save()
    engine.checkpointer.wait()
    step_dir = tmp_path / "checkpoints" / step_dir_name(1)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker))
    if target == "metadata":  # DCP's .metadata is a pickle: swap it for one that runs a command
        (step_dir / "state" / ".metadata").write_bytes(payload)
    elif target == "bytes_item":  # a non-tensor item (optimizer hyper-parameters) inside the shard file
        from crucible.trainer.checkpoint import read_dcp_metadata

        metadata = read_dcp_metadata(step_dir / "state" / ".metadata")
        shard = bytearray((step_dir / "state" / "__0_0.distcp").read_bytes())
        buf = io.BytesIO()
        torch.save(_RunsCode(marker), buf)
        evil = buf.getvalue()
        for index, info in metadata.storage_data.items():
            if "param_groups" in index.fqn:  # append the evil item and point the metadata at it
                info.offset, info.length = len(shard), len(evil)
        shard += evil
        (step_dir / "state" / "__0_0.distcp").write_bytes(bytes(shard))
        (step_dir / "state" / ".metadata").write_bytes(pickle.dumps(metadata))
    else:
        (step_dir / "rng" / "rank-00000.json").write_bytes(payload)
    _rehash(step_dir)
    LOG.clear()
    fresh = make_engine(shards, tmp_path)
    if target == "bytes_item":  # found only while loading: a clear error, not a half-restored run
        with pytest.raises(CheckpointMismatch, match=r"is not plain data.*refusing to load it"):
            fresh.resume()
    else:  # found while verifying: skipped like a corrupt checkpoint, with the reason
        assert fresh.resume() is None
        reason = "references posix.system" if target == "metadata" else "rng/rank-00000.json is not valid JSON"
        assert any(reason in line for line in LOG), LOG
    assert not marker.exists(), "loading a checkpoint ran a command"
    engine.close()
    fresh.close()


def test_a_slow_checkpoint_restore_is_progress_not_a_hang(shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification and download beat the watchdog as they go: a restore longer than hangTimeout
    whose bytes keep arriving is not reported as a hang (it was timed as a step before)."""
    import time

    from crucible.trainer import checkpoint as ck
    from crucible.trainer.watchdog import Watchdog

    engine = make_engine(shards, tmp_path)
    _train(engine, 1)
    engine.save()
    engine.checkpointer.wait()
    hangs: list[str] = []
    monkeypatch.setattr(ck, "_HASH_BLOCK", 16 * 1024)  # many blocks, each a slow read
    real_hash = ck._sha256_file

    def slow_hash(path, progress=None):  # type: ignore[no-untyped-def]
        def slow(what: str) -> None:
            time.sleep(0.3)
            if progress is not None:
                progress(what)
        return real_hash(path, slow)

    monkeypatch.setattr(ck, "_sha256_file", slow_hash)
    fresh = make_engine(shards, tmp_path)
    watchdog = Watchdog(2.0, on_hang=hangs.append, poll_s=0.05).start()
    fresh.checkpointer.progress = watchdog.beat
    started = time.monotonic()
    assert fresh.resume() == 1
    watchdog.stop()
    assert time.monotonic() - started > 4.0, "the restore should outlast the hang timeout"
    assert hangs == []
    engine.close()
    fresh.close()
