"""The int8 recipe, layer 2 (below the stages and exporters that use it).

    recipe.py           the recipe: one options block shared by the .pte/.tflite configs, the
                        only config -> Recipe mapping, the manifest record, the float_layers check
    observers.py        activation observers (MSE, percentile; torchao's for the rest)
    quantizers.py       XNNPACKQuantizer / litert-torch PT2EQuantizer with clamp fusion and fp32 layers
    calibrate.py        capture, calibrate, convert (post-training int8)
    bias_correction.py  empirical bias correction of a calibrated graph
    emulate.py          observers swapped for int8-or-identity switches (diagnosis, bias correction)
    weight_only.py      weight-only recipes: int8/int4 embedding tables, int4 grouped linears
    gptq.py             4-bit grouped Linear codes by GPTQ (or round-to-nearest)
    mixed.py            which Linears stay int8 among int4 ones (mixed_int8), chosen by emulation
    int4.py             the int4-weight weights: GPTQ then mixed_int8, shared within a build
    qat_graph.py        the QAT stage's converted graph, as the ExecuTorch exporter receives it
    graph.py            op names and module attributes of captured graphs (shared helpers)

Stages (compress/*) and exporters (export/*) meet here and never import each other. Heavy
toolchains (torchao, executorch, litert-torch) are imported inside the functions.
"""
