"""runtimes/forkserver.py: one warm process per runtime and thread count; a changed start-up
variable gets a new server; stop_fork_servers ends them all."""

from __future__ import annotations

import os

import pytest

from edgepack.runtimes import forkserver


@pytest.fixture
def clean_servers():
    forkserver.stop_fork_servers()
    yield
    forkserver.stop_fork_servers()


def test_startup_environment_keeps_only_what_an_interpreter_reads_at_start():
    env = {"PYTHONPATH": "/x", "LD_LIBRARY_PATH": "/y", "OMP_NUM_THREADS": "2", "HOME": "/root",
           "EDGEPACK_CACHE": "/c", "MKL_NUM_THREADS": "1"}
    assert forkserver.startup_environment(env) == {"PYTHONPATH": "/x", "LD_LIBRARY_PATH": "/y",
                                                   "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "1"}


@pytest.mark.skipif(not forkserver.use_fork_server(), reason="fork servers run on Linux only")
def test_prestart_then_reuse_then_replace_on_a_new_startup_variable(clean_servers, monkeypatch):
    forkserver.prestart("onnxruntime", 1)
    (first,) = forkserver.fork_server_pids()
    forkserver.prestart("onnxruntime", 1)
    assert forkserver.fork_server_pids() == [first]  # the same server serves the next session
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="/nonexistent-edgepack-test")
    server = forkserver.server_for("onnxruntime", 1, env, os.getcwd())
    assert server.pid != first and forkserver.fork_server_pids() == [server.pid]
    server.wait_ready(120)
    forkserver.stop_fork_servers()
    assert forkserver.fork_server_pids() == []
