"""The ``handoffd`` command line: one sub-command per job.

Every failure is reported as a GSS status: the display texts of the major
and minor status, one per line on stderr, and exit status 1.  Usage errors
exit with 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from handoffd import status
from handoffd.status import GSSError

Handler = Callable[[argparse.Namespace], int]


def _parse_code(text: str) -> int:
    """Accept decimal, 0x-hex and 0o-octal status words, as operators paste them."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a status code: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"status codes are unsigned: {text!r}")
    return value


def _cmd_display_status(args: argparse.Namespace) -> int:
    if args.major is None and args.minor is None:
        raise GSSError(
            status.GSS_S_CALL_INACCESSIBLE_READ, detail="give a major status, --minor N, or both"
        )
    if args.major is not None:
        for message in status.status_messages(args.major, status.GSS_C_GSS_CODE):
            print(message)
    if args.minor is not None:
        for message in status.status_messages(args.minor, status.GSS_C_MECH_CODE):
            print(message)
    return 0


def _add_display_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "display-status",
        help="print the messages of a GSS major status and/or a handoffd minor status",
        description="Print every message of a status, one per line, like the "
        "gss_display_status loop. Example: handoffd display-status 0x90000",
    )
    p.add_argument("major", nargs="?", type=_parse_code, help="major status (e.g. 0x90000)")
    p.add_argument("--minor", type=_parse_code, help="handoffd minor status code")
    p.set_defaults(handler=_cmd_display_status)


# Sub-command registrars; each adds its parser and sets ``handler``.
_REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_display_status,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handoffd",
        description="Context-handoff daemon for pre-forked servers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


def report(error: GSSError) -> None:
    """Print a GSS error the way the seed's display loop does: one message per line."""
    print(
        f"handoffd: error (major 0x{error.major:08x}, minor {error.minor}):",
        file=sys.stderr,
    )
    for message in error.messages():
        print(f"  {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except GSSError as error:
        report(error)
        return 1
    except KeyboardInterrupt:
        return 130
