"""Write a pip constraints file that pins each of kdviz's dependencies to its declared floor.

    python .ci/lowest_versions.py [--exclude torch] [--extra NAME] > constraints.txt
    pip install -c constraints.txt -e '.[test]'

Reads [project].dependencies of pyproject.toml (and the optional-dependency groups named with
--extra) and prints `name==floor` for every requirement with a `>=` lower bound, so CI can run
the tests against the lowest versions kdviz says it supports. A requirement without a `>=` bound
is left to the resolver. --exclude leaves a package out (e.g. torch, installed beforehand from
a wheel on disk). Markers are kept, so a floor that applies only to some Pythons stays so.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(;(?P<marker>.*))?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(requirements: list[str], exclude: set[str]) -> list[str]:
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"Cannot read the requirement {requirement!r}.")
        name = canonical(match["name"])
        if name in exclude:
            continue
        lows = [clause.strip()[2:].strip() for clause in match["spec"].split(",") if clause.strip().startswith(">=")]
        if not lows:
            continue
        if len(lows) > 1:
            raise ValueError(f"{requirement!r} has more than one '>=' bound.")
        marker = f"; {match['marker'].strip()}" if match["marker"] else ""
        pin = f"{name}=={lows[0]}{marker}"
        if name in pins and pins[name] != pin:
            raise ValueError(f"{name} has two floors: {pins[name]!r} and {pin!r}.")
        pins[name] = pin
    return [pins[name] for name in sorted(pins)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    parser.add_argument("--exclude", action="append", default=[], help="a package to leave out (repeatable)")
    parser.add_argument("--extra", action="append", default=[], help="also pin this optional group (repeatable)")
    args = parser.parse_args(argv)
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in args.extra:
        if extra not in project.get("optional-dependencies", {}):
            parser.error(f"pyproject has no optional-dependencies group {extra!r}")
        requirements += project["optional-dependencies"][extra]
    pins = floors(requirements, {canonical(name) for name in args.exclude})
    sys.stdout.write("".join(f"{pin}\n" for pin in pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
