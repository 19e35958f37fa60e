"""``python -m dsrflow.api [PATH]``: write the OpenAPI document (default docs/openapi.json)."""

from __future__ import annotations

import sys

from . import write_openapi


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "docs/openapi.json"
    write_openapi(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
