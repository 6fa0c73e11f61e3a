"""`zsclip` with a slow image tower, for the server tests that need a request to stay in flight.

    python tests/slow_serve.py SECONDS serve --port 0 ...

Runs the real program (zsclip.cli.run) after making every forward pass of the image tower wait
SECONDS first, so a test can see a full queue or stop the server mid-request, deterministically.
"""

from __future__ import annotations

import sys
import time

import zsclip.jobs.pipeline as pipeline
from zsclip.cli import run

delay = float(sys.argv.pop(1))
encode_batches = pipeline.encode_batches


def slow_encode_batches(*args, **kwargs):
    time.sleep(delay)
    return encode_batches(*args, **kwargs)


pipeline.encode_batches = slow_encode_batches
sys.argv[0] = "zsclip"
run()
