"""`python -m tasks.chat RUN_DIR`: run the chat-template contract on a finished run folder.

Reads the run's manifest (GGUFs, merged model, local_deploy records), writes
`RUN_DIR/reports/template-contract.{json,md}`, prints the summary; exit status 1 on a FAIL verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.chat.stage import TemplateContractSettings, failure, template_contract
from tasks.core.artifacts import Artifact
from tasks.core.errors import PipelineError
from tasks.core.vocab import ArtifactKind


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.chat", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a run folder (runs/<model>/<version>) with a manifest.json")
    p.add_argument("--no-serve", action="store_true", help="skip the served generation (no server is started)")
    p.add_argument("--natural-stop", choices=["require", "warn", "off"], default="require")
    args = p.parse_args(argv)
    manifest = args.run_dir / "manifest.json"
    if not manifest.is_file():
        print(f"error: {manifest} does not exist: pass a run folder (runs/<model>/<version>)", file=sys.stderr)
        return 2
    arts = [Artifact.model_validate(a) for a in json.loads(manifest.read_text()).get("artifacts", {}).values()]
    arts = [a for a in arts if a.is_intact()]
    settings = TemplateContractSettings(served_generation=not args.no_serve, natural_stop=args.natural_stop)
    try:
        report = template_contract(
            [a for a in arts if a.kind == ArtifactKind.GGUF],
            next((a for a in arts if a.name == "merged"), None),
            [a for a in arts if a.name.startswith("local:")],
            settings,
            args.run_dir / "reports",
        )
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"template contract: {report.meta['verdict'].upper()}")
    for line in report.meta["summary"]:
        print(f"  {line}")
    print(f"report: {report.meta['markdown']}")
    return 1 if failure(report) else 0


if __name__ == "__main__":
    sys.exit(main())
