"""Run one artifact N times on one input, nothing else: the guest program whose executed aarch64
instructions qemu's plugin counts (steps/arm64_check.py). Stdlib + numpy + the runtime; edgepack
runs it with the arm64 sysroot's python3.11 under the plugin-enabled qemu-aarch64, never imports it.

    python3.11 guest_count.py RUNTIME MODEL INPUTS.npz N

RUNTIME is litert, onnxruntime or executorch; INPUTS.npz holds one array per model input (rows =
samples, in the model's input order) and row 0 is fed. N must be written with a fixed width
(e.g. 000004): the guest's stack, and so the count, depends on the length of its arguments.
One thread, so the count does not depend on how work is split between threads. After WARM_UP
runs it marks a counting window (a syscall only the insnclass plugin looks at) around the N
timed ones, so imports, loading and a runtime's helper threads stay out of the figure.
"""

import sys

import numpy as np


def main(argv):
    runtime, path, inputs, count = argv[1], argv[2], argv[3], int(argv[4])
    with np.load(inputs, allow_pickle=False) as data:
        feeds = [np.ascontiguousarray(data[name][0]) for name in data.files]
    if runtime == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=1)
        interpreter.allocate_tensors()
        for detail, value in zip(interpreter.get_input_details(), feeds):
            interpreter.set_tensor(detail["index"], value.astype(detail["dtype"]).reshape(detail["shape"]))
        run = interpreter.invoke
    elif runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        named = {i.name: v for i, v in zip(session.get_inputs(), feeds)}

        def run():
            session.run(None, named)
    elif runtime == "executorch":
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        try:
            import executorch.kernels.quantized  # noqa: F401  (int8 embedding tables)
        except (ImportError, OSError):
            pass
        portable_lib._unsafe_reset_threadpool(1)
        method = Runtime.get().load_program(path).load_method("forward")
        tensors = [torch.from_numpy(value) for value in feeds]

        def run():
            method.execute(tensors)
    else:
        raise SystemExit(f"unknown runtime {runtime!r}")
    for _ in range(WARM_UP):  # the first runs pack weights and plan memory: not what an inference costs
        run()
    mark(1)
    for _ in range(count):
        run()
    mark(2)
    print(f"ran {count}")


WARM_UP = 2
MARK_SYSCALL, MARK_MAGIC = 4095, 0x45444745  # insnclass.c's counting window (ENOSYS for everyone else)


def mark(what):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(ctypes.c_long(MARK_SYSCALL), ctypes.c_long(MARK_MAGIC), ctypes.c_long(what))


if __name__ == "__main__":
    main(sys.argv)
