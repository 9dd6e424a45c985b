"""`python protos/breaking.py`: buf breaking against the API's previous version; `make lint`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The API's files, in git's pathspec (`*` crosses directories); not the scripts beside them.
PROTO_FILES = ["protos/*.proto"]


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=60
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def previous_version(root: Path = ROOT) -> str | None:
    """The commit holding the API's previous version; None if .git has none.

    That is the last committed API that differs from the one checked, so a
    version is never compared with itself: HEAD while a .proto file has
    uncommitted changes (a developer's tree); in a clean tree (CI's fresh clone
    of main) the parent of the last commit that changed one, so a breaking commit
    fails in CI too, however many commits came after it. buf reads it from
    .git (`.git#ref=<commit>`), with no network; the rules are buf.yaml's.
    """
    if _git(root, "status", "--porcelain", "--untracked-files=all", "--", *PROTO_FILES):
        return _git(root, "rev-parse", "HEAD") or None
    last_change = _git(root, "log", "-1", "--format=%H", "--", *PROTO_FILES)
    if not last_change:
        return None
    # Empty when that commit has no parent here: the first, or a shallow clone's.
    return _git(root, "rev-parse", "--verify", "--quiet", f"{last_change}^") or None


def main(root: Path = ROOT) -> int:
    against = previous_version(root)
    if against is None:
        print("buf breaking: skipped, .git holds no earlier version of protos/")
        return 0
    print(f"buf breaking: protos/ against {against[:12]}, the API's previous version")
    buf = Path(sys.executable).parent / "buf"  # the venv's, from the buf-bin package
    command = [str(buf), "breaking", "--against", f".git#ref={against}"]
    return subprocess.run(command, cwd=root, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
