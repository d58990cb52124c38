"""Print pip constraints pinning every dependency this project declares with a lower bound (`>=`) to that bound: the
oldest versions it claims to work with, for `make check-minimum`. torch is left to constraints.txt (the CPU build on
this machine's disk; an older release would download a CUDA build of several GB)."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"]) + [r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra]]
pins = {}
for requirement in requirements:
    found = re.match(r"^([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*>=\s*([^,;\s]+)", requirement)
    if found and found.group(1).lower() != "torch":
        pins[found.group(1).lower()] = found.group(3)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
