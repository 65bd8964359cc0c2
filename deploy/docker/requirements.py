"""Print the requirements of pyproject.toml (dependencies and the given extras), one per line.

The image build installs these in a layer of their own, before the source is copied, so that a
change to the code does not download and install every dependency again:

    python3 requirements.py pyproject.toml cpu,train > requirements.txt
"""

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def main() -> int:
    path, extras = sys.argv[1], [e for e in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if e]
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        print(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}", file=sys.stderr)
        return 1
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += [r for r in optional[extra] if r not in requirements]
    print("\n".join(requirements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
