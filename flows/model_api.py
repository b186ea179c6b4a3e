"""`python -m flows.model_api`: deploy any Hugging Face model as an HTTP API, list, inspect, stop, read logs.

    python -m flows.model_api deploy MODEL --name NAME [--task T] [--port N] [--device auto|cpu|cuda]
                                          [--dtype auto|float16|bfloat16|float32] [--revision R] [--json]
    python -m flows.model_api list [--all] [--json]
    python -m flows.model_api status NAME [--json]
    python -m flows.model_api stop NAME [--json]
    python -m flows.model_api logs NAME [-n LINES]

MODEL is a Hub id, a model folder, or a run folder (its merged/). `deploy` returns once the server has
answered a real request; the server keeps running until `stop`. The work is in tasks/model_api/; this
module is the command line (it does not import Prefect, so `list` answers at once; the Prefect flow is
flows/model_api_flow.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.core.errors import PipelineError
from tasks.model_api.registry import Deployment, DeploymentRegistry
from tasks.model_api.settings import DeployRequest, Device, DType
from tasks.model_api.tasks_table import ALIASES


def _print(rows: list[Deployment] | Deployment, as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.public() for r in rows] if isinstance(rows, list) else rows.public(), indent=2))
        return
    for r in rows if isinstance(rows, list) else [rows]:
        where = r.url or "-"
        err = f"  error: {r.last_error}" if r.last_error and r.status in ("failed",) else ""
        print(f"{r.name:<20} {r.status:<9} {r.progress:5.1f}%  {r.task or '?':<28} {where:<24} {r.model}{err}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.model_api", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy", help="deploy a model and wait until it answers")
    d.add_argument("model", help="Hub id, model folder, or run folder (merged/)")
    d.add_argument("--name", required=True)
    d.add_argument("--task", choices=list(ALIASES), help="default: inferred from pipeline_tag / architectures")
    d.add_argument("--port", type=int)
    d.add_argument("--host")
    d.add_argument("--device", choices=[x.value for x in Device])
    d.add_argument("--dtype", choices=[x.value for x in DType])
    d.add_argument("--revision")
    for field in ("max_batch_size", "max_input_tokens", "threads"):
        d.add_argument(f"--{field.replace('_', '-')}", type=int, dest=field)
    for field in ("max_wait_ms", "download_timeout_s", "start_timeout_s"):
        d.add_argument(f"--{field.replace('_', '-')}", type=float, dest=field)
    d.add_argument("--json", action="store_true", help="print the deployment as JSON")
    ls = sub.add_parser("list", help="live deployments (reconciled with the processes)")
    ls.add_argument("--all", action="store_true", help="also stopped and failed ones")
    ls.add_argument("--json", action="store_true")
    st = sub.add_parser("status", help="one deployment: status, progress, port, last error")
    st.add_argument("name")
    st.add_argument("--json", action="store_true")
    sp = sub.add_parser("stop", help="stop a deployment (its port is free again)")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")
    lg = sub.add_parser("logs", help="the server's log")
    lg.add_argument("name")
    lg.add_argument("-n", "--lines", type=int, default=100)
    return p


def _request(args: argparse.Namespace) -> DeployRequest:
    fields = (
        "task port host device dtype revision max_batch_size max_input_tokens threads max_wait_ms "
        "download_timeout_s start_timeout_s"
    ).split()
    given: dict[str, Any] = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    return DeployRequest(model=args.model, name=args.name, **given)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.model_api.deploy import deploy, stop

    registry = DeploymentRegistry()
    try:
        if args.cmd == "deploy":
            _print(deploy(_request(args), registry), args.json)
        elif args.cmd == "list":
            _print(registry.list(all_rows=args.all), args.json)
        elif args.cmd == "status":
            _print(registry.latest(args.name), args.json)
        elif args.cmd == "stop":
            _print(stop(args.name, registry), args.json)
        elif args.cmd == "logs":
            dep = registry.latest(args.name)
            path = Path(dep.log_path) if dep.log_path else None
            if path is None or not path.exists():
                print(f"error: {args.name} has no log yet ({dep.status}, {dep.step})", file=sys.stderr)
                return 1
            sys.stdout.write("".join(path.read_text(errors="replace").splitlines(keepends=True)[-args.lines :]))
    except ValidationError as exc:
        for e in exc.errors():
            print(f"error: {'.'.join(str(x) for x in e['loc']) or 'request'}: {e['msg']}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
