"""runtimes/forkserver.py: one warm process per runtime and thread count; a changed start-up
variable gets a new server; stop_fork_servers ends them all; stop_idle_servers ends the idle ones
of other runtimes and the next session starts its server again."""

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


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.skipif(not forkserver.use_fork_server(), reason="fork servers run on Linux only")
def test_an_idle_server_stopped_for_another_runtime_is_started_again_by_the_next_session(clean_servers, tmp_path):
    import numpy as np

    from edgepack.runtimes.session import RuntimeSession

    model = _tiny_onnx(tmp_path / "relu.onnx")
    feed = [np.array([[-1.0, 2.0, -3.0, 4.0]], dtype=np.float32)]
    with RuntimeSession("onnxruntime", model, threads=1, timeout_s=120) as session:
        np.testing.assert_array_equal(session.run(feed)[0], [[0.0, 2.0, 0.0, 4.0]])
        assert forkserver.stop_idle_servers(keep="litert") == []  # a worker is running: kept
        (first,) = forkserver.fork_server_pids()
    assert forkserver.stop_idle_servers(keep="onnxruntime") == []  # the one to keep
    assert forkserver.fork_server_pids() == [first]
    stopped = forkserver.stop_idle_servers(keep="litert")
    assert [(runtime, threads) for runtime, threads, _, _ in stopped] == [("onnxruntime", 1)]
    assert forkserver.fork_server_pids() == [] and not os.path.exists(f"/proc/{first}")  # ended and reaped
    with RuntimeSession("onnxruntime", model, threads=1, timeout_s=120) as session:  # started again on demand
        np.testing.assert_array_equal(session.run(feed)[0], [[0.0, 2.0, 0.0, 4.0]])
        (second,) = forkserver.fork_server_pids()
    assert second != first
    stopped = forkserver.stop_idle_servers(keep=None)
    forkserver.start_servers(stopped)  # or ahead of the session, with the environment it had
    (third,) = forkserver.fork_server_pids()
    with RuntimeSession("onnxruntime", model, threads=1, timeout_s=120) as session:
        np.testing.assert_array_equal(session.run(feed)[0], [[0.0, 2.0, 0.0, 4.0]])
    assert forkserver.fork_server_pids() == [third] != [second]  # the session used the server started for it
