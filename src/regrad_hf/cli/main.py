"""The `regrad` command's entry point: the verb a command line names, and the boundary where user mistakes become
one `error:` line.

Only the standard library is imported until a verb runs, so that `regrad --help` is fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .options import build_parser, path_mistake
from .train_options import train_help, train_path_mistake


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        if any(arg in ("-h", "--help") for arg in argv[1:]):
            print(train_help())
            return 0
        if mistake := train_path_mistake(argv[1:]):  # before transformers is imported (seconds)
            print(f"error: {mistake}", file=sys.stderr)
            return 2
        from . import train

        return run(train.main, argv[1:])
    args = build_parser().parse_args(argv)
    if mistake := path_mistake(args):  # before the verb imports torch (seconds)
        print(f"error: {mistake}", file=sys.stderr)
        return 2
    from . import verbs

    return run(getattr(verbs, args.verb), args)


def run(verb, *arguments) -> int:
    """Runs a verb; a user mistake (a `ReGradError`, a missing or unreadable file, no network for the Hub) prints one
    `error:` line and returns 2, an interruption returns 130. Anything else is a bug and keeps its traceback."""
    from huggingface_hub.errors import HfHubHTTPError

    from ..errors import ReGradError

    # The HTTP library's base error (httpx's HTTPError: connection failures, timeouts), whichever huggingface_hub uses.
    network_errors = tuple(base for base in HfHubHTTPError.__bases__ if issubclass(base, Exception))
    try:
        return verb(*arguments)
    except ReGradError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
    except OSError as error:  # files the user named: missing, unreadable, a directory instead of a file ...
        message = f"{error.strerror}: {error.filename}" if error.filename and error.strerror else one_line(error)
        print(f"error: {message}", file=sys.stderr)
    except network_errors as error:
        print(f"error: cannot reach the Hub: {one_line(error)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 2


def one_line(error: BaseException) -> str:
    """An error's message on one line (some libraries' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__
