# ruff: noqa: UP006, UP035, UP045 - torchx 0.7 reads these annotations at run time and knows only typing's forms
"""torchx components: each Crucible stage as a torchx ``AppDef``, launched without the operator.

    torchx run -s local_cwd crucible.data --file pipeline/ --name corpus
    torchx run -s slurm     crucible.pretrain --file pipeline/02-pretrain.yaml --storage_root /shared/crucible
    torchx run -s kubernetes crucible.finetune --file sft.yaml --storage_root s3://bucket/crucible

(``crucible.torchx`` is registered under torchx's ``[torchx.components]`` entry point with the
``crucible`` prefix; ``torchx run $(python -m crucible.torchx --path):data`` works without it.)

Each component reads the resource (a YAML file or a folder, validated as ``crucible validate``
does), plans its attempt with :func:`crucible.core.plan.plan` and takes the command and the
environment from :mod:`crucible.operator.render`, the same as the Indexed Job the operator
would create: one torchx role per plan role (node group), ``python -m crucible.trainer STAGE
--spec FILE``, torchrun with ``--nnodes/--nproc-per-node/--node-rank`` for distributed roles
(the master is the scheduler's rank-0 host). What differs from a Job, and why:

* The spec travels in the environment (``CRUCIBLE_SPEC_JSON``) and each replica writes it to a
  private file under ``$TMPDIR`` before it starts: torchx has no ConfigMap.
* A DataPipeline with N workers is one role of N replicas running ``--stage all`` (the workers
  wait for each other between stages), because an AppDef's roles run at once while the
  operator runs the three stage Jobs one after the other.
* ``fromRun`` inputs resolve as ``crucible render`` resolves them: to the referenced run's
  ``spec.output.uri`` when it is in the same files, else to its default output under
  ``storage_root``. ``inputs`` (``data=/path,model=s3://...``) overrides any of them.
* S3 credentials come from the launching environment (``env``), not from a Kubernetes Secret.
* Restarts are the scheduler's (``max_retries``); the stage resumes from its last checkpoint
  and a finished stage (``_SUCCESS``) exits 0 at once, so a retry is always safe.
"""

import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torchx.specs as specs

from crucible.api import KIND_MODELS, Resource
from crucible.api.validate import Loaded, load_resources
from crucible.core.plan import Role, plan
from crucible.operator.render import (
    DEFAULT_IMAGE,
    RenderSettings,
    role_environment,
    torchrun_command,
)
from crucible.operator.render_cli import resolve_inputs
from crucible.trainer.config.stages import KIND_TO_STAGE

ENV_SPEC_JSON = "CRUCIBLE_SPEC_JSON"
KIND_OF = {stage: kind for kind, stage in KIND_TO_STAGE.items()}  # "data" -> the DataPipeline kind, ...
DEFAULT_STORAGE_ROOT = ".crucible/torchx"
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|m)?$")
_FACTORS = {None: 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


class ComponentError(ValueError):
    """The resource cannot be launched as asked; the message names the file, field and fix."""


def _quantity(text: str) -> float:
    match = _QUANTITY.match(text)
    if match is None:  # pragma: no cover - the resource model's pattern admits only these
        raise ComponentError(f"{text!r} is not a Kubernetes quantity")
    return float(match.group(1)) * _FACTORS[match.group(2)]


def _load(file: str, kind: Optional[str], name: Optional[str]) -> tuple[Resource, List[Loaded], str]:
    """The one resource asked for, everything loaded beside it, and where it came from."""
    result = load_resources([file])
    if result.problems:
        raise ComponentError("\n".join(str(p) for p in result.problems))
    candidates = [r for r in result.resources if (kind is None or r.resource.kind == kind)
                  and (not name or r.resource.name == name)]
    if len(candidates) != 1:
        what = f"{kind or 'resource'}{f' named {name!r}' if name else ''}"
        found = ", ".join(f"{r.resource.kind}/{r.resource.name}" for r in result.resources) or "nothing"
        raise ComponentError(
            f"{file}: {'no' if not candidates else 'more than one'} {what} (found {found}); "
            + ("pass --name" if candidates else "check --file and --name")
        )
    return candidates[0].resource, result.resources, f"{candidates[0].file}:{candidates[0].line}"


def _parse_inputs(inputs: Optional[Dict[str, str]], resource: Resource, where: str) -> Dict[str, str]:
    refs = resource.input_refs()
    unknown = sorted(set(inputs or {}) - set(refs))
    if unknown:
        raise ComponentError(
            f"{where}: --inputs names {', '.join(unknown)}, which {resource.kind} {resource.name} does not take "
            f"from another run; its fromRun inputs are: {', '.join(refs) or 'none'}"
        )
    return dict(inputs or {})


_SPEC = "\0spec"  # placeholders, replaced in the bash script by shell expansions
_RANK0 = "\0rank0"


def _single_data_role(role: Role) -> Role:
    """The N-worker DataPipeline as one role: every worker runs every stage (``--stage all``)."""
    argv = list(role.command)
    argv[argv.index("--stage") + 1] = "all"
    return Role("data", role.replicas, 1, 0, tuple(argv), distributed=False, sharded=True)


def _command(role: Role, spec_path: str, settings: RenderSettings) -> List[str]:
    """The rendered Job's command for ``role``, with torchx's replica id and the scheduler's rank-0 host."""
    argv = list(role.command_for(specs.macros.replica_id) if role.sharded else role.command)
    argv = [_SPEC if a == spec_path else a for a in argv]
    if not role.distributed:
        return argv
    cmd = torchrun_command(role, argv, node_rank=specs.macros.replica_id, master_addr=_RANK0,
                           master_port=settings.master_port)
    if argv[0] != "python":  # torchrun of the same interpreter, not whichever is first on PATH
        cmd = [argv[0], "-m", "torch.distributed.run", *cmd[1:]]
    return cmd


def _script(command: List[str]) -> str:
    """bash: write the spec from the environment to a file of this replica, then exec the command.

    ``$$`` is a literal ``$`` to torchx, whose macros (``${replica_id}``, ...) are filled in first.
    """
    spec = f"$${{TMPDIR:-/tmp}}/crucible-spec-{specs.macros.app_id}-{specs.macros.replica_id}.json"
    words = " ".join(shlex.quote(a) for a in command)
    words = words.replace(_SPEC, "'\"$$spec\"'").replace(_RANK0, f"'\"$${{{specs.macros.rank0_env}:=localhost}}\"'")
    return f'spec="{spec}" && printf "%s" "$${ENV_SPEC_JSON}" > "$$spec" && exec {words}'


def _escape(value: str) -> str:
    return value.replace("$", "$$")  # torchx substitutes its macros in the environment too


def app(
    file: str,
    kind: Optional[str] = None,
    name: Optional[str] = None,
    storage_root: str = DEFAULT_STORAGE_ROOT,
    image: str = DEFAULT_IMAGE,
    python: str = "python",
    attempt: int = 0,
    inputs: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """The AppDef of one Crucible resource (see the module docstring); the components call it."""
    resource, loaded, where = _load(file, kind, name)
    settings = RenderSettings(image=image)
    resolved = {**resolve_inputs(resource, loaded, storage_root), **_parse_inputs(inputs, resource, where)}
    the_plan = plan(resource, storage_root=storage_root, attempt=attempt, inputs=resolved, python=python)
    res = resource.spec.resources
    spec_json = json.dumps(the_plan.spec, sort_keys=True)
    spec_path = next(r.command for r in the_plan.roles)
    spec_path_value = spec_path[spec_path.index("--spec") + 1]
    roles: List[specs.Role] = []
    for role in the_plan.roles:
        if the_plan.kind == KIND_OF["data"] and role.sharded:
            if roles:  # the sharded pipeline's three stage roles are one torchx role (see the module docstring)
                continue
            role = _single_data_role(role)
        role_env = {**role_environment(resource, the_plan, role, settings), **(env or {}), ENV_SPEC_JSON: spec_json}
        roles.append(specs.Role(
            name=role.name,
            image=res.image or image,
            entrypoint="bash",
            args=["-c", _script(_command(role, spec_path_value, settings))],
            num_replicas=role.replicas,
            resource=specs.Resource(cpu=max(1, math.ceil(_quantity(res.cpu))), gpu=role.gpus_per_node,
                                    memMB=max(1, int(_quantity(res.memory) // 2**20))),
            env={k: _escape(v) for k, v in role_env.items()},
            port_map={"rendezvous": settings.master_port} if role.distributed else {},
            max_retries=max_retries,
        ))
    return specs.AppDef(name=f"{resource.name}-{the_plan.stage}", roles=roles)


def data(
    file: str,
    name: Optional[str] = None,
    storage_root: str = DEFAULT_STORAGE_ROOT,
    image: str = DEFAULT_IMAGE,
    python: str = "python",
    inputs: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """A DataPipeline: raw text to clean, deduplicated token shards.

    Args:
        file: YAML file or folder holding the DataPipeline (and the runs it refers to)
        name: metadata.name of the DataPipeline when the files hold more than one
        storage_root: where outputs go when the spec sets no output.uri (a path every replica sees, or s3://)
        image: container image when resources.image is empty (container schedulers)
        python: the Python that has crucible[trainer] installed, on the hosts that run it
        inputs: fromRun overrides, e.g. tokenizer.source=/path/to/tokenizer
        env: extra environment, e.g. AWS_ACCESS_KEY_ID=...,AWS_SECRET_ACCESS_KEY=...
        max_retries: restarts the scheduler may make (the stage resumes where it stopped)
    """
    return app(file, KIND_OF["data"], name, storage_root, image, python, 0, inputs, env, max_retries)


def pretrain(
    file: str,
    name: Optional[str] = None,
    storage_root: str = DEFAULT_STORAGE_ROOT,
    image: str = DEFAULT_IMAGE,
    python: str = "python",
    inputs: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """A PretrainRun: next-token training on a DataPipeline's shards, one role of resources.nodes.

    Args:
        file: YAML file or folder holding the PretrainRun (and the runs it refers to)
        name: metadata.name of the PretrainRun when the files hold more than one
        storage_root: where outputs and checkpoints go when the spec sets none (every node must see it)
        image: container image when resources.image is empty (container schedulers)
        python: the Python that has crucible[trainer] installed, on the hosts that run it
        inputs: fromRun overrides, e.g. data=/shared/corpus/output
        env: extra environment, e.g. AWS_ACCESS_KEY_ID=...,AWS_SECRET_ACCESS_KEY=...
        max_retries: restarts the scheduler may make (training resumes from the last checkpoint)
    """
    return app(file, KIND_OF["pretrain"], name, storage_root, image, python, 0, inputs, env, max_retries)


def finetune(
    file: str,
    name: Optional[str] = None,
    storage_root: str = DEFAULT_STORAGE_ROOT,
    image: str = DEFAULT_IMAGE,
    python: str = "python",
    inputs: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """A FinetuneRun: supervised fine-tuning (full, LoRA, QLoRA).

    Args:
        file: YAML file or folder holding the FinetuneRun (and the runs it refers to)
        name: metadata.name of the FinetuneRun when the files hold more than one
        storage_root: where outputs and checkpoints go when the spec sets none (every node must see it)
        image: container image when resources.image is empty (container schedulers)
        python: the Python that has crucible[trainer] installed, on the hosts that run it
        inputs: fromRun overrides, e.g. model=/models/base
        env: extra environment, e.g. AWS_ACCESS_KEY_ID=...,AWS_SECRET_ACCESS_KEY=...
        max_retries: restarts the scheduler may make (training resumes from the last checkpoint)
    """
    return app(file, KIND_OF["finetune"], name, storage_root, image, python, 0, inputs, env, max_retries)


def preference(
    file: str,
    name: Optional[str] = None,
    storage_root: str = DEFAULT_STORAGE_ROOT,
    image: str = DEFAULT_IMAGE,
    python: str = "python",
    inputs: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """A PreferenceRun: DPO and its variants, or a reward model.

    Args:
        file: YAML file or folder holding the PreferenceRun (and the runs it refers to)
        name: metadata.name of the PreferenceRun when the files hold more than one
        storage_root: where outputs and checkpoints go when the spec sets none (every node must see it)
        image: container image when resources.image is empty (container schedulers)
        python: the Python that has crucible[trainer] installed, on the hosts that run it
        inputs: fromRun overrides, e.g. model=/models/sft
        env: extra environment, e.g. AWS_ACCESS_KEY_ID=...,AWS_SECRET_ACCESS_KEY=...
        max_retries: restarts the scheduler may make (training resumes from the last checkpoint)
    """
    return app(file, KIND_OF["preference"], name, storage_root, image, python, 0, inputs, env, max_retries)


def quantize(
    file: str,
    name: Optional[str] = None,
    storage_root: str = DEFAULT_STORAGE_ROOT,
    image: str = DEFAULT_IMAGE,
    python: str = "python",
    inputs: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """A QuantizeJob: weight-only INT8/INT4 quantization, evaluated.

    Args:
        file: YAML file or folder holding the QuantizeJob (and the runs it refers to)
        name: metadata.name of the QuantizeJob when the files hold more than one
        storage_root: where the output goes when the spec sets no output.uri
        image: container image when resources.image is empty (container schedulers)
        python: the Python that has crucible[trainer] installed, on the host that runs it
        inputs: fromRun overrides, e.g. model=/models/tuned,evaluation.data=/data/corpus
        env: extra environment, e.g. AWS_ACCESS_KEY_ID=...,AWS_SECRET_ACCESS_KEY=...
        max_retries: restarts the scheduler may make
    """
    return app(file, KIND_OF["quantize"], name, storage_root, image, python, 0, inputs, env, max_retries)


COMPONENTS = {KIND_OF[fn.__name__]: fn for fn in (data, pretrain, finetune, preference, quantize)}
assert set(COMPONENTS) == set(KIND_MODELS), "a kind without a torchx component"


if __name__ == "__main__":  # ``python -m crucible.torchx --path``: this file, for ``torchx run FILE:component``
    if sys.argv[1:] == ["--path"]:
        print(Path(__file__).resolve())
    else:
        print(__doc__)
