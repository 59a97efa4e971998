"""The real Kopf operator against KMock's KubernetesEmulator and a simulated Job controller,
scheduler, kubelet and trainers (tests/operator/simcluster.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from opbuilders import data_spec, finetune_spec, manifest, preference_spec, pretrain_spec, quantize_spec
from simcluster import SimCluster

from crucible.operator import kube as k
from crucible.operator.rbac import RULES, grants
from crucible.operator.reconcile import cr_res
from crucible.operator.render import LABEL_ATTEMPT, LABEL_RUN
from waits import scaled

FAST = {"maxRestarts": 2, "backoffSeconds": 0, "maxBackoffSeconds": 1, "hangTimeout": "10s"}


def run(scenario: Callable[[SimCluster], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with SimCluster(**kw).running() as cluster:
            await scenario(cluster)
    asyncio.run(asyncio.wait_for(main(), timeout=scaled(90)))


def pretrain(name: str, port: int, *, nodes: int = 2, steps: int = 20, **over: Any) -> dict[str, Any]:
    spec = pretrain_spec(nodes=nodes, metrics={"port": port}, failurePolicy=FAST, **over)
    spec["training"]["maxSteps"] = steps
    return manifest("PretrainRun", name, spec, namespace=None)


def test_two_node_pretrain_run_succeeds() -> None:
    async def scenario(c: SimCluster) -> None:
        t = c.trainer("pt", total_steps=20, port=19401)
        await c.apply(pretrain("pt", 19401))
        running = await c.wait_phase("PretrainRun", "pt", "Running")
        assert running["status"]["attempt"] == 0
        t.spikes = 1  # the trainer caught a loss spike and rolled back
        (job,) = await c.jobs("pt")
        assert job["spec"]["completions"] == 2
        done = await c.wait_phase("PretrainRun", "pt", "Succeeded")
        s = done["status"]
        assert s["restarts"] == 0
        assert s["outputURI"] == "s3://bucket/runs/ml/pretrainrun/pt/output"
        assert s["results"] == {"finalLoss": 2.5, "steps": 20}
        assert s["progress"]["totalSteps"] == 20
        assert s["completionTime"] and s["startTime"]
        reasons = [e["reason"] for e in await c.events("pt")]
        assert "AttemptStarted" in reasons and "Succeeded" in reasons and "LossSpike" in reasons
        assert s["lossSpikes"] == 1
        assert [c_["type"] for c_ in s["conditions"] if c_["status"] == "True"] == ["InputsReady", "Complete"]
        assert 0 < s["goodput"] <= 1
        samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
                   for m in c.operator_metrics.registry.collect() for x in m.samples}
        assert samples[("crucible_operator_time_to_running_seconds_count", (("kind", "PretrainRun"),))] == 1
        assert samples[("crucible_operator_goodput_ratio", (("kind", "PretrainRun"), ("name", "pt"),
                                                            ("namespace", "ml")))] == s["goodput"]
    run(scenario)


def assert_rbac_covers_the_operator(c: SimCluster) -> None:
    """Every request the operator (and its Kopf) made is granted by crucible.operator.rbac.RULES."""
    used = {(verb, group, res) for agent, verb, group, res in c.emulator.verbs_used
            if agent in ("crucible-operator", "kopf")}
    assert used, "no operator requests recorded"
    denied = sorted(t for t in used if not grants(RULES, t[1], t[2], t[0]))
    assert not denied, f"the ClusterRole lacks {denied}"


async def nodes_of(c: SimCluster, run_name: str, attempt: int) -> set[str]:
    """Nodes of one attempt's pods (an earlier attempt's pods linger until garbage collection)."""
    return {p["spec"].get("nodeName") for p in await c.pods(run_name)
            if p["metadata"]["labels"].get(LABEL_ATTEMPT) == str(attempt)} - {None}


def test_node_dies_mid_run_restarts_on_other_nodes_and_resumes() -> None:
    async def scenario(c: SimCluster) -> None:
        t = c.trainer("pt", total_steps=60, port=19402, steps_per_second=8)
        await c.apply(pretrain("pt", 19402, steps=60))
        await c.wait_phase("PretrainRun", "pt", "Running")
        await c.wait_for(lambda: _true(t.checkpoint >= 8), what="a checkpoint")
        used = sorted(await nodes_of(c, "pt", 0))
        await c.kill_node(used[1])
        restarting = await c.wait_phase("PretrainRun", "pt", "Restarting")
        assert restarting["status"]["failedNodes"] == [used[1]]
        assert restarting["status"]["restarts"] == 1
        cond = next(x for x in restarting["status"]["conditions"] if x["type"] == "Restarting")
        assert (cond["status"], cond["reason"]) == ("True", "NodeLost")
        assert used[1] in cond["message"]
        running = await c.wait_phase("PretrainRun", "pt", "Running")
        assert running["status"]["attempt"] == 1
        (job,) = [j for j in await c.jobs("pt") if j["metadata"]["labels"][LABEL_ATTEMPT] == "1"]
        terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchFields"][0]["values"] == [used[1]]
        assert used[1] not in await nodes_of(c, "pt", 1)
        done = await c.wait_phase("PretrainRun", "pt", "Succeeded", timeout=30)
        assert done["status"]["restarts"] == 1
        assert t.attempts_seen == [0, 1]
        assert t.resumed_from[1] >= 8  # attempt 1 resumed from a checkpoint, not from scratch
        reasons = [e["reason"] for e in await c.events("pt")]
        assert reasons.count("NodeLost") == 1 and "AttemptLost" not in reasons
        assert reasons.count("AttemptStarted") == 2  # attempt 0, then 1: no pass acted on a stale status
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for m in c.operator_metrics.registry.collect() for s in m.samples}
        assert samples[("crucible_operator_restarts_total", (("kind", "PretrainRun"), ("reason", "NodeLost")))] == 1
        assert samples[("crucible_operator_runs", (("kind", "PretrainRun"), ("phase", "Succeeded")))] == 1
        assert samples[("crucible_operator_runs", (("kind", "PretrainRun"), ("phase", "Running")))] == 0
        assert_rbac_covers_the_operator(c)
    run(scenario)


def _true(value: bool) -> Awaitable[bool]:
    async def f() -> bool:
        return value
    return f()


def test_application_error_fails_with_log_lines_and_dependents_fail() -> None:
    async def scenario(c: SimCluster) -> None:
        c.trainer("bad", total_steps=40, port=19403,
                  exit_at=(4, 1, "Traceback (most recent call last):\nValueError: vocab size mismatch"))
        await c.apply(pretrain("bad", 19403))
        after = pretrain("after", 19404, nodes=1)
        after["spec"]["model"] = {"source": {"fromRun": {"kind": "PretrainRun", "name": "bad"}}}
        await c.apply(after)
        waiting = await c.wait_phase("PretrainRun", "after", "Waiting")
        cond = next(x for x in waiting["status"]["conditions"] if x["type"] == "InputsReady")
        assert cond["status"] == "False" and "PretrainRun bad" in cond["message"]
        failed = await c.wait_phase("PretrainRun", "bad", "Failed")
        s = failed["status"]
        assert s["restarts"] == 0
        assert s["message"].startswith("ApplicationError: ")
        cond = next(x for x in s["conditions"] if x["type"] == "Failed")
        assert cond["reason"] == "ApplicationError"
        assert "ValueError: vocab size mismatch" in cond["message"]
        dep = await c.wait_phase("PretrainRun", "after", "Failed")
        assert dep["status"]["message"].startswith("DependencyFailed: spec.model.source.fromRun: PretrainRun bad failed")
        # a spec only the models reject (the emulator enforces no CRD schema) fails at once, naming the field
        invalid = pretrain("invalid", 19415, nodes=1)
        invalid["spec"]["failurePolicy"].update(backoffSeconds=60, maxBackoffSeconds=10)
        await c.apply(invalid)
        inv = await c.wait_phase("PretrainRun", "invalid", "Failed")
        assert inv["status"]["message"].startswith("InvalidSpec: spec.failurePolicy")
        assert inv["status"]["message"] == ("InvalidSpec: spec.failurePolicy.maxBackoffSeconds: "
                                            "must be at least backoffSeconds (10 < 60)")
        assert not await c.jobs("invalid")
    run(scenario)


def test_restart_budget_runs_out() -> None:
    async def scenario(c: SimCluster) -> None:
        c.trainer("flaky", total_steps=40, port=19405, exit_at=(2, 75, "NCCL timeout"), exits_left=10)
        spec = pretrain("flaky", 19405, nodes=1)
        spec["spec"]["failurePolicy"]["maxRestarts"] = 2
        await c.apply(spec)
        failed = await c.wait_phase("PretrainRun", "flaky", "Failed", timeout=40)
        s = failed["status"]
        assert s["restarts"] == 2 and s["attempt"] == 2
        assert s["message"].startswith("RestartBudgetExhausted: ")
        assert "failurePolicy.maxRestarts = 2" in next(x for x in s["conditions"] if x["type"] == "Failed")["message"]
    run(scenario)


def test_hang_is_detected_and_restarted() -> None:
    async def scenario(c: SimCluster) -> None:
        t = c.trainer("stuck", total_steps=30, port=19406, steps_per_second=4)
        await c.apply(pretrain("stuck", 19406, nodes=1, steps=30))
        await c.wait_phase("PretrainRun", "stuck", "Running")
        await c.wait_for(lambda: _true(t.step >= 4), what="some steps")
        t.hung = True
        restarting = await c.wait_phase("PretrainRun", "stuck", "Restarting", timeout=25)
        cond = next(x for x in restarting["status"]["conditions"] if x["type"] == "Restarting")
        assert (cond["reason"], cond["message"]) == ("Hang", "no step progress for 10s (failurePolicy.hangTimeout)")
        assert restarting["status"]["failedNodes"] == []  # a hang blames no node
        t.hung = False
        done = await c.wait_phase("PretrainRun", "stuck", "Succeeded", timeout=30)
        assert done["status"]["restarts"] == 1
    run(scenario)


def test_operator_restart_mid_run_neither_duplicates_nor_loses_the_attempt() -> None:
    async def scenario(c: SimCluster) -> None:
        t = c.trainer("pt", total_steps=50, port=19407, steps_per_second=5)
        await c.apply(pretrain("pt", 19407, steps=50))
        await c.wait_phase("PretrainRun", "pt", "Running")
        before = await c.get("PretrainRun", "pt")
        await c.stop_operator()
        # as if the previous operator had died between the creates of the attempt
        await c.kube.delete(k.CONFIGMAPS, "ml", "pt-0-spec")
        await asyncio.sleep(1.0)
        await c.start_operator()
        await c.wait_for(lambda: c.kube.get(k.CONFIGMAPS, "ml", "pt-0-spec"), what="the spec ConfigMap back")
        await c.wait_for(lambda: _progress_beyond(c, before["status"]["progress"].get("step") or 0), what="progress")
        jobs = await c.jobs("pt")
        assert [j["metadata"]["name"] for j in jobs] == ["pt-0"]
        done = await c.wait_phase("PretrainRun", "pt", "Succeeded", timeout=30)
        assert (done["status"]["attempt"], done["status"]["restarts"]) == (0, 0)
        assert done["status"]["startTime"] == before["status"]["startTime"]
        assert t.attempts_seen == [0]
    run(scenario)


async def _progress_beyond(c: SimCluster, step: int) -> bool:
    obj = await c.get("PretrainRun", "pt")
    return (obj["status"]["progress"].get("step") or 0) > step


def test_suspend_and_resume_from_checkpoint() -> None:
    async def scenario(c: SimCluster) -> None:
        t = c.trainer("pt", total_steps=40, port=19408, steps_per_second=5)
        await c.apply(pretrain("pt", 19408, steps=40))
        await c.wait_phase("PretrainRun", "pt", "Running")
        await c.wait_for(lambda: _true(t.checkpoint >= 4), what="a checkpoint")
        await c.patch_spec("PretrainRun", "pt", {"suspend": True})
        suspended = await c.wait_phase("PretrainRun", "pt", "Suspended")
        assert suspended["status"]["observedGeneration"] == 2
        await c.wait_for(lambda: _no_jobs(c, "pt"), what="the attempt to be deleted")
        await c.patch_spec("PretrainRun", "pt", {"suspend": False})
        resumed = await c.wait_phase("PretrainRun", "pt", "Running")
        assert resumed["status"]["attempt"] == 1 and resumed["status"]["restarts"] == 0
        await c.wait_phase("PretrainRun", "pt", "Succeeded", timeout=30)
        assert t.resumed_from[1] >= 4
    run(scenario)


async def _no_jobs(c: SimCluster, run_name: str) -> bool:
    return not await c.jobs(run_name)


def test_deleting_a_run_removes_what_it_created() -> None:
    async def scenario(c: SimCluster) -> None:
        c.trainer("pt", total_steps=500, port=19409)
        await c.apply(pretrain("pt", 19409))
        await c.wait_phase("PretrainRun", "pt", "Running")
        cms = [m for m in await c.kube.list(k.CONFIGMAPS, "ml") if m["metadata"]["labels"].get(LABEL_RUN) == "pt"]
        assert cms and cms[0]["metadata"]["ownerReferences"][0]["kind"] == "PretrainRun"
        await c.delete("PretrainRun", "pt")

        async def gone() -> bool:
            left = [o for res in (k.JOBS, k.SERVICES, k.CONFIGMAPS, k.PODS) for o in await c.kube.list(res, "ml")
                    if o["metadata"].get("labels", {}).get(LABEL_RUN) == "pt"]
            crs = await c.kube.list(cr_res("PretrainRun"), "ml")
            return not left and not crs
        await c.wait_for(gone, what="the run and its objects to be deleted")
        assert_rbac_covers_the_operator(c)
    run(scenario)


def test_from_run_chain_of_all_five_kinds() -> None:
    async def scenario(c: SimCluster) -> None:
        for i, name in enumerate(["dp", "pt", "ft", "pr", "q"]):
            c.trainer(name, total_steps=6, port=19410 + i, steps_per_second=12)
        ref = lambda kind, name: {"fromRun": {"kind": kind, "name": name}}  # noqa: E731
        objs = [
            manifest("QuantizeJob", "q", quantize_spec(ref("PreferenceRun", "pr"),
                                                       evaluation={"data": ref("DataPipeline", "dp")}), namespace=None),
            manifest("PreferenceRun", "pr", preference_spec(ref("FinetuneRun", "ft"), metrics={"port": 19413},
                                                            failurePolicy=FAST), namespace=None),
            manifest("FinetuneRun", "ft", finetune_spec(ref("PretrainRun", "pt"), metrics={"port": 19412},
                                                        failurePolicy=FAST), namespace=None),
            pretrain("pt", 19411, nodes=2, data=ref("DataPipeline", "dp")),
            manifest("DataPipeline", "dp", data_spec(workers=2), namespace=None),
        ]
        for obj in objs:
            await c.apply(obj)
        waiting = await c.wait_phase("QuantizeJob", "q", "Waiting")
        assert "PreferenceRun pr" in waiting["status"]["message"] or "PreferenceRun pr" in str(waiting["status"]["conditions"])
        dp = await c.wait_phase("DataPipeline", "dp", "Succeeded", timeout=40)
        dp_jobs = sorted(j["metadata"]["name"] for j in await c.jobs("dp"))
        assert dp_jobs == ["dp-dedup-0", "dp-filter-0", "dp-tokenize-0"]
        q = await c.wait_phase("QuantizeJob", "q", "Succeeded", timeout=60)
        pr = await c.get("PreferenceRun", "pr")
        spec_cm = await c.kube.get(k.CONFIGMAPS, "ml", "q-0-spec")
        assert spec_cm is not None
        spec = json.loads(spec_cm["data"]["spec.json"])
        assert spec["model"] == {"uri": pr["status"]["outputURI"]}
        assert spec["evaluation"]["data"] == {"uri": dp["status"]["outputURI"]}
        assert q["status"]["outputURI"] == "s3://bucket/runs/ml/quantizejob/q/output"
        assert_rbac_covers_the_operator(c)
    run(scenario, nodes=4)


def test_gang_scheduling_kueue_admission_and_volcano_pod_group() -> None:
    async def scenario(c: SimCluster) -> None:
        c.trainer("queued", total_steps=10, port=19420)
        c.trainer("gang", total_steps=10, port=19421)
        await c.apply(pretrain("queued", 19420, steps=10, scheduling={"gang": "kueue", "queue": "team-a"}))
        await c.apply(pretrain("gang", 19421, steps=10, scheduling={"gang": "volcano", "queue": "q1"}))
        await c.wait_for(lambda: c.jobs("queued"), what="the Kueue job")
        await asyncio.sleep(1.0)
        queued = await c.get("PretrainRun", "queued")
        (job,) = await c.jobs("queued")
        assert job["spec"]["suspend"] is True and queued["status"]["phase"] == "Pending"  # waits for Kueue
        groups = await c.kube.list(k.VOLCANO_PODGROUPS, "ml")
        assert [g["metadata"]["name"] for g in groups] == ["gang-0"]
        assert groups[0]["spec"] == {"minMember": 2, "queue": "q1"}
        c.kueue_admits.add("team-a")
        await c.wait_phase("PretrainRun", "queued", "Succeeded", timeout=30)
        await c.wait_phase("PretrainRun", "gang", "Succeeded", timeout=30)
    run(scenario)


def test_peering_keeps_one_replica_active_and_the_other_takes_over() -> None:
    async def scenario(c: SimCluster) -> None:
        await c.stop_operator()  # the default standalone one
        active, stop_active = await c.start_operator(replica="a", peering="crucible", priority=100)
        standby, stop_standby = await c.start_operator(replica="b", peering="crucible", priority=10)
        try:
            await c.wait_for(lambda: _peers(c, 2), what="both replicas in the peering")
            await asyncio.sleep(1.0)  # b reads a's entry from its peering watch and pauses
            c.trainer("first", total_steps=6, port=19430)
            await c.apply(pretrain("first", 19430, steps=6, nodes=1))
            await c.wait_phase("PretrainRun", "first", "Succeeded")
            jobs_by = {agent for agent, verb, res in c.emulator.writers if (verb, res) == ("create", "jobs")}
            assert jobs_by == {"crucible-operator/a"}
            stop_active.set()
            await asyncio.to_thread(active.join, scaled(15))
            await c.wait_for(lambda: _peers(c, 1), what="a to leave the peering")  # b resumes
            c.trainer("second", total_steps=6, port=19431)
            await c.apply(pretrain("second", 19431, steps=6, nodes=1))
            await c.wait_phase("PretrainRun", "second", "Succeeded", timeout=30)
            jobs_by = {agent for agent, verb, res in c.emulator.writers if (verb, res) == ("create", "jobs")}
            assert jobs_by == {"crucible-operator/a", "crucible-operator/b"}
            assert_rbac_covers_the_operator(c)  # peering included
        finally:
            stop_active.set()
            stop_standby.set()
            await asyncio.to_thread(standby.join, scaled(15))
    run(scenario)


async def _peers(c: SimCluster, count: int) -> bool:
    """The ClusterKopfPeering lists ``count`` live replicas (Kopf keeps one status entry per peer)."""
    peering = await c.kube.get(k.Res("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False), None, "crucible")
    return len((peering or {}).get("status") or {}) == count
