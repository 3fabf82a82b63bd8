"""`edgepack fleet MATRIX.yaml`: every model of a matrix built for every target, one Ray task a build.

The matrix (YAML, checked strictly here before anything runs) lists spec refs and targets, each
with optional ``set:`` overrides in --set syntax. Every (model, target) pair is one Ray task that
runs ``python -m edgepack.cli build SPEC -t TARGET -o OUT --json`` in a child process: memory and
native crashes stay in the child, and the CLI's exit code and JSON are the result. A task whose
worker process died (killed, out of memory) is retried by Ray (``max_retries``), and so is one
whose build process was killed by a signal edgepack did not send; a build that ran and said 1, 2
or 3 is a result and is never retried. The build is started with PR_SET_PDEATHSIG, so a dead
worker takes its build with it instead of leaving it writing beside its retry, and a retry first
removes the staging directories its killed attempts left. The report (fleet-report.json, .md,
.png in the out root, each written atomically) lists every build; the command's exit code is the
worst (highest) of theirs.

Three files, called in one direction: ``matrix`` reads and checks a MATRIX.yaml; ``driver`` starts
or joins Ray, submits one task per build, collects the results and writes the report; ``task`` is
what a Ray worker runs for one build (the child process, its log, its attempts).
"""

from __future__ import annotations

from .driver import FleetOptions, run_fleet, write_report
from .matrix import Build, MatrixError, load_matrix
from .task import BuildKilled

__all__ = ["Build", "BuildKilled", "FleetOptions", "MatrixError", "load_matrix", "run_fleet", "write_report"]
