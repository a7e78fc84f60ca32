"""The ``sglang-turbo`` console script.

    sglang-turbo serve [launch_server flags]   same as python -m sglang_turbo.launch_server
    sglang-turbo models                        list the embedded models
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from .launch_server import main as serve

        serve(rest, prog="sglang-turbo serve")
    elif command == "models":
        from .launch_server import print_models

        print_models()
    else:
        sys.exit(f"sglang-turbo: unknown command {command!r}; expected 'serve' or 'models' (see --help)")


if __name__ == "__main__":
    main()
