"""Analysis, layer 5: what the int8 recipe does to a model and what to do about it.

    diagnose.py     per-layer int8 error of the PT2E recipe (emulated), ranking, float groups
    qdq_profile.py  the ONNX QDQ recipe's error along the network, in onnxruntime
    charts.py       the diagnosis chart (matplotlib, imported only there)
    fallback.py     keep the worst layers in fp32, a group per step (format-agnostic callback)
"""
