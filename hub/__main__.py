"""`python -m hub push DIR REPO_ID ...`: publish an exported model folder."""

from __future__ import annotations

import argparse
import logging
import sys

from hub.publish import PublishError, push


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="upload an exported model folder to a Hub model repo")
    p.add_argument("directory", help="folder written by save_pretrained or `python -m train --out`")
    p.add_argument("repo_id", help="NAMESPACE/NAME of the model repo (created if missing)")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our own progress at INFO; third-party clients (e.g. the HTTP library) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("hub",):
        logging.getLogger(name).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "push":
            url = push(
                args.directory,
                args.repo_id,
                revision=args.revision,
                private=True if args.private else None,
                commit_message=args.commit_message,
            )
            print(url)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
