"""A fake runtime that misbehaves on purpose, for the containment tests (test_reliability.py).

The worker imports it by its dotted name (``RuntimeSession("tests.fake_runtime", path, ...)``, with
the repository on PYTHONPATH). The "artifact" is a text file naming what to do, e.g. ``segv-on-run``;
every load writes the worker's pid to ``<artifact>.pid`` so a test can check the worker is gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from edgepack.runtimes.base import TensorIO


def _misbehave(action: str) -> None:
    if action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "abort":
        os.abort()
    elif action == "hang":
        while True:
            time.sleep(60)
    elif action == "exit":
        os._exit(7)
    elif action == "raise":
        raise ValueError("the fake runtime refuses this artifact")


class FakeRunner:
    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.inputs = [TensorIO(name="x", shape=[1, 4], dtype="float32")]
        self.outputs = [TensorIO(name="y", shape=[1, 4], dtype="float32")]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        action, _, when = self.behaviour.partition("-on-")
        if when == "run":
            _misbehave(action)
        return [np.asarray(feeds[0], dtype=np.float32) * 2]

    def info(self) -> dict:
        return {"runtime": "fake", "version": "0"}


def load(path: str, threads: int) -> FakeRunner:
    Path(path + ".pid").write_text(str(os.getpid()))
    behaviour = Path(path).read_text().strip()
    action, _, when = behaviour.partition("-on-")
    if when == "load":
        _misbehave(action)
    return FakeRunner(behaviour)
