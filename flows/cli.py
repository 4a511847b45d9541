"""The `distillflow` command.

    distillflow check [PARAMS_FILE]   validate a params file for every stage (strict)
    distillflow stages                list the DAG's stages with the params keys each reads

The pipeline itself runs with `dvc repro` (see README); Prefect flows come next
(issue 4) and will hang off this same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

STAGES = ("bootstrap", "seed", "teacher", "student", "pairs", "curate", "score", "train", "evaluate")


def check(path: Path) -> int:
    from stages.lib import params

    failures = 0
    for name in STAGES:
        module = importlib.import_module(f"stages.{name}")
        try:
            params.load_sections(path, module.SECTIONS)
        except ValueError as exc:
            failures += 1
            print(f"{name}: {exc}", file=sys.stderr)
        else:
            print(f"{name}: ok ({', '.join(module.PARAMS)})")
    return 1 if failures else 0


def stages(dvc_yaml: Path) -> int:
    spec = yaml.safe_load(dvc_yaml.read_text())["stages"]
    for name, stage in spec.items():
        each = ""
        if "foreach" in stage:  # a template: one stage per entry of the list it iterates
            each, stage = f" (one per entry of {stage['foreach']})", stage["do"]
        data = [d for d in stage["deps"] if not d.startswith("stages/")]
        print(f"{name}{each}: params {stage['params']}; reads {data or '-'}; writes {stage['outs']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillflow", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a params file for every stage")
    c.add_argument("params", nargs="?", type=Path, default=Path("params.yaml"))
    s = sub.add_parser("stages", help="list the stages of dvc.yaml")
    s.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.params)
    return stages(args.dvc_yaml)


if __name__ == "__main__":
    sys.exit(main())
