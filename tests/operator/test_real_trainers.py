"""The real operator, KMock's emulated API server and the REAL trainer: every pod runs the command
the operator rendered (``torchrun ... -m crucible.trainer STAGE --spec /etc/crucible/spec.json``)
as local processes (tests/operator/simkubelet.py), gloo rendezvous on loopback.

Each scenario also runs an uninterrupted twin of the faulted run in the same cluster, so what
the restart produced is compared with what it should have produced.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opbuilders import manifest
from simcluster import NAMESPACE, SimCluster
from simkubelet import RealKubelet, free_port

from crucible.operator.render import LABEL_ATTEMPT
from waits import scaled

VOCAB = 128
POLICY = {"maxRestarts": 2, "backoffSeconds": 0, "maxBackoffSeconds": 1, "hangTimeout": "5m"}


def run(tmp_path: Path, scenario: Callable[[SimCluster, Path], Awaitable[None]], *, nodes: int, budget: float) -> None:
    storage = tmp_path / "storage"

    async def main() -> None:
        kubelet = RealKubelet(tmp_path, namespace=NAMESPACE)
        async with SimCluster(nodes=nodes, interval=0.5, real=kubelet, storage_root=str(storage)).running() as c:
            await scenario(c, storage)
    asyncio.run(asyncio.wait_for(main(), timeout=scaled(budget)))


def run_dir(storage: Path, kind: str, name: str) -> Path:
    return storage / NAMESPACE / kind.lower() / name


def step_losses(checkpoints: Path) -> dict[int, str]:
    """float.hex of the last loss written for each step (a resumed attempt rewrites replayed steps)."""
    out: dict[int, str] = {}
    path = checkpoints / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the SIGKILL
            continue
        if "event" not in rec and "step" in rec:
            out[int(rec["step"])] = float(rec["loss"]).hex()
    return out


def valid_checkpoints(checkpoints: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("step-*/manifest.json"))


async def pods_of(c: SimCluster, run_name: str, attempt: int) -> list[dict[str, Any]]:
    return [p for p in await c.pods(run_name) if p["metadata"]["labels"].get(LABEL_ATTEMPT) == str(attempt)]


async def until(c: SimCluster, check: Callable[[], Any], what: str, timeout: float = 120,
                runs: tuple[tuple[str, str], ...] = ()) -> Any:
    """Wait for ``check()``; fail at once, with its status, if one of ``runs`` (kind, name) failed."""
    async def probe() -> Any:
        for kind, name in runs:
            status = (await c.get(kind, name)).get("status") or {}
            assert status.get("phase") != "Failed", f"{kind} {name} failed: {json.dumps(status, indent=1)}"
        return check()
    return await c.wait_for(probe, timeout, what)


# -- a 2-node PretrainRun loses a node mid-run ---------------------------------------------------


def write_token_shards(root: Path, documents: int = 300, seed: int = 0) -> Path:
    from crucible.trainer.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    for split, n in (("train", documents), ("validation", 24)):
        writer = ShardWriter(root / split, vocab_size=VOCAB, eos_id=0, tokens_per_shard=4000)
        for _ in range(n):
            start, length = int(rng.integers(1, VOCAB)), int(rng.integers(20, 120))
            writer.add_document([(start + i) % (VOCAB - 1) + 1 for i in range(length)])
        writer.close()
    (root / "manifest.json").write_text(json.dumps({"stage": "data"}))
    return root


def pretrain_run(name: str, data: Path, steps: int) -> dict[str, Any]:
    return manifest("PretrainRun", name, {
        "data": {"uri": str(data)},
        "model": {"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "intermediateSize": 64, "vocabSize": VOCAB,
                  "maxPositionEmbeddings": 64},
        "training": {"seqLen": 32, "globalBatchTokens": 256, "microBatchSize": 4, "maxSteps": steps,
                     "evalEvery": 0, "evalBatches": 2, "seed": 7},
        "optimizer": {"lr": 3e-3, "warmupSteps": 2},
        "checkpoint": {"interval": 4, "keep": 3},
        "metrics": {"port": free_port(), "logEvery": 10},
        "resources": {"nodes": 2},
        "failurePolicy": POLICY,
    }, namespace=None)


@pytest.mark.slow
def test_two_node_pretrain_loses_a_node_and_resumes_bit_exact(tmp_path: Path) -> None:
    steps = 32
    data = write_token_shards(tmp_path / "shards")

    async def scenario(c: SimCluster, storage: Path) -> None:
        await c.apply(pretrain_run("ref", data, steps))  # the uninterrupted twin
        await c.apply(pretrain_run("pt", data, steps))
        ckpts = run_dir(storage, "PretrainRun", "pt") / "checkpoints"
        await until(c, lambda: max(step_losses(ckpts), default=0) >= 9, "step 9 of pt", timeout=180,
                    runs=(("PretrainRun", "pt"), ("PretrainRun", "ref")))
        (rank1,) = [p for p in await pods_of(c, "pt", 0)
                    if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"]
        lost = rank1["spec"]["nodeName"]
        await c.kill_node(lost)
        killed_at = max(step_losses(ckpts))
        assert killed_at < steps, "pt finished before its node could be killed"

        async def next_attempt() -> bool:
            return any(j["metadata"]["labels"][LABEL_ATTEMPT] == "1" for j in await c.jobs("pt"))
        await c.wait_for(next_attempt, 60, "attempt 1 of pt")
        resume_from = max(valid_checkpoints(ckpts))  # attempt 0 is dead: what attempt 1 must start from
        done = await c.wait_phase("PretrainRun", "pt", "Succeeded", timeout=240)
        ref = await c.wait_phase("PretrainRun", "ref", "Succeeded", timeout=120)

        s = done["status"]
        assert (s["attempt"], s["restarts"], s["failedNodes"]) == (1, 1, [lost])
        reasons = [e["reason"] for e in await c.events("pt")]
        assert reasons.count("NodeLost") == 1 and reasons.count("AttemptStarted") == 2, reasons
        (job,) = [j for j in await c.jobs("pt") if j["metadata"]["labels"][LABEL_ATTEMPT] == "1"]
        terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchFields"][0]["values"] == [lost]
        assert lost not in {p["spec"]["nodeName"] for p in await pods_of(c, "pt", 1)}
        # the trainer resumed from the latest valid checkpoint, and says so in its _SUCCESS
        assert 4 <= resume_from <= killed_at
        assert s["results"]["resumedFromStep"] == resume_from
        assert s["results"]["steps"] == steps and "resumedFromStep" not in ref["status"]["results"]
        rank0_logs = c.real.logs("pt-1-0-") if c.real else {}
        assert any(f"step-{resume_from:09d}" in log and "resumed from" in log for log in rank0_logs.values()), rank0_logs
        # the whole run, step by step, is the uninterrupted run's
        losses, expected = step_losses(ckpts), step_losses(run_dir(storage, "PretrainRun", "ref") / "checkpoints")
        assert sorted(losses) == list(range(1, steps + 1))
        assert losses == expected
        weights = (Path(s["outputURI"]) / "model.safetensors").read_bytes()
        assert weights == (Path(ref["status"]["outputURI"]) / "model.safetensors").read_bytes()

    run(tmp_path, scenario, nodes=5, budget=420)


# -- a DataPipeline worker dies mid-stage ----------------------------------------------------------

NOUNS = ["harbor", "library", "budget", "school", "ferry", "bridge", "market", "river", "museum", "garden",
         "council", "station", "village", "teacher", "doctor", "farmer", "engineer", "report", "festival", "road"]
VERBS = ["reviewed", "visited", "described", "repaired", "opened", "studied", "praised", "discussed", "closed", "built"]
ADJECTIVES = ["old", "new", "busy", "quiet", "small", "large", "northern", "local", "famous", "modern"]


def _sentence(rng: random.Random) -> str:
    n, v, a = (lambda: rng.choice(NOUNS)), (lambda: rng.choice(VERBS)), (lambda: rng.choice(ADJECTIVES))
    return (f"The {a()} {n()} of the {n()} {v()} the {a()} {n()} with the {n()} "
            f"and {v()} it {rng.randint(2, 99)} times.")


def write_corpus(folder: Path, files: int = 3, docs: int = 300, seed: int = 0) -> Path:
    """Random English-shaped prose the quality rules keep (seven sentences a document), and a
    few exact duplicates across files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    records = [{"id": f"doc-{i}", "text": " ".join(_sentence(rng) for _ in range(7))} for i in range(files * docs)]
    records += [dict(records[j], id=f"dup-{j}") for j in range(0, len(records), 25)]
    per = len(records) // files + 1
    for f in range(files):
        chunk = records[f * per:(f + 1) * per]
        (folder / f"part-{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return folder


def data_pipeline(name: str, corpus: Path) -> dict[str, Any]:
    return manifest("DataPipeline", name, {
        "sources": [{"name": "web", "uri": str(corpus), "idField": "id"}],
        "tokenizer": {"vocabSize": 400, "minFrequency": 2},
        "shards": {"tokensPerShard": 4096, "validationFraction": 0.1},
        "workers": 3,
    }, namespace=None)  # no failurePolicy on a DataPipeline: the default one (a first restart after 30 s)


def tree(root: Path) -> dict[str, str]:
    """sha256 of every output file (the work folder and the _SUCCESS timestamp aside)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] not in ("_work", "_SUCCESS")}


@pytest.mark.slow
def test_data_pipeline_worker_killed_mid_stage_rerun_is_byte_identical(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")

    async def scenario(c: SimCluster, storage: Path) -> None:
        await c.apply(data_pipeline("ref", corpus))
        await c.apply(data_pipeline("dp", corpus))
        out = run_dir(storage, "DataPipeline", "dp") / "output"

        def worker_1_filtering() -> bool:  # worker 1 has begun writing its part, not finished it
            part = out / "_work" / "filter" / "part-00001"
            return part.is_dir() and any(part.iterdir()) and not list(part.glob("_DONE*"))
        await until(c, worker_1_filtering, "worker 1 inside the filter stage", timeout=180,
                    runs=(("DataPipeline", "dp"), ("DataPipeline", "ref")))
        (pod,) = [p for p in await pods_of(c, "dp", 0) if p["metadata"]["labels"].get("crucible.dev/role") == "filter"
                  and p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"]
        lost = pod["spec"]["nodeName"]
        await c.kill_node(lost)
        done = await c.wait_phase("DataPipeline", "dp", "Succeeded", timeout=300)
        ref = await c.wait_phase("DataPipeline", "ref", "Succeeded", timeout=120)
        s = done["status"]
        assert (s["restarts"], s["failedNodes"]) == (1, [lost])
        assert sorted(j["metadata"]["name"] for j in await c.jobs("dp") if j["metadata"]["labels"][LABEL_ATTEMPT] == "1") \
            == ["dp-dedup-1", "dp-filter-1", "dp-tokenize-1"]
        assert tree(out) == tree(Path(ref["status"]["outputURI"]))
        assert s["results"] == ref["status"]["results"] and s["results"]["documentsOut"] > 0

    run(tmp_path, scenario, nodes=7, budget=480)


# -- FinetuneRun -> PreferenceRun through fromRun ------------------------------------------------


def write_base_model(folder: Path) -> Path:
    """A tiny Llama with a word-level tokenizer over the words of the records below."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<eos>", *WORDS, "yes", "no", "what", "comes", "after"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         eos_token_id=0, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def write_records(path: Path, preference: bool) -> Path:
    rng = random.Random(1)
    lines = []
    for _ in range(64):
        a = rng.randrange(len(WORDS) - 2)
        prompt = f"what comes after {WORDS[a]} {WORDS[a + 1]}"
        if preference:
            wrong = WORDS[(a + 5) % len(WORDS)]
            lines.append({"prompt": prompt, "chosen": f" {WORDS[a + 2]}", "rejected": f" {wrong}"})
        else:
            lines.append({"prompt": prompt, "response": f" {WORDS[a + 2]}"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.slow
def test_finetune_then_preference_through_from_run_with_results_from_success(tmp_path: Path) -> None:
    base = write_base_model(tmp_path / "base")
    sft_data = write_records(tmp_path / "sft.jsonl", preference=False)
    pairs = write_records(tmp_path / "pairs.jsonl", preference=True)
    training = {"seqLen": 32, "microBatchSize": 4, "globalBatchTokens": 128, "maxSteps": 6, "evalEvery": 0,
                "evalBatches": 2}

    async def scenario(c: SimCluster, storage: Path) -> None:
        await c.apply(manifest("PreferenceRun", "dpo", {
            "model": {"fromRun": {"kind": "FinetuneRun", "name": "sft"}},
            "dataset": {"uri": str(pairs)}, "training": training, "metrics": {"port": free_port()},
            "failurePolicy": POLICY}, namespace=None))
        await c.apply(manifest("FinetuneRun", "sft", {
            "model": {"uri": str(base)}, "dataset": {"uri": str(sft_data)}, "method": "full",
            "training": training, "metrics": {"port": free_port()}, "failurePolicy": POLICY}, namespace=None))
        waiting = await c.wait_phase("PreferenceRun", "dpo", "Waiting", timeout=60)
        assert "FinetuneRun sft" in json.dumps(waiting["status"])
        sft = await c.wait_phase("FinetuneRun", "sft", "Succeeded", timeout=240)
        dpo = await c.wait_phase("PreferenceRun", "dpo", "Succeeded", timeout=240)
        for status, output in ((sft["status"], run_dir(storage, "FinetuneRun", "sft") / "output"),
                               (dpo["status"], run_dir(storage, "PreferenceRun", "dpo") / "output")):
            assert status["outputURI"] == str(output)
            success = json.loads((output / "_SUCCESS").read_text())
            assert status["results"] == success["results"] and status["results"]["steps"] == 6
        spec = json.loads((await c.kube.get(k_configmaps(), NAMESPACE, "dpo-0-spec"))["data"]["spec.json"])
        assert spec["model"] == {"uri": sft["status"]["outputURI"]}
        recorded = json.loads((Path(dpo["status"]["outputURI"]) / "_SUCCESS").read_text())["inputs"]["model"]
        assert (recorded.get("uri") if isinstance(recorded, dict) else recorded) == sft["status"]["outputURI"]

    run(tmp_path, scenario, nodes=2, budget=480)


def k_configmaps() -> Any:
    from crucible.operator import kube as k

    return k.CONFIGMAPS
