"""A kubelet that runs the real container command of each pod as local processes.

``SimCluster(real=RealKubelet(root))`` swaps the stand-in trainers of ``simcluster.py`` for
this: every pod the simulated scheduler placed on a Ready node runs exactly what the operator
rendered — ``torchrun ... -m crucible.trainer STAGE --spec /etc/crucible/spec.json`` or
``python -m crucible.trainer ...`` — with the rendered env, as one process group per pod:

* the env: the container's ``env`` (values, ``fieldRef`` and ``secretKeyRef``) over a clean base
  (PATH, PYTHONPATH, HOME, OMP_NUM_THREADS of the test), ``$(VAR)`` references in the command
  expanded as Kubernetes does;
* the volumes: every ConfigMap volume is written under the pod's folder and paths in the
  command below its mount point are pointed there (the container's own filesystem view);
* the network: each pod has its own IP in a cluster, here all share 127.0.0.1, so the
  rendezvous address ``<job>-0.<service>`` becomes 127.0.0.1 and each Service gets its own free
  port (two attempts never meet on one port);
* the termination message: ``$CRUCIBLE_TERMINATION_LOG`` is a file of the pod; when the process
  exits it becomes ``containerStatuses[].state.terminated.message`` (falling back to the log
  tail on error, as ``FallbackToLogsOnError`` does), the exit code 128+N for a signal;
* a deleted pod gets SIGTERM, then SIGKILL after its grace period (capped);
* ``kill_node``: every process of the node's pods is SIGKILLed at once (the pod's cgroup: its
  process tree, since torchrun puts each worker in a session of its own) and, like a dead
  kubelet, the node reports nothing any more (the pods keep their last status).

Each pod's folder is ``<root>/pods/<pod name>/`` with ``log.txt`` (stdout and stderr).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.operator import kube as k
from crucible.operator.render import CONTAINER, ENV_TERMINATION_LOG
from waits import scaled

MAX_GRACE_SECONDS = 10.0
MESSAGE_LIMIT = 4096  # what Kubernetes keeps of a termination message
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_CLEAN_ENV = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", "VIRTUAL_ENV",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "CRUCIBLE_TEST_TIME_FACTOR")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # between fork and exec: a killed test leaves no trainer behind
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class PodProcess:
    pod: str
    node: str
    folder: Path
    proc: subprocess.Popen[bytes]
    started: float
    reported: bool = False
    kill_at: float | None = None
    members: set[int] | None = None
    """Every pid seen in the pod's process tree: its "cgroup" (torchrun starts each worker in a
    session of its own, so a process group alone would miss them)."""

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"

    @property
    def termination_log(self) -> Path:
        return self.folder / "termination-log"

    def track(self) -> None:
        if self.proc.poll() is None:
            self.members = (self.members or set()) | {self.proc.pid, *_descendants(self.proc.pid)}

    def terminate(self) -> None:
        """What Kubernetes sends first: SIGTERM to the container's main process (torchrun
        forwards it to its workers)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to every process of the pod at once (the container's cgroup)."""
        self.track()
        for pid in sorted(self.members or {self.proc.pid}):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class RealKubelet:
    def __init__(self, root: Path, *, namespace: str) -> None:
        self.root = root
        self.namespace = namespace
        self.processes: dict[str, PodProcess] = {}
        self.service_ports: dict[str, int] = {}
        self.dead_nodes: set[str] = set()

    # -- the test's view ----------------------------------------------------------------------

    def pod_log(self, pod: str) -> str:
        proc = self.processes.get(pod)
        return proc.log.read_text(errors="replace") if proc and proc.log.exists() else ""

    def logs(self, prefix: str) -> dict[str, str]:
        """Logs of every pod whose name starts with ``prefix`` (e.g. a Job's name)."""
        return {name: self.pod_log(name) for name in sorted(self.processes) if name.startswith(prefix)}

    def kill_node(self, node: str) -> list[str]:
        """SIGKILL every process group on ``node``; its kubelet reports nothing from now on."""
        self.dead_nodes.add(node)
        killed = []
        for p in self.processes.values():
            if p.node == node and p.proc.poll() is None:
                p.kill()
                killed.append(p.pod)
        return killed

    def close(self) -> None:
        for p in self.processes.values():
            p.kill()
        for p in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=scaled(30))

    # -- one pass of the kubelets of every node ---------------------------------------------

    async def sync(self, kube: k.Kube, pods: list[dict[str, Any]], ready: set[str]) -> None:
        live = {p["metadata"]["name"]: p for p in pods}
        now = time.monotonic()
        for name, p in self.processes.items():
            p.track()
            if name not in live and p.proc.poll() is None and p.node not in self.dead_nodes:
                if p.kill_at is None:  # deleted: SIGTERM, SIGKILL after the grace period
                    p.terminate()
                    p.kill_at = now + MAX_GRACE_SECONDS
                elif now >= p.kill_at:
                    p.kill()
        for pod in pods:
            name = pod["metadata"]["name"]
            node = pod["spec"].get("nodeName")
            if not node or node not in ready or node in self.dead_nodes:
                continue
            phase = pod["status"].get("phase")
            if name not in self.processes and phase == "Pending":
                started = await self._start(kube, pod, node)
                if started is not None:
                    self.processes[name] = started
                    await self._patch(kube, name, {"status": {
                        "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                        "containerStatuses": [{"name": CONTAINER, "ready": True, "restartCount": 0,
                                               "state": {"running": {"startedAt": _now()}}}]}})
                continue
            proc = self.processes.get(name)
            if proc is not None and not proc.reported and proc.proc.poll() is not None:
                proc.reported = True
                await self._patch(kube, name, {"status": self._terminated(proc)})

    def _terminated(self, p: PodProcess) -> dict[str, Any]:
        rc = p.proc.returncode
        code = rc if rc >= 0 else 128 - rc
        message = p.termination_log.read_text(errors="replace") if p.termination_log.exists() else ""
        if not message.strip() and code != 0:  # terminationMessagePolicy: FallbackToLogsOnError
            message = "\n".join(p.log.read_text(errors="replace").splitlines()[-80:])[-2048:]
        state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                "message": message[-MESSAGE_LIMIT:], "startedAt": _now(), "finishedAt": _now()}}
        if rc < 0:
            state["terminated"]["signal"] = -rc
        return {"phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": CONTAINER, "ready": False, "restartCount": 0, "state": state}]}

    # -- starting a container ------------------------------------------------------------------

    async def _start(self, kube: k.Kube, pod: dict[str, Any], node: str) -> PodProcess | None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        container = next(c for c in spec["containers"] if c["name"] == CONTAINER)
        folder = self.root / "pods" / name
        mounts = await self._mount_volumes(kube, spec, container, folder)
        if mounts is None:
            return None  # a ConfigMap is not there yet: the kubelet retries (ContainerCreating)
        env = await self._env(kube, pod, container, node)
        if env is None:
            return None
        env[ENV_TERMINATION_LOG] = str(folder / "termination-log")
        argv = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in container["command"]]
        argv = self._local_argv(argv, mounts)
        log = open(folder / "log.txt", "wb")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(argv, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        (folder / "argv.txt").write_text(" ".join(argv) + "\n")
        return PodProcess(name, node, folder, proc, time.monotonic())

    async def _mount_volumes(self, kube: k.Kube, spec: dict[str, Any], container: dict[str, Any],
                             folder: Path) -> dict[str, Path] | None:
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            if "configMap" not in volume:
                continue  # emptyDir and friends: the process writes where it likes
            cm = await kube.get(k.CONFIGMAPS, self.namespace, volume["configMap"]["name"])
            if cm is None:
                return None
            local = folder / "mnt" / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            for key, text in (cm.get("data") or {}).items():
                (local / key).write_text(text)
            mounts[mount["mountPath"].rstrip("/")] = local
        folder.mkdir(parents=True, exist_ok=True)
        return mounts

    async def _env(self, kube: k.Kube, pod: dict[str, Any], container: dict[str, Any],
                   node: str) -> dict[str, str] | None:
        env = {key: os.environ[key] for key in _CLEAN_ENV if key in os.environ}
        env["PYTHONUNBUFFERED"] = "1"
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), str(var["value"]))
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"], node)
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = await kube.get(k.Res("", "v1", "secrets"), self.namespace, ref["name"])
                if secret is None:
                    return None  # CreateContainerConfigError until the Secret exists
                import base64

                env[var["name"]] = base64.b64decode((secret.get("data") or {}).get(ref["key"], "")).decode()
        return env

    def _local_argv(self, argv: list[str], mounts: dict[str, Path]) -> list[str]:
        out: list[str] = []
        if argv[:1] == ["torchrun"]:
            out = [sys.executable, "-m", "torch.distributed.run"]
            argv = argv[1:]
        elif argv[:1] in (["python"], ["python3"]):
            out = [sys.executable]
            argv = argv[1:]
        master_service = None
        for a in argv:
            if a.startswith("--master-addr="):
                master_service = a.split("=", 1)[1].split(".", 1)[-1]
        for a in argv:
            if a.startswith("--master-addr="):
                a = "--master-addr=127.0.0.1"  # cluster DNS: every pod is on loopback here
            elif a.startswith("--master-port=") and master_service is not None:
                if master_service not in self.service_ports:
                    self.service_ports[master_service] = free_port()
                a = f"--master-port={self.service_ports[master_service]}"
            for mount, local in mounts.items():
                if a == mount or a.startswith(mount + "/"):
                    a = str(local) + a[len(mount):]
            out.append(a)
        return out

    async def _patch(self, kube: k.Kube, name: str, body: dict[str, Any]) -> None:
        try:
            await kube.request("PATCH", k.PODS.path(self.namespace, name), body=body,
                               content_type="application/merge-patch+json")
        except k.ApiError as exc:
            if exc.status != 404:
                raise


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def _field(pod: dict[str, Any], path: str, node: str) -> str:
    meta = pod["metadata"]
    if path == "metadata.name":
        return str(meta["name"])
    if path == "metadata.namespace":
        return str(meta.get("namespace", ""))
    if path == "spec.nodeName":
        return node
    if path in ("status.podIP", "status.hostIP"):
        return "127.0.0.1"
    found = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
    if found:
        return str((meta.get(found.group(1)) or {}).get(found.group(2), ""))
    raise AssertionError(f"the simulated kubelet does not know fieldRef {path!r}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
