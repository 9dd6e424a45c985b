"""`make lint`'s buf breaking compares the API with its previous version, in any tree.

Run in a scratch git repository holding this repo's buf.yaml and protos/, with
the real git and buf: a breaking change fails while uncommitted (against HEAD)
and still after it is committed and buried under other commits (against the
parent of the last commit that changed a .proto file, as in CI's fresh clone).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from protos import breaking
from tests.support.env import ROOT

API = Path("protos/acme/orders/v1/order_service.proto")
GET_ORDER = "  rpc GetOrder(GetOrderRequest) returns (Order);\n"


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / API
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(
        ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.py", "__pycache__")
    )
    git(tmp_path, "init", "--quiet", "--initial-branch=main")
    return tmp_path


def test_a_breaking_change_fails_uncommitted_and_committed(
    repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    first = commit(repo, "the API")
    assert breaking.previous_version(repo) is None  # nothing earlier to compare with
    assert breaking.main(repo) == 0

    edit(repo, GET_ORDER, "")  # an RPC removed
    assert breaking.previous_version(repo) == first
    assert breaking.main(repo) != 0
    assert 'Previously present RPC "GetOrder"' in capfd.readouterr().out

    commit(repo, "GetOrder removed")
    (repo / "protos" / "generate.py").write_text("# Beside the API, not in it.\n")
    head = commit(repo, "a script in protos/")
    # A clean tree, as CI's clone: the version before the last change to a .proto file.
    assert breaking.previous_version(repo) == first
    assert breaking.main(repo) != 0

    edit(repo, "// Returns only the order's status", "// Returns just the order's status")
    assert breaking.previous_version(repo) == head  # uncommitted: against HEAD
    assert breaking.main(repo) == 0  # a comment breaks nothing


def test_a_compatible_change_passes(repo: Path) -> None:
    commit(repo, "the API")
    added = (
        "\n  // Returns the order, again.\n  rpc GetOrderAgain(GetOrderRequest) returns (Order);\n"
    )
    edit(repo, GET_ORDER, GET_ORDER + added)
    assert breaking.main(repo) == 0
    commit(repo, "GetOrderAgain added")
    assert breaking.main(repo) == 0
