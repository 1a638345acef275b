"""One torchrun worker for tests/test_distributed.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node=2 dist_worker.py SPEC.json

Runs each ``argv`` of SPEC.json through ``ditq``'s ``main`` in turn, as
``torchrun ... -m ditq.cli.main`` would, and writes what every rank saw
(exit status, stderr, seconds) to ``SPEC.json``'s folder as ``rank<R>.json``.

The first run starts the process group from torchrun's environment, as a
real launch does. The group is then kept for the later runs (destroying and
re-creating it in one process can hang under torchrun's shared store, and a
real launch trains once), and destroyed at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    from ditq import distributed
    from ditq.cli.main import main

    distributed.DistContext.close = lambda self: None  # one process group for all the runs
    spec = Path(sys.argv[1])
    results = []
    for argv in json.loads(spec.read_text()):
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        results.append({"argv": argv, "rc": rc, "stderr": err.getvalue(), "s": time.perf_counter() - t0})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    (spec.parent / f"rank{os.environ['RANK']}.json").write_text(json.dumps(results, indent=1))
    # Leave without the interpreter's teardown: about one launch in ten, a thread of torch's c10d
    # store was still joinable when its destructor ran there ("terminate called without an active
    # exception", SIGABRT) after every run had finished and written its results (seen with the
    # code before and after the kernels issue alike). What this worker checks is in rank<R>.json.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
