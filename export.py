"""Export for deployment: `python export.py --checkpoint RUN --format gguf-tq2_0 --output m.gguf`.

Formats: gguf-tq2_0, gguf-tq1_0, gguf-q8_0, gguf-f16, gguf-f32 (llama.cpp), hf (transformers),
packed.
See tsld_jax/export_cli.py for the flags and tsld_jax/models/gguf_export.py for the GGUF types.
"""

import os
import signal
import sys

_finished = None  # main's exit status once it has returned


def _leave_at_once(signum, frame):
    if _finished is not None:  # main has reported the export (or why there is none)
        os._exit(_finished)
    # While the imports run nothing is written yet: one line, and out (a KeyboardInterrupt in
    # the middle of jax's imports was a traceback; SIGTERM's default, a silent exit).
    print(
        f"error: stopped by {signal.Signals(signum).name} while starting; nothing was written",
        file=sys.stderr,
    )
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _leave_at_once)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tsld_jax import export_cli

    # From here export_cli.main handles SIGTERM itself, and SIGINT as KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _finished = export_cli.main()
    # The export is whole or was never written, and main has said which: leave now. Python's
    # own shutdown puts the default signal handlers back before it ends, so a SIGTERM during
    # jax's exit hooks was a silent exit -15 after a finished export (seen once in CI); an
    # export has nothing left for those hooks to do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_finished)
