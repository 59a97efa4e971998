"""spec.revisions under the real operator (KMock's emulator, simulated kubelet and trainers): a
DataPipeline's schedule starts its next revision, the PretrainRun trains it from its previous model,
and status.revisions of both log each revision; a FinetuneRun follows its dataset (schedule) or its
base model's revisions."""

from __future__ import annotations

import json
from typing import Any

from opbuilders import data_spec, finetune_spec, manifest
from simcluster import SimCluster
from test_operator_emulated import FAST, pretrain, run

from crucible.operator import kube as k
from waits import scaled


def test_a_schedule_starts_data_revisions_and_the_model_follows_them() -> None:
    latest: dict[str, str] = {}

    def data_results(attempt: int) -> dict[str, Any]:
        latest["manifest"] = f"{attempt + 1:064x}"
        return {"manifestSha256": latest["manifest"], "tokensTrain": 1000,
                "dropped": {"dedup:seen_in_earlier_revision": 7 * attempt}}

    def model_results(attempt: int) -> dict[str, Any]:  # what the pretrain stage reports of its data
        return {"dataManifestSha256": latest["manifest"], "dataTokens": 1000, "perplexity": 9.0 - attempt,
                **({"perplexityBefore": 11.0 - attempt} if attempt else {})}

    async def scenario(c: SimCluster) -> None:
        c.trainer("news", total_steps=2, port=19450, steps_per_second=20, results=data_results)
        c.trainer("lm", total_steps=2, port=19451, steps_per_second=20, results=model_results)
        await c.apply(manifest("DataPipeline", "news", data_spec(revisions={"schedule": "*/3 * * * * *"}),
                               namespace=None))
        lm = pretrain("lm", 19451, nodes=1, data={"fromRun": {"kind": "DataPipeline", "name": "news"}},
                      revisions={"maxRevisions": 2})
        await c.apply(lm)

        async def revisions(kind: str, name: str, n: int) -> list[dict[str, Any]] | None:
            status = (await c.get(kind, name)).get("status") or {}
            return status["revisions"] if len(status.get("revisions") or []) >= n else None

        data = await c.wait_for(lambda: revisions("DataPipeline", "news", 2), timeout=scaled(45), what="two data revisions")
        assert [r["revision"] for r in data[:2]] == [1, 2]
        assert data[1]["outputURI"] == "s3://bucket/runs/ml/datapipeline/news/output-rev2"
        assert data[1]["documentsSeenEarlier"] == 7 and data[1]["dataManifestSha256"] != data[0]["dataManifestSha256"]
        model = await c.wait_for(lambda: revisions("PretrainRun", "lm", 2), timeout=scaled(45), what="two model revisions")
        assert model[1]["outputURI"] == "s3://bucket/runs/ml/pretrainrun/lm/output-rev2"
        assert (model[1]["evalBefore"], model[1]["evalAfter"]) == (10.0, 8.0)
        status = (await c.get("PretrainRun", "lm"))["status"]
        spec = json.loads((await c.kube.get(k.CONFIGMAPS, "ml", f"lm-{status['attempt']}-spec"))["data"]["spec.json"])
        assert spec["model"]["source"] == {"uri": model[0]["outputURI"]}  # continued from revision 1
        assert spec["data"]["uri"].startswith("s3://bucket/runs/ml/datapipeline/news/output-rev")
        assert spec["checkpoint"]["uri"].endswith("checkpoints-rev2")  # never resumes revision 1's state
        # maxRevisions: later data revisions are not trained on
        await c.wait_for(lambda: revisions("DataPipeline", "news", 4), timeout=scaled(45), what="more data revisions")
        status = (await c.get("PretrainRun", "lm"))["status"]
        assert len(status["revisions"]) == 2 and "maxRevisions (2) reached" in status["message"]
        data_cm = json.loads((await c.kube.get(k.CONFIGMAPS, "ml", "news-1-spec"))["data"]["spec.json"])
        assert data_cm["steps"]["dedup"]["earlierRevisions"] == ["s3://bucket/runs/ml/datapipeline/news/output"]
        assert data_cm["tokenizer"]["source"] == {"uri": "s3://bucket/runs/ml/datapipeline/news/output/tokenizer"}
    run(scenario, nodes=2)


def test_finetune_revisions_follow_their_dataset_and_their_base_model() -> None:
    """``tutor`` (follow dataset) runs a revision at each fire time, from its previous model on the new
    records; ``chat`` (follow model) fine-tunes each new output of ``tutor``."""
    tutor_out = "s3://bucket/runs/ml/finetunerun/tutor/output"
    tutor_outputs = [tutor_out, f"{tutor_out}-rev2"]

    def tutor_results(attempt: int) -> dict[str, Any]:  # what the finetune stage reports
        return {"modelURI": "s3://models/base" if attempt == 0 else tutor_out, "datasetSha256": f"{attempt + 1:064x}",
                "dataTrainedTokens": 100 - 40 * attempt, "dataSeenInEarlierRevision": 12 * attempt,
                "evalLossBefore": 3.0 - attempt, "evalLossAfter": 2.5 - attempt}

    def chat_results(attempt: int) -> dict[str, Any]:  # the base of each attempt (checked in its spec below)
        return {"modelURI": tutor_outputs[min(attempt, 1)], "datasetSha256": "c" * 64, "dataTrainedTokens": 50,
                "evalLossBefore": 4.0, "evalLossAfter": 3.0}

    async def scenario(c: SimCluster) -> None:
        # a tutor revision takes longer than a chat one: chat's revision 1 starts well before tutor's 2 ends
        c.trainer("tutor", total_steps=10, port=19452, steps_per_second=10, results=tutor_results)
        c.trainer("chat", total_steps=2, port=19453, steps_per_second=20, results=chat_results)
        common = {"failurePolicy": FAST, "method": "full"}
        await c.apply(manifest("FinetuneRun", "tutor", finetune_spec(
            **common, metrics={"port": 19452}, revisions={"schedule": "*/3 * * * * *", "maxRevisions": 2}),
            namespace=None))
        await c.apply(manifest("FinetuneRun", "chat", finetune_spec(
            model={"fromRun": {"kind": "FinetuneRun", "name": "tutor"}}, **common, metrics={"port": 19453},
            revisions={"follow": "model"}), namespace=None))

        async def revisions(name: str, n: int) -> list[dict[str, Any]] | None:
            status = (await c.get("FinetuneRun", name)).get("status") or {}
            done = status.get("phase") == "Succeeded" and len(status.get("revisions") or []) >= n
            return status["revisions"] if done else None

        t1, t2 = await c.wait_for(lambda: revisions("tutor", 2), timeout=scaled(45), what="two tutor revisions")
        assert t2["outputURI"] == f"{tutor_out}-rev2" and t2["modelURI"] == t1["outputURI"] == tutor_out
        assert (t2["documentsSeenEarlier"], t2["newTokens"], t2["evalMetric"]) == (12, 60, "loss")
        assert (t2["evalBefore"], t2["evalAfter"]) == (2.0, 1.5)
        spec = json.loads((await c.kube.get(k.CONFIGMAPS, "ml", "tutor-1-spec"))["data"]["spec.json"])
        assert spec["model"] == {"uri": tutor_out} and spec["dataset"]["earlierRevisions"] == [tutor_out]
        assert spec["checkpoint"]["uri"].endswith("tutor/checkpoints-rev2")
        c1, c2 = await c.wait_for(lambda: revisions("chat", 2), timeout=scaled(45), what="two chat revisions")
        assert (c1["modelURI"], c2["modelURI"]) == tuple(tutor_outputs)
        for attempt, base in enumerate(tutor_outputs):  # what each chat revision was given to fine-tune
            spec = json.loads((await c.kube.get(k.CONFIGMAPS, "ml", f"chat-{attempt}-spec"))["data"]["spec.json"])
            assert spec["model"] == {"uri": base} and not spec["dataset"].get("earlierRevisions")
        # tutor stops at maxRevisions; chat has fine-tuned every tutor revision and starts no third
        async def capped() -> dict[str, Any] | None:
            status = (await c.get("FinetuneRun", "tutor"))["status"]
            return status if "maxRevisions (2) reached" in (status.get("message") or "") else None

        tutor = await c.wait_for(capped, timeout=scaled(15), what="tutor's next fire time refused by maxRevisions")
        assert len(tutor["revisions"]) == 2
        assert len((await c.get("FinetuneRun", "chat"))["status"]["revisions"]) == 2
    run(scenario, nodes=2)
