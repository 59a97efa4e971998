"""The container images, checked without a Docker engine.

The Dockerfiles are parsed by BuildKit's own parser (PyPI `dockerfile`); what they install is
checked against pyproject's extras (and, for the operator, against what pip really resolves);
what they run is checked against the code (the `crucible` script, `crucible operator`'s flags,
`python -m crucible.trainer`); the build context is checked against .dockerignore.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from deploylib import CHART, REPO, one, render_objects

from waits import scaled

IMAGES = REPO / "images"
OPERATOR = IMAGES / "operator.Dockerfile"
TRAINER = IMAGES / "trainer.Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HEAVY = {"torch", "transformers", "deepspeed", "peft", "accelerate", "torchao", "nvidia-nccl-cu12", "triton"}


def _commands(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def _final_stage(path: Path) -> list[dockerfile.Command]:
    commands = _commands(path)
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def _args(path: Path) -> dict[str, str]:
    """Default values of ARGs."""
    out = {}
    for c in _commands(path):
        if c.cmd == "ARG":
            for item in c.value:
                name, _, default = item.partition("=")
                out[name] = default
    return out


def _pip_extras(path: Path) -> list[set[str]]:
    """Extras of every `pip install ".[a,b]"` of the project in RUN lines."""
    runs = " ".join(" ".join(c.value) for c in _commands(path) if c.cmd == "RUN")
    return [set(m.split(",")) for m in re.findall(r'pip install [^"]*"\.\[([a-z,]+)\]"', runs)]


# --- parse and user -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_dockerfile_parses_with_buildkits_parser(path: Path) -> None:
    commands = _commands(path)
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    assert {c.cmd for c in commands} <= known
    first = next(c for c in commands if c.cmd != "ARG")
    assert first.cmd == "FROM"
    assert any(c.cmd == "COPY" for c in commands)


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_final_stage_runs_as_a_numeric_non_root_user(path: Path) -> None:
    users = [c for c in _final_stage(path) if c.cmd == "USER"]
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    user = users[-1].value[0]
    uid, _, gid = user.partition(":")
    # Kubernetes' runAsNonRoot can only verify a numeric uid.
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {user} must be a numeric non-zero uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    after_user = _final_stage(path)[_final_stage(path).index(users[-1]):]
    assert not [c for c in after_user if c.cmd == "RUN"], "nothing may run as root after USER"


def test_operator_runs_trainer_pods_as_the_trainer_images_user() -> None:
    """The trainer image's home (caches for DeepSpeed, Triton, Hugging Face) belongs to the pods' uid."""
    from crucible.operator.render import RenderSettings

    user = [c for c in _final_stage(TRAINER) if c.cmd == "USER"][-1].value[0]
    uid = RenderSettings().run_as_user
    assert user == f"{uid}:{uid}"
    run = " ".join(" ".join(c.value) for c in _commands(TRAINER) if c.cmd == "RUN")
    assert f"--uid {uid}" in run and f"--gid {uid}" in run


def test_chart_runs_the_operator_as_the_images_user() -> None:
    user = [c for c in _final_stage(OPERATOR) if c.cmd == "USER"][-1].value[0]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}" == user


# --- what they install ----------------------------------------------------------------------------


def test_installed_extras_exist_in_pyproject() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for path in (OPERATOR, TRAINER):
        installs = _pip_extras(path)
        assert installs, f"{path.name} installs no extra of the project"
        for wanted in installs:
            assert wanted <= extras, f"{path.name} installs unknown extras {sorted(wanted - extras)}"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_operator_image_installs_the_operator_extra_only_and_no_torch() -> None:
    assert _pip_extras(OPERATOR) == [{"operator"}]
    base = _requirement_names(PYPROJECT["project"]["dependencies"])
    operator = _requirement_names(PYPROJECT["project"]["optional-dependencies"]["operator"])
    assert not (base | operator) & HEAVY
    froms = [c.value[0] for c in _commands(OPERATOR) if c.cmd == "FROM"]
    version = _args(OPERATOR)["PYTHON_VERSION"]
    assert all(f.replace("${PYTHON_VERSION}", version).startswith(f"python:{version}-slim") for f in froms if ":" in f)
    required = tuple(int(x) for x in re.findall(r"\d+", PYPROJECT["project"]["requires-python"]))
    assert tuple(int(x) for x in version.split(".")) >= required


def test_trainer_image_is_cuda_pytorch_with_trainer_and_deepspeed_keeping_the_base_torch() -> None:
    # eval: lm-evaluation-harness for spec.eval.harnessTasks (docs/posttrain.md)
    assert _pip_extras(TRAINER) == [{"trainer", "deepspeed", "eval"}]
    base = _args(TRAINER)["BASE_IMAGE"]
    assert re.match(r"^pytorch/pytorch:[0-9.]+-cuda[0-9.]+-cudnn[0-9]+-devel$", base), base
    run = " ".join(" ".join(c.value) for c in _commands(TRAINER) if c.cmd == "RUN")
    assert "--constraint /tmp/torch-constraint.txt" in run, "pip must not replace the base image's CUDA torch"


# --- what they run --------------------------------------------------------------------------------


def _exec_form(path: Path, instruction: str) -> list[str]:
    (command,) = [c for c in _final_stage(path) if c.cmd == instruction][-1:]
    assert command.json, f"{path.name}: {instruction} must be in exec form (signals reach the process)"
    return list(command.value)


def test_operator_image_runs_crucible_operator() -> None:
    assert _exec_form(OPERATOR, "ENTRYPOINT") + _exec_form(OPERATOR, "CMD") == ["crucible", "operator"]
    assert PYPROJECT["project"]["scripts"]["crucible"] == "crucible.cli:main"
    from crucible.cli import COMMANDS

    module_name, _ = COMMANDS["operator"]
    assert importlib.util.find_spec(module_name) is not None, f"{module_name} (crucible operator) is missing"


def test_chart_arguments_are_flags_crucible_operator_accepts() -> None:
    """The Deployment's command line, parsed by the operator's own argparse, for every values case."""
    from deploylib import VALUE_CASES

    from crucible.cli import COMMANDS

    module = importlib.import_module(COMMANDS["operator"][0])
    for case, values in VALUE_CASES.items():
        deploy = one(render_objects(values), "Deployment")
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["crucible", "operator"]
        parser = argparse.ArgumentParser(prog="crucible operator", exit_on_error=False)
        module.add_arguments(parser)
        try:
            args = parser.parse_args(container["args"])
        except (argparse.ArgumentError, SystemExit) as exc:
            pytest.fail(f"{case}: crucible operator rejects {container['args']}: {exc}")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert args.metrics_port == ports["metrics"], case
        assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz", case
        # Every CRUCIBLE_* variable the chart sets is one the operator reads.
        source = "".join(p.read_text() for p in (REPO / "operator" / "crucible").rglob("*.py"))
        for env in container["env"]:
            if env["name"].startswith("CRUCIBLE_"):
                assert f'"{env["name"]}"' in source, f"{case}: the operator never reads {env['name']}"


def test_trainer_image_command_is_the_trainer_entry_point() -> None:
    cmd = _exec_form(TRAINER, "CMD")
    assert cmd[:3] == ["python", "-m", "crucible.trainer"]
    assert not [c for c in _commands(TRAINER) if c.cmd == "ENTRYPOINT"], "the operator sets the full command"
    result = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=scaled(60), check=False)
    assert result.returncode == 0, result.stderr
    assert "STAGE" in result.stdout
    from crucible.trainer.__main__ import STAGES

    assert set(STAGES) == {"data", "pretrain", "finetune", "preference", "quantize"}


def test_exposed_ports_match_the_chart_and_the_trainer_default() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = {int(p) for c in _final_stage(OPERATOR) if c.cmd == "EXPOSE" for p in c.value}
    assert exposed == {values["health"]["port"], values["metrics"]["port"]}
    from crucible.trainer.config.common import MetricsConfig

    trainer = {int(p) for c in _final_stage(TRAINER) if c.cmd == "EXPOSE" for p in c.value}
    assert trainer == {MetricsConfig().port}


# --- build context ------------------------------------------------------------------------------


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(.dockerignore) patterns as (negated, regex), with Docker's semantics for * ** ? and !."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(f"^{regex}$")))
    return rules


def _excluded(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in _dockerignore():
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def _copy_sources(path: Path) -> list[str]:
    sources = []
    for c in _commands(path):
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            sources += [s.rstrip("/") for s in c.value[:-1]]
    return sources


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_everything_copied_exists_and_is_in_the_build_context(path: Path) -> None:
    for source in _copy_sources(path):
        assert (REPO / source).exists(), f"{path.name} copies {source}, which does not exist"
        assert not _excluded(source), f"{path.name} copies {source}, which .dockerignore excludes"
    for needed in ("operator/crucible/cli.py", "trainer/crucible/trainer/__main__.py", "pyproject.toml", "README.md"):
        assert not _excluded(needed), needed


def test_build_context_leaves_out_environments_caches_and_secrets() -> None:
    for path in (".venv/bin/python", ".git/config", "tests/conftest.py", ".crucible/quickstart/state.json",
                 "operator/crucible/__pycache__/cli.cpython-311.pyc", "charts/crucible/values.yaml", ".env"):
        assert _excluded(path), f".dockerignore lets {path} into the build context"


# --- the package the images install -----------------------------------------------------------------


@pytest.mark.slow
def test_the_wheel_holds_both_source_roots_and_no_namespace_init(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=scaled(300), check=False)
    if result.returncode != 0 and "hatchling" in result.stdout + result.stderr:
        pytest.skip(f"cannot fetch the build backend: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("crucible-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "crucible/__init__.py" not in names, "one namespace package over two roots: no crucible/__init__.py"
    for module in ("crucible/cli.py", "crucible/api/common.py", "crucible/trainer/__main__.py",
                   "crucible/trainer/config/common.py", "crucible/operator/main.py"):
        assert module in names, f"the wheel lacks {module}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "crucible = crucible.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_operator_install_resolves_without_torch(tmp_path: Path) -> None:
    """What `pip install .[operator]` in the operator image really pulls in, resolved by pip."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         f"{REPO}[operator]"],
        capture_output=True, text=True, timeout=scaled(300), check=False,
    )
    if result.returncode != 0 and re.search(r"(No matching distribution|Could not find a version|connection)",
                                              result.stderr, re.I):
        pytest.skip(f"no package index reachable to resolve against: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr
    installed: dict[str, Any] = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i for i in json.loads(report.read_text())["install"]}
    assert {"crucible", "kopf", "prometheus-client", "pydantic"} <= set(installed)
    assert not set(installed) & HEAVY, f"the operator image would pull {sorted(set(installed) & HEAVY)}"
    assert not [n for n in installed if n.startswith("nvidia-")]
