"""Operator scale: N PretrainRuns created at once against KMock's KubernetesEmulator.

    .venv/bin/python bench/operator_scale.py [--runs 500] [--interval 5]

Measures, for the Crucible operator (``crucible operator`` in its own process) and for a peer
— a bare Kopf operator whose on.create handler only creates one Job per run through the same
client (the floor any Kopf-based operator pays) — on the same work in one run:

* time from a run's creation until the API server received its Job (p50, p99, max),
* operator CPU seconds per run (user+system of the operator process, /proc),
* peak RSS of the operator process (VmHWM).

The emulator records the arrival time of each Job server-side. Goals (issue 4): p99 < 2 s,
RSS < 300 MiB. Nothing runs pods: the Job controller is not simulated here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml
from kmock import ResourceInfo, Server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))
sys.path.insert(0, str(REPO / "tests"))  # simcluster imports tests/waits.py

from simcluster import RealisticEmulator  # noqa: E402

from crucible.api import GROUP, KIND_MODELS, VERSION  # noqa: E402
from crucible.operator import kube as k  # noqa: E402

NAMESPACE = "bench"
PEER = textwrap.dedent('''
    import asyncio, sys, kopf
    from crucible.operator.kube import Kube, load_connection
    from crucible.operator.render import render
    from crucible.core.plan import plan
    from crucible.api import KIND_MODELS

    registry = kopf.OperatorRegistry()
    server = sys.argv[1]

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=server)

    @kopf.on.startup(registry=registry)
    async def startup(memo, settings, **_):
        memo.kube = Kube(load_connection(server))

    @kopf.on.create("crucible.dev", "v1alpha1", "pretrainruns", registry=registry)
    async def create(body, memo, **_):
        res = KIND_MODELS["PretrainRun"].model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        job = render(res, plan(res, storage_root="s3://bench")).jobs[0]
        await memo.kube.create(job)

    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True))
''')


class BenchEmulator(RealisticEmulator):
    """Records when each Job arrives (tests/operator/simcluster.py has the rest)."""

    job_arrivals: dict[str, float]

    async def _handle(self, request: Any) -> Any:
        try:
            return await super()._handle(request)
        finally:
            if str(request.method).endswith("POST") and request.resource is not None \
                    and request.resource.plural == "jobs":
                name = (request.data or {}).get("metadata", {}).get("labels", {}).get("crucible.dev/run")
                if name and name not in self.job_arrivals:
                    self.job_arrivals[name] = time.monotonic()


def _run(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PretrainRun",
        "metadata": {"name": name, "namespace": NAMESPACE, "generation": 1},
        "spec": {"data": {"uri": "s3://corpus/shards"}, "resources": {"nodes": 2},
                 "training": {"seqLen": 64, "globalBatchTokens": 512, "microBatchSize": 2, "maxSteps": 20}},
    }


def _proc_stats(pid: int) -> tuple[float, float]:
    """(cpu seconds, peak RSS MiB) of a live process and its children (from /proc)."""
    cpu = 0.0
    hwm = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) / 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return cpu, hwm


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


async def measure(label: str, argv_of_url: Any, runs: int, timeout: float) -> dict[str, float]:
    emulator = BenchEmulator()
    emulator.job_arrivals = {}
    emulator.resources.load_bundled()
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
    for model in KIND_MODELS.values():
        emulator.resources[f"{GROUP}/{VERSION}/{model.PLURAL}"] = ResourceInfo(
            kind=model.KIND, namespaced=True, verbs=verbs, subresources={"status"}, singular=model.KIND.lower())
    async with emulator, Server(emulator) as server:
        url = str(server.url).rstrip("/")
        kube = k.Kube(k.load_connection(url))
        crds = k.Res("apiextensions.k8s.io", "v1", "customresourcedefinitions", namespaced=False)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            await kube.request("POST", crds.path(), body=yaml.safe_load(path.read_text()))
        emulator.objects["v1/namespaces", None, NAMESPACE] = {"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": NAMESPACE}}
        log_path = Path(tempfile.mkdtemp(prefix="crucible-bench-")) / f"operator-{label}.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(argv_of_url(url), stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            await asyncio.sleep(3.0)  # let the operator start and open its watches
            cpu0, _ = _proc_stats(proc.pid)
            names = [f"run-{i:04d}" for i in range(runs)]
            created: dict[str, float] = {}
            sem = asyncio.Semaphore(32)

            async def create(name: str) -> None:
                async with sem:
                    await kube.create(_run(name))
                    created[name] = time.monotonic()

            t0 = time.monotonic()
            await asyncio.gather(*(create(n) for n in names))
            t_created = time.monotonic() - t0
            deadline = time.monotonic() + timeout
            while len(emulator.job_arrivals) < runs and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            t_all = time.monotonic() - t0
            cpu1, hwm = _proc_stats(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            await kube.close()
    lat = sorted(emulator.job_arrivals[n] - created[n] for n in names if n in emulator.job_arrivals)
    missing = runs - len(lat)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"runs": runs, "missing": missing, "create_s": t_created, "all_jobs_s": t_all,
            "p50": q[49], "p99": q[98], "max": lat[-1] if lat else float("nan"),
            "cpu_per_run": (cpu1 - cpu0) / runs, "rss_mib": hwm, "log": str(log_path)}  # type: ignore[dict-item]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--interval", type=float, default=5.0, help="the operator's reconcile interval")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    python = sys.executable
    ours = asyncio.run(measure(
        "crucible",
        lambda url: [python, "-m", "crucible.cli", "operator", "--standalone", "--all-namespaces", "--server", url,
                     "--metrics-port", "0", "--interval", str(args.interval), "--storage-root", "s3://bench", *(["--debug"] if os.environ.get("BENCH_DEBUG") else [])],
        args.runs, args.timeout))
    peer_file = Path(tempfile.mkdtemp()) / "peer_operator.py"
    peer_file.write_text(PEER)
    peer = asyncio.run(measure("peer", lambda url: [python, str(peer_file), url], args.runs, args.timeout))

    def row(name: str, r: dict[str, float]) -> str:
        return (f"{name:<22} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['max']:>8.2f} {r['all_jobs_s']:>10.1f} "
                f"{r['cpu_per_run'] * 1000:>12.1f} {r['rss_mib']:>9.0f} {int(r['missing']):>8}")

    print(f"\n{args.runs} PretrainRuns created at once (in {ours['create_s']:.1f}s / {peer['create_s']:.1f}s), "
          f"emulated API server, {os.cpu_count()} CPUs")
    print(f"{'operator':<22} {'p50 s':>8} {'p99 s':>8} {'max s':>8} {'all jobs s':>10} {'CPU ms/run':>12} "
          f"{'RSS MiB':>9} {'missing':>8}")
    print(row("crucible (full)", ours))
    print(row("bare kopf (peer)", peer))
    ratio = {k_: ours[k_] / peer[k_] if peer[k_] else float("nan") for k_ in ("p50", "p99", "cpu_per_run", "rss_mib")}
    print(f"{'ratio crucible/peer':<22} {ratio['p50']:>8.2f} {ratio['p99']:>8.2f} {'':>8} {'':>10} "
          f"{ratio['cpu_per_run']:>12.2f} {ratio['rss_mib']:>9.2f}")
    print(f"goals: p99 < 2 s ({'met' if ours['p99'] < 2 else 'NOT met'}), RSS < 300 MiB "
          f"({'met' if ours['rss_mib'] < 300 else 'NOT met'}); operator logs: {ours['log']}, {peer['log']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
