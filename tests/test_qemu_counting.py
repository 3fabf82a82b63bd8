"""Counting executed aarch64 instructions: the plugin-enabled qemu built from Debian's source on
explicit request (slow the first time: minutes), and counts that repeat to the instruction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepack.emulators import arm64_python, qemu, qemu_counting
from edgepack.emulators.debian import ToolMissing
from edgepack.provenance import toolchain_versions


def test_nothing_is_built_until_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    assert qemu_counting.ready() is None
    assert not (tmp_path / "arm64" / "counting").exists()


def test_missing_build_tools_are_named_with_the_package_to_install(monkeypatch):
    monkeypatch.setattr(qemu_counting, "ready", lambda: None)
    real = qemu_counting.shutil.which
    monkeypatch.setattr(qemu_counting.shutil, "which", lambda name: None if name == "ninja" else real(name))
    with pytest.raises(ToolMissing, match="needs ninja") as info:
        qemu_counting.ensure()
    assert info.value.hint == "apt-get install ninja-build"


def _matmul_onnx(path, size: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((size, size)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.slow
def test_two_counts_agree_and_the_window_difference_is_the_inferences(tmp_path):
    """guest_count.py under the plugin: N, N again and 2N inferences of a 256x256 fp32 MatMul in
    onnxruntime on cortex-a76, counted in the guest's window (main thread, timed inferences only).
    The run totals move by ~100k instructions (onnxruntime starts a helper thread at import); the
    windows agree within a few instructions, and FMLA per inference is the MACs over 4 lanes."""
    counter = qemu_counting.ensure()  # first use: builds qemu (minutes)
    runtimes = ("litert", "onnxruntime")
    guest = arm64_python.ensure(arm64_python.runtime_pins(toolchain_versions(), runtimes), runtimes)
    model, inputs = tmp_path / "mm.onnx", tmp_path / "inputs.npz"
    _matmul_onnx(model, 256)
    np.savez(inputs, x=np.ones((1, 1, 256), dtype=np.float32))
    script = qemu_counting.Path(qemu_counting.__file__).with_name("guest_count.py")
    windows = []
    for times in (4, 4, 8):
        out = tmp_path / f"count-{len(windows)}.json"
        command = guest.command("cortex-a76", [str(script), "onnxruntime", str(model), str(inputs), f"{times:06d}"],
                                deterministic=True, extra=counter.command_extra(out), binary=counter.binary)
        done = qemu.run(command, env=guest.environment(OMP_NUM_THREADS="1"), timeout_s=600, what="counting")
        assert done.returncode == 0 and done.stdout.strip() == f"ran {times}", done.stderr[-1500:]
        counts = json.loads(out.read_text())
        assert counts["per_vcpu"][0] > counts["window"]["total"] > 0 and counts["window"]["vcpu"] == 0
        windows.append(counts["window"])
    assert abs(windows[0]["total"] - windows[1]["total"]) <= 1e-3 * windows[0]["total"]
    assert windows[0]["fmla_elem"] == windows[1]["fmla_elem"]  # the kernel's own instructions: exact
    per_inference = (windows[2]["total"] - windows[0]["total"]) / 4
    fmla = (windows[2]["fmla_elem"] + windows[2]["fmla_vec"] - windows[0]["fmla_elem"] - windows[0]["fmla_vec"]) / 4
    assert fmla == 256 * 256 / 4  # 4 fp32 MACs per FMLA
    assert fmla < per_inference < 10 * fmla
    assert counter.describe()["flags"] == "-seed 1 -R 0x400000000000"
