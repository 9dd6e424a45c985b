"""`python -m server.tokens`: mints bearer tokens and prints their entries for the tokens file.

python -m server.tokens new --name storefront --role storefront [--expires 2027-01-01T00:00:00Z]
echo "$TOKEN" | python -m server.tokens hash
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime

from server.platform.tokens import (
    CALLER_NAME,
    ORDER_METHODS,
    ROLES,
    format_time,
    hash_token,
    new_token,
    parse_expiry,
)


def entry_toml(
    name: str,
    token: str,
    *,
    role: str | None = None,
    methods: Sequence[str] = (),
    expires: datetime | None = None,
) -> str:
    """The [[callers]] table for a token, to add to the tokens file."""
    # A JSON string is a valid TOML basic string.
    lines = ["[[callers]]", f"name = {json.dumps(name)}"]
    if role is not None:
        lines.append(f"role = {json.dumps(role)}")
    if methods:
        lines.append(f"methods = {json.dumps(list(methods))}")
    if expires is not None:
        lines.append(f"expires = {format_time(expires)}")
    lines.append(f'token_sha256 = "{hash_token(token)}"')
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.tokens",
        description="Bearer tokens for the OrderService (see --auth-tokens-file).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser(
        "new", help="mint a token: print it once, and the entry for the tokens file"
    )
    new.add_argument("--name", required=True, help="the caller, e.g. storefront")
    new.add_argument("--role", choices=list(ROLES), help="what the caller may call")
    new.add_argument(
        "--method",
        action="append",
        default=[],
        choices=list(ORDER_METHODS),
        help="an RPC the caller may call, besides its role's (repeatable)",
    )
    new.add_argument("--expires", help="RFC 3339 expiry, e.g. 2027-01-01T00:00:00Z")
    commands.add_parser("hash", help="print the token_sha256 of a token read from standard input")
    args = parser.parse_args(argv)
    if args.command == "hash":
        token = sys.stdin.readline().strip()
        if not token:
            parser.error("no token on standard input")
        print(hash_token(token))
        return 0
    if not CALLER_NAME.fullmatch(args.name):
        parser.error("--name must be 1-64 letters, digits or ._@-")
    if args.role is None and not args.method:
        parser.error("give --role, --method, or both")
    expires = None
    if args.expires is not None:
        try:
            expires = parse_expiry(args.expires)
        except ValueError as err:
            parser.error(f"--expires: {err}")
    token = new_token()
    entry = entry_toml(args.name, token, role=args.role, methods=args.method, expires=expires)
    print(f"Token for {args.name} (shown only now; the server keeps just its hash):\n")
    print(f"    {token}\n")
    print("Add this entry to the tokens file, then restart the server:\n")
    print(entry, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
