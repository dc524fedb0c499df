"""`tuneserve` command line: parse (tuneserve/parsers.py), run the command (tuneserve/commands.py), and turn
every failure into one readable `error: ...` line and an exit code, never a traceback (unless -v).

Exit codes: 0 done; 1 the job failed (server error, no service at the URL, parity gate, failed images);
2 a usage error (bad flag or value, missing file or folder, unknown model); 130 interrupted; 141 stdout
closed early (`tuneserve models --json | head`), as for any tool killed by SIGPIPE.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from tuneserve.commands import COMMANDS, EXIT_FAILURE, EXIT_USAGE
from tuneserve.parsers import build_parser

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

QUIET_LOGGERS = ("bentoml", "httpx", "matplotlib", "PIL", "onnx_ir", "onnxscript", "torch.onnx")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        code = int(COMMANDS[args.command](args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
        return code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`). Point stdout at /dev/null so that the interpreter's final flush
        # does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        if args.verbose:
            raise
        code = exit_code(e)
        hint = "" if code == EXIT_USAGE or _is_expected_failure(e) else f" ({type(e).__name__}; -v shows the traceback)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return code


def exit_code(e: Exception) -> int:
    """EXIT_USAGE for what the user can fix in the command line or its inputs, EXIT_FAILURE for the rest."""
    from tuneserve.models.preprocessing import ImageDecodeError
    from tuneserve.models.store import ModelNotFoundError
    from tuneserve.models.weights import WeightsUnavailableError

    # DataError and every config check are ValueErrors.
    usage = (ValueError, ModelNotFoundError, WeightsUnavailableError, ImageDecodeError, FileNotFoundError)
    return EXIT_USAGE if isinstance(e, usage) else EXIT_FAILURE


def _is_expected_failure(e: Exception) -> bool:
    """Failures whose message says all there is: no traceback hint for them."""
    from tuneserve.client import ServiceUnreachable
    from tuneserve.models.store import ModelIntegrityError
    from tuneserve.service.plan import ModelUnusable
    from tuneserve.service.process import ServerFailed

    if isinstance(e, (ServiceUnreachable, ServerFailed, ModelUnusable, ModelIntegrityError)):
        return True
    export = sys.modules.get("tuneserve.training.export")  # loaded if it raised: no need to import torch here
    return export is not None and isinstance(e, export.ExportParityError)


if __name__ == "__main__":
    sys.exit(main())
