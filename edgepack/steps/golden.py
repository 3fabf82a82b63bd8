"""An artifact's golden data read from a bundle, and how outputs computed elsewhere (this host, an
emulated arm64 CPU) are judged against it: steps/validate.py and steps/arm64_check.py share it.

    golden = Golden.load(root, manifest, art)            # checked: confined, checksummed by the caller, shapes
    agreement(native_outputs, golden.host, golden.out_specs)   # bit-for-bit against the build host's outputs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import ArtifactEntry, Manifest
from ..errors import BundleError
from ..intake import confined, load_golden
from ..runtimes.base import TensorIO, from_native


def recorded_masks(root: Path, manifest: Manifest, recorded: list[dict], samples: int) -> dict | None:
    """The masks the build judged outputs with (``masked_by``: a model input), read from the
    bundle's model-level golden inputs."""
    wanted = {o["name"]: o["masked_by"] for o in recorded if isinstance(o, dict) and o.get("masked_by")}
    if not wanted:
        return None
    model_inputs = load_golden(confined(root, manifest.golden.inputs),
                               {t.name: (samples, *t.shape) for t in manifest.io.inputs})
    masks = {}
    for output, source in wanted.items():
        if source not in model_inputs:
            raise BundleError(f"{root / manifest.golden.inputs}: no input {source!r} to mask {output!r} with",
                              "the bundle is inconsistent; rebuild it")
        masks[output] = (source, [model_inputs[source][i] for i in range(samples)])
    return masks


@dataclass
class Golden:
    """An artifact's golden data from the bundle, per sample."""

    in_specs: list[TensorIO]
    out_specs: list[TensorIO]
    output_names: list[str]
    feeds: list[list[np.ndarray]]  # golden/<file>.inputs.npz: what the artifact takes
    reference: list[list[np.ndarray]]  # golden/reference_outputs.npz
    host: dict[str, np.ndarray]  # golden/<file>.outputs.npz: what it returned on the build host

    @classmethod
    def load(cls, root: Path, manifest: Manifest, art: ArtifactEntry) -> "Golden":
        in_specs = [TensorIO(**t.model_dump()) for t in art.io.inputs]
        out_specs = [TensorIO(**t.model_dump()) for t in art.io.outputs]
        output_names = [t.name for t in manifest.io.outputs]
        samples = manifest.golden.samples

        def rows(specs) -> dict[str, tuple[int, ...]]:
            return {t.name: (samples, *t.shape) for t in specs}

        inputs = load_golden(confined(root, art.golden.inputs), rows(in_specs), {t.name: t.dtype for t in in_specs})
        reference = load_golden(confined(root, manifest.golden.reference_outputs), rows(manifest.io.outputs))
        host = load_golden(confined(root, art.golden.outputs), rows(out_specs), {t.name: t.dtype for t in out_specs})
        for label, data, names in ((art.golden.inputs, inputs, [t.name for t in in_specs]),
                                   (manifest.golden.reference_outputs, reference, output_names),
                                   (art.golden.outputs, host, [t.name for t in out_specs])):
            missing = [n for n in names if n not in data]
            if missing:
                raise BundleError(f"{root / label}: no array(s) {missing}", "the bundle is inconsistent; rebuild it")
        samples = len(reference[output_names[0]])
        feeds = [[np.ascontiguousarray(inputs[t.name][i]) for t in in_specs] for i in range(samples)]
        ref_rows = [[reference[n][i] for n in output_names] for i in range(samples)]
        return cls(in_specs, out_specs, output_names, feeds, ref_rows, host)

    def host_rows(self) -> list[list[np.ndarray]]:
        return [from_native([self.host[t.name][i] for t in self.out_specs], self.out_specs)
                for i in range(len(self.reference))]

    def score_outputs(self, art: ArtifactEntry) -> list[str] | None:
        """The class-score outputs the build judged top-1 on (None: decide from the shapes)."""
        recorded = art.parity.get("outputs") or []
        return ([o["name"] for o in recorded if o.get("top1_agreement") is not None]
                if len(recorded) == len(self.output_names) else None)


def agreement(native: list[list[np.ndarray]], host: dict[str, np.ndarray], specs: list[TensorIO]) -> dict:
    """Per output: identical to the build host's outputs (native units, every sample), else how far."""
    rows = []
    for index, spec in enumerate(specs):
        mine = np.stack([sample[index] for sample in native]).astype(np.float64)
        theirs = np.asarray(host[spec.name], dtype=np.float64)
        if mine.shape != theirs.shape:
            rows.append({"name": spec.name, "identical": False, "detail": f"shape {mine.shape} vs {theirs.shape}"})
            continue
        diff = np.abs(mine - theirs)
        finite = diff[np.isfinite(diff)]
        # NaN/Inf differences (a damaged artifact's outputs) are counted, never put in the JSON as NaN.
        rows.append({"name": spec.name, "identical": bool(np.array_equal(mine, theirs, equal_nan=True)),
                     "max_abs_diff": float(finite.max()) if finite.size else (None if diff.size else 0.0),
                     "non_finite_diffs": int(diff.size - finite.size),
                     "mismatched_values": int(np.count_nonzero(diff)), "values": int(diff.size)})
    return {"identical": all(r["identical"] for r in rows), "outputs": rows}
