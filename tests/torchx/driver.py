"""Run inside the torchx environment (.venv-torchx): build the AppDefs, compare them with the
rendered Jobs, and launch one on torchx's local scheduler. Prints one JSON line of findings.

    .venv-torchx/bin/python tests/torchx/driver.py PIPELINE_DIR STORAGE_ROOT STAGE_PYTHON
"""

import json
import sys

from torchx.runner import get_runner
from torchx.specs import AppState

from crucible.api.validate import load_resources
from crucible.core.plan import plan
from crucible.operator.render import render
from crucible.operator.render_cli import resolve_inputs
from crucible.torchx import COMPONENTS, app, data

folder, storage_root, stage_python = sys.argv[1:4]
found: dict = {}

# The AppDef of every resource, next to the Job the operator would render for it.
loaded = load_resources([folder]).resources
for item in loaded:
    res = item.resource
    appdef = app(folder, res.kind, res.name, storage_root=storage_root)
    jobs = render(res, plan(res, storage_root=storage_root, inputs=resolve_inputs(res, loaded, storage_root))).jobs
    container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    found[res.name] = {
        "roles": [(r.name, r.num_replicas, r.resource.gpu) for r in appdef.roles],
        "script": appdef.roles[0].args[1],
        "env": appdef.roles[0].env,
        "job_command": container["command"],
        "job_env": {e["name"]: e["value"] for e in container["env"] if "value" in e},
        "job_replicas": [j["spec"]["completions"] for j in jobs],
    }
found["components"] = sorted(COMPONENTS)

# A real stage on the local scheduler: the DataPipeline with two workers.
corpus = next(i.resource for i in loaded if i.resource.kind == "DataPipeline")
runner = get_runner()
handle = runner.run(data(folder, name=corpus.name, storage_root=storage_root, python=stage_python), "local_cwd")
status = runner.wait(handle, wait_interval=0.5)
found["state"] = str(status.state if status else None)
found["succeeded"] = status is not None and status.state == AppState.SUCCEEDED
found["handle"] = handle
print("RESULT " + json.dumps(found))
