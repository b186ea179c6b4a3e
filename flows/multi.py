"""Several models at once: one flow run per deployment_config.yaml, in parallel.

`python -m flows.multi a.yaml b.yaml` runs each config as its own `loraship-full` flow run (child runs
of one `loraship-multi` run), at most `--parallel` at a time in this process. With `--deployment
loraship-full/loraship-full` each config becomes a run of that deployment instead, picked up by
whatever workers serve its work pool (other machines included). The heavy stages still share the
global concurrency limit (performance.concurrency_limit), so parallel models do not oversubscribe a
machine. Prefect does the scheduling; this module only fans the configs out.
"""

from __future__ import annotations

import argparse
import contextvars
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flows.env import prepare_environment

prepare_environment()

from prefect import flow, get_run_logger, tags  # noqa: E402

from flows.config import load_config  # noqa: E402
from flows.full import full  # noqa: E402
from flows.orchestration import run_tags  # noqa: E402
from flows.task_runners import configured_flow  # noqa: E402
from tasks.core.errors import PipelineError  # noqa: E402


def _one_local(config_path: str, only: list[str] | None, dry_run: bool) -> dict[str, Any]:
    cfg = load_config(config_path)
    with tags(*run_tags(cfg)):
        state = configured_flow(full, cfg)(config_path=config_path, only=only, dry_run=dry_run, return_state=True)
    out: dict[str, Any] = {"config": config_path, "model": cfg.model.name, "state": state.name}
    if state.is_completed():
        summary = state.result()
        out["degraded"] = summary.degraded
    else:
        out["error"] = str(state.message or "")
    return out


def _one_deployment(deployment: str, config_path: str, only: list[str] | None, dry_run: bool) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment, parameters={"config_path": config_path, "only": only, "dry_run": dry_run}, timeout=None
    )
    return {"config": config_path, "flow_run": str(run.id), "state": run.state.name if run.state else "unknown"}


@flow(name="loraship-multi", log_prints=True)
def multi(
    config_paths: list[str],
    parallel: int = 2,
    deployment: str = "",
    only: list[str] | None = None,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Run the pipeline for several models as parallel flow runs; returns each run's final state."""
    logger = get_run_logger()
    for p in config_paths:  # fail fast on a bad file, before anything starts
        load_config(p)
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="loraship-model") as pool:
        # Each thread gets a copy of this flow's context, so the model runs show up as its child runs.
        futures = []
        for p in config_paths:
            ctx = contextvars.copy_context()
            fn = (
                (lambda p=p: _one_deployment(deployment, p, only, dry_run))
                if deployment
                else (lambda p=p: _one_local(p, only, dry_run))
            )
            futures.append(pool.submit(ctx.run, fn))
        results = [f.result() for f in futures]
    for r in results:
        logger.info("%s: %s", r["config"], r["state"])
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.multi",
        description=(
            "Run the pipeline for several models (one deployment_config.yaml each) as parallel Prefect flow runs."
        ),
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="deployment_config.yaml files, one per model")
    p.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="models at a time (default 2); heavy stages also share performance.concurrency_limit",
    )
    p.add_argument(
        "--deployment",
        default="",
        help="run each as a run of this deployment (flow/deployment name) on its work pool's workers",
    )
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    try:
        results = multi(
            config_paths=args.configs,
            parallel=args.parallel,
            deployment=args.deployment,
            only=args.only,
            dry_run=args.dry_run,
        )
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r['state']:<10} {r['config']}" + (f"  ({r['error']})" if r.get("error") else ""))
    return 0 if all(r["state"] == "Completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
