"""spec.revisions under the real operator (KMock's emulator, simulated kubelet and trainers): a
DataPipeline's schedule starts its next revision, the PretrainRun trains it from its previous model,
and status.revisions of both log each revision."""

from __future__ import annotations

import json
from typing import Any

from opbuilders import data_spec, manifest
from simcluster import SimCluster
from test_operator_emulated import pretrain, run

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
