"""Write constraints.txt: the exact versions, installed here, of everything requirements.txt and
requirements-dev.txt pull in, torch and what only torch needs left out (a user keeps the torch they have).

    python tests/freeze_constraints.py        # after the suite passed with what is installed

The README's set-up line and .ci/run install with `-c constraints.txt`, so a new release of any dependency
changes nothing until this file is written again; requirements.txt keeps the open ranges.
"""

import importlib.metadata as md
import os
import re

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main():
    stack = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in open(os.path.join(ROOT, name)):
            line = line.split("#")[0].strip()
            if line:
                stack.append(Requirement(line).name)
    pinned = {}
    while stack:
        name = norm(stack.pop())
        if name in pinned or name == "torch":
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        pinned[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    with open(os.path.join(ROOT, "constraints.txt"), "w") as f:
        f.write("# The versions the suite passed with (python tests/freeze_constraints.py writes this file). torch is\n"
                "# not here: keep the CUDA torch you have; the README's set-up line installs 2.13.0 where there is none.\n")
        f.writelines(f"{name}=={version}\n" for name, version in sorted(pinned.items()))
    print(f"constraints.txt: {len(pinned)} packages")


if __name__ == "__main__":
    main()
