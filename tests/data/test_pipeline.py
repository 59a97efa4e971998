"""The DataPipeline stage end to end: receipts, shards, tokenizer, reruns, workers, SIGKILL."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from crucible.trainer.config.common import EXIT_BAD_INPUT, EXIT_OK
from crucible.trainer.data.pipeline import DataPipeline, main, run_pipeline
from crucible.trainer.data.shards import ShardSet
from waits import scaled

from .conftest import make_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _write_corpus(root: Path, records: list[dict[str, Any]], files: int = 4) -> Path:
    per = (len(records) + files - 1) // files
    for i in range(files):
        chunk = [{"id": r["id"], "text": r["text"]} for r in records[i * per : (i + 1) * per]]
        write_jsonl(root / f"part-{i}.jsonl{'.zst' if i % 2 else ''}", chunk, "zstd" if i % 2 else None)
    return root


def _tree(root: Path, skip: tuple[str, ...] = ("_SUCCESS", "_work")) -> dict[str, str]:
    """sha256 of every file under root except the skipped top-level names."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/")[0] not in skip:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, corpus_records: list[dict[str, Any]]) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"), corpus_records)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("out")
    config = make_config([{"name": "web", "uri": str(corpus), "idField": "id"}], dropped={"keep": True, "sampleRate": 1.0})
    return out, run_pipeline(config, out)


def test_receipt_funnel_adds_up(finished: tuple[Path, Any], corpus_records: list[dict[str, Any]]) -> None:
    out, manifest = finished
    data = json.loads((out / "manifest.json").read_text())
    assert data == manifest.data
    assert data["documentsIn"] == len(corpus_records)
    funnel = data["funnel"]
    assert [row["step"] for row in funnel] == [
        "read", "normalize", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii", "toxicity",
        "dedup", "mixture",
    ]
    for prev, row in itertools.pairwise(funnel[:-1]):  # the mixture sees only the train split
        assert row["documentsIn"] == prev["documentsOut"], row["step"]
    for row in funnel[:-1]:
        assert row["documentsIn"] - row["documentsOut"] == sum(row["dropped"].values()), row["step"]
    assert data["documentsOut"] == funnel[-2]["documentsOut"]
    kinds = {r["id"]: r["kind"] for r in corpus_records}
    assert funnel[2]["dropped"] and all(k.startswith("language_") for k in funnel[2]["dropped"])
    assert funnel[-2]["dropped"]["exact_duplicate"] == sum(k == "exact_dup" for k in kinds.values())
    assert data["pii"]["email"] >= 1 and data["pii"]["credit_card"] >= 1
    web = data["sources"]["web"]
    assert web["documentsIn"] == data["documentsIn"] and web["documentsOut"] == data["documentsOut"]
    assert sum(web["dropped"].values()) == data["documentsIn"] - data["documentsOut"]
    assert data["domains"]["web"]["tokens"] == data["tokens"]
    assert data["config"]["sources"][0]["uri"].endswith("corpus0") or data["config"]["sources"][0]["uri"]


def test_shards_tokenizer_and_success(finished: tuple[Path, Any]) -> None:
    from transformers import AutoTokenizer

    out, manifest = finished
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["stage"] == "data"
    results = success["results"]
    assert results["manifestSha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert results["documentsOut"] == manifest.documents_out
    assert results["dropped"]["dedup:exact_duplicate"] > 0
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == manifest.data["tokenizer"]["eosId"]
    train, val = ShardSet(out / "train", verify=True), ShardSet(out / "validation", verify=True)
    assert train.num_tokens == results["tokensTrain"] == manifest.tokens["train"]
    assert val.num_tokens == results["tokensValidation"] > 0
    assert len(train.shards) > 1  # tokensPerShard 4096
    first = next(train.documents())
    assert first[-1] == train.eos_id
    assert str(tok.decode(first[:-1].tolist())).strip()
    shard_hashes = {s["name"]: s["sha256"] for s in manifest.data["splits"]["train"]["shards"]}
    assert shard_hashes == {s["name"]: s["sha256"] for s in train.index["shards"]}
    assert manifest.data["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    left = {p.name for p in (out / "_work").rglob("*") if p.is_file()}
    assert left == {"_DONE", "stats.json", "kept_ids.jsonl", "tokenizer.json"}  # the bulky intermediates are gone


def test_dropped_samples_carry_reason(finished: tuple[Path, Any]) -> None:
    import zstandard

    out, manifest = finished
    rows = []
    for rel in manifest.data["droppedSamples"]:
        raw = zstandard.ZstdDecompressor().decompressobj().decompress((out / rel).read_bytes())
        rows += [json.loads(line) for line in raw.decode().splitlines()]
    drops = sum(sum(r["dropped"].values()) for r in manifest.data["funnel"][1:10])  # filter steps + dedup
    assert len(rows) == drops
    assert Counter(r["reason"] for r in rows if r["step"] == "dedup") == Counter(manifest.data["funnel"][9]["dropped"])
    assert {"id", "source", "step", "reason", "text"} <= set(rows[0])


def test_rerun_returns_at_once(finished: tuple[Path, Any], corpus: Path) -> None:
    out, manifest = finished
    before = (out / "_SUCCESS").read_bytes()
    config = make_config([{"name": "web", "uri": str(corpus), "idField": "id"}], dropped={"keep": True, "sampleRate": 1.0})
    again = DataPipeline(config, str(out)).run_all()
    assert again.sha256 == manifest.sha256 and (out / "_SUCCESS").read_bytes() == before


def test_rerun_with_another_spec_does_not_borrow_the_result(finished: tuple[Path, Any]) -> None:
    from crucible.trainer.config.receipt import ForeignResultError

    out, _ = finished
    before = (out / "_SUCCESS").read_bytes()
    config = make_config([{"name": "web", "uri": "/nonexistent", "idField": "id"}])
    with pytest.raises(ForeignResultError, match="different spec"):
        DataPipeline(config, str(out)).run_all()
    assert (out / "_SUCCESS").read_bytes() == before


def _spec(path: Path, config: Any, out: Path, workers: int = 1) -> Path:
    spec = config.to_wire()
    spec["output"] = {"uri": str(out)}
    spec["workers"] = workers
    path.write_text(json.dumps(spec))
    return path


def test_workers_by_stage_match_single_process(tmp_path: Path, corpus: Path, finished: tuple[Path, Any]) -> None:
    _, single = finished
    config = make_config([{"name": "web", "uri": str(corpus), "idField": "id"}], dropped={"keep": True, "sampleRate": 1.0})
    out = tmp_path / "out"
    spec = _spec(tmp_path / "spec.json", config, out, workers=3)
    for stage in ("filter", "dedup", "tokenize"):
        for shard in (2, 0, 1):  # any order within a stage
            assert main(["--spec", str(spec), "--stage", stage, "--shard", str(shard)]) == EXIT_OK
    data = json.loads((out / "manifest.json").read_text())
    for key in ("documentsIn", "documentsOut", "documentsWritten", "tokens", "funnel", "sources", "pii",
                "keptDocumentIdsSha256", "tokenizer"):
        assert data[key] == single.data[key], key
    assert data["config"]["workers"] == 3
    assert len({s["name"].split("-")[1] for s in data["splits"]["train"]["shards"]}) == 3


def test_stage_before_its_input_fails_clearly(tmp_path: Path, corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config([{"name": "web", "uri": str(corpus)}])
    spec = _spec(tmp_path / "spec.json", config, tmp_path / "out", workers=2)
    assert main(["--spec", str(spec), "--stage", "dedup", "--shard", "0"]) == 1
    assert "stage 'filter' has not finished for parts 0, 1 of 2" in caplog.text


def test_mixture_weights_are_deterministic(tmp_path: Path, corpus_records: list[dict[str, Any]]) -> None:
    clean = [r for r in corpus_records if r["kind"] == "clean"][:120]
    write_jsonl(tmp_path / "docs" / "a.jsonl", [{"id": r["id"], "text": r["text"]} for r in clean[:60]])
    write_jsonl(tmp_path / "forum" / "a.jsonl", [{"id": r["id"], "text": r["text"]} for r in clean[60:]])
    config = make_config(
        [{"name": "docs", "uri": str(tmp_path / "docs"), "idField": "id", "domain": "docs", "weight": 2.0},
         {"name": "forum", "uri": str(tmp_path / "forum"), "idField": "id", "domain": "forum", "weight": 0.5}],
        shards={"validationFraction": 0.0},
        steps={"quality": {"enabled": False}, "dedup": {"exact": False, "minhash": {"enabled": False}}},
    )
    m = run_pipeline(config, tmp_path / "out")
    docs, forum = m.data["domains"]["docs"], m.data["domains"]["forum"]
    assert docs["documentsWritten"]["train"] == 2 * docs["documentsOut"]
    assert 0.25 * forum["documentsOut"] < forum["documentsWritten"]["train"] < 0.75 * forum["documentsOut"]
    assert m.data["funnel"][-1]["dropped"]["downweighted"] == forum["documentsOut"] - forum["documentsWritten"]["train"]
    run_pipeline(config, tmp_path / "out2")
    assert _tree(tmp_path / "out") == _tree(tmp_path / "out2")


def test_reuses_a_model_tokenizer(tmp_path: Path, finished: tuple[Path, Any], corpus: Path) -> None:
    out, first = finished
    config = make_config(
        [{"name": "web", "uri": str(corpus / "part-0.jsonl"), "idField": "id"}],
        tokenizer={"source": {"uri": str(out / "tokenizer")}},
    )
    m = run_pipeline(config, tmp_path / "out")
    assert m.data["tokenizer"]["sha256"] == first.data["tokenizer"]["sha256"]
    assert m.data["tokenizer"]["origin"] == str(out / "tokenizer")


def test_cli_reports_bad_specs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sources": [{"name": "web", "uri": "/x", "weight": -1}], "output": {"uri": "/tmp/x"}}))
    assert main(["--spec", str(bad)]) == EXIT_BAD_INPUT
    assert "spec.sources[0].weight" in caplog.text and str(bad) in caplog.text
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"sources": [{"name": "web", "uri": str(tmp_path / "nothing")}],
                                   "output": {"uri": str(tmp_path / "o")}}))
    assert main(["--spec", str(missing)]) == EXIT_BAD_INPUT
    assert "sources[0].uri" in caplog.text
    assert main(["--spec", str(tmp_path / "nope.json")]) == EXIT_BAD_INPUT


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_byte_identical(tmp_path: Path, corpus: Path, finished: tuple[Path, Any]) -> None:
    reference, _ = finished
    config = make_config([{"name": "web", "uri": str(corpus), "idField": "id"}], dropped={"keep": True, "sampleRate": 1.0})
    out = tmp_path / "out"
    spec = _spec(tmp_path / "spec.json", config, out, workers=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "crucible.trainer", "data", "--spec", str(spec)]
    # Kill once inside the filter stage (part of the docs written), once inside dedup (tokenizer training).
    for folder, pattern in ((out / "_work" / "filter" / "part-00000", ".docs.jsonl.zst.*.tmp"), (out / "_work", "dedup")):
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + scaled(120)
        while not list(folder.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "_SUCCESS").exists()
    assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True).returncode == 0
    assert _tree(out) == _tree(reference)


def test_one_indexed_job_runs_all_stages_with_barriers(
    tmp_path: Path, corpus_records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from crucible.trainer.data import pipeline

    monkeypatch.setattr(pipeline, "WAIT_POLL_SECONDS", 0.05)
    corpus = _write_corpus(tmp_path / "corpus", corpus_records[:120], files=3)
    config = make_config([{"name": "web", "uri": str(corpus), "idField": "id"}])
    out = tmp_path / "out"
    spec = _spec(tmp_path / "spec.json", config, out, workers=2)
    codes: dict[int, int] = {}

    def worker(index: int) -> None:
        codes[index] = main(["--spec", str(spec), "--shard", str(index)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=scaled(300))
    assert codes == {0: EXIT_OK, 1: EXIT_OK}
    assert (out / "_SUCCESS").exists()
    reference = run_pipeline(config, tmp_path / "single")
    assert json.loads((out / "manifest.json").read_text())["keptDocumentIdsSha256"] == reference.data["keptDocumentIdsSha256"]
    # JOB_COMPLETION_INDEX stands in for --shard; a finished output returns at once.
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert main(["--spec", str(spec)]) == EXIT_OK
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")
    assert main(["--spec", str(spec)]) == EXIT_BAD_INPUT


def test_special_token_text_is_not_a_document_end(tmp_path: Path, corpus_records: list[dict[str, Any]]) -> None:
    clean = [r for r in corpus_records if r["kind"] == "clean"][:40]
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": r["id"], "text": r["text"] + " <|endoftext|> tail."} for r in clean])
    config = make_config([{"name": "web", "uri": str(tmp_path / "in"), "idField": "id"}],
                         steps={"quality": {"enabled": False}, "dedup": {"minhash": {"enabled": False}}},
                         shards={"validationFraction": 0.0})
    m = run_pipeline(config, tmp_path / "out")
    shards = ShardSet(tmp_path / "out" / "train")
    docs = list(shards.documents())
    assert len(docs) == m.data["documentsWritten"]["train"] == 40
    assert all(int((d == shards.eos_id).sum()) == 1 and d[-1] == shards.eos_id for d in docs)
    assert shards.num_tokens == m.tokens["train"]


def test_everything_dropped_fails_with_the_funnel(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import random

    from crucible.trainer.data.synthetic import foreign_document

    rng = random.Random(0)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": foreign_document(rng, "fr")} for _ in range(20)])
    config = make_config([{"name": "web", "uri": str(tmp_path / "in")}])
    spec = _spec(tmp_path / "spec.json", config, tmp_path / "out")
    assert main(["--spec", str(spec)]) == EXIT_BAD_INPUT
    assert "no training tokens: all 20 input documents were dropped (most by language:language_fr (20))" in caplog.text
    assert (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "_SUCCESS").exists()
