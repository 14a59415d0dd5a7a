"""`kdviz` command line: analyze, teacher-cache, distill, compare, demo, notebooks, zoo. One module per command."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from kdviz.cli import analyze, cache, compare, demo, distill, zoo
from kdviz.cli.options import EPILOG
from kdviz.distributed import SharedError, is_peer_failure, leave, world
from kdviz.files import KdvizWarning


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdviz",
        description="Which tokens are hard to teach, and what does each KD objective do to them?",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    analyze.add_parser(commands)
    cache.add_parser(commands)
    demo.add_parsers(commands)
    distill.add_parser(commands)
    compare.add_parser(commands)
    zoo.add_parser(commands)
    return parser


HANDLERS = {"analyze": analyze.run, "teacher-cache": cache.run, "demo": demo.run_demo, "notebooks": demo.run_notebooks,
            "distill": distill.run, "compare": compare.run, "zoo": zoo.run}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"kdviz: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in HANDLERS:
        parser.print_help()
        return 2
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", KdvizWarning)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill runs the same clean-up as Ctrl-C
    try:
        HANDLERS[args.command](args)
    except ValueError as err:
        return _failed(args.command, err)
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Exception as err:
        if world().size > 1 and is_peer_failure(err):  # another rank failed and said why; this one just stops
            return 2
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        leave()
    return 0


def _failed(command: str, err: ValueError) -> int:
    """Print the error once: an error every rank reached together (SharedError) on rank 0 only, and an error of
    one rank's own with its rank number."""
    here = world()
    if here.size == 1:
        print(f"kdviz {command}: error: {err}", file=sys.stderr)
    elif here.is_main or not isinstance(err, SharedError):
        print(f"kdviz {command}: error (rank {here.rank} of {here.size}): {err}", file=sys.stderr)
    return 2


def _interrupted(command: str) -> int:
    """Say what an interrupt kept and return 130; signals arriving meanwhile (polars can raise a Ctrl-C twice) wait."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    message = (f"kdviz {command}: interrupted. Files that existed before are unchanged; "
               f"{INTERRUPTED.get(command, 'run it again to start over.')}")
    try:
        for _ in range(2 if world().is_main else 0):  # a pending signal interrupts the first try; rank 0 speaks
            try:
                print(message, file=sys.stderr)
                break
            except KeyboardInterrupt:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130


INTERRUPTED = {"analyze": "finished parts are kept: run the same command again to continue from them.",
               "distill": "checkpoints in --out are kept: run the same command with --resume to continue from the "
                          "latest one (or to finish a run interrupted after it; with none, run it again).",
               "teacher-cache": "run the same command again (what the interrupted build left is cleaned up)."}


if __name__ == "__main__":
    sys.exit(main())
