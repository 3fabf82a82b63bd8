"""The bad-input catalogue: every way a build or a bundle check can go wrong ends in a documented
exit code and a message naming the problem, never a raw traceback, half a bundle or a stray process.

Exit codes (README): 0 ok; 1 parity/budget; 2 usage, spec, profile, bundle or output; 3 export or
runtime; 130 interrupted. Builds use tests/models/*.py-sized models and a profile with a short
latency loop. Exit codes and messages are checked through the CLI in a subprocess: a build that
needs its own process (a signal, a file-size limit, a blocked network, a race) runs
`python -m edgepack.cli`; the errors that stop early share one process (see CliBatch).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TARGETS, TEST_MODELS, leftovers, run_cli
from edgepack.bundle import commit_dir, staging_dir
from edgepack.intake import load_bundle_manifest
from edgepack.errors import RuntimeCheckError, SpecError
from edgepack.pipeline import BuildOptions, build
from edgepack.runtimes.session import RuntimeSession
from edgepack.spec import guarded_evaluate, load_spec
from edgepack.target import load_target

TWO_IO = str(TEST_MODELS / "two_io.py")
PROFILE_NAME = "rel-x86"
TAG_VAR = "EDGEPACK_RELIABILITY_TAG"  # inherited by runtime workers, so a test can find its own
QUICK = ("--no-repro-check", "--no-zip")  # builds whose subject is not packaging skip the second export


# --- shared helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast_profile(tmp_path_factory) -> Path:
    """x86-64 with one thread and the shortest latency loop the schema allows."""
    data = yaml.safe_load((TARGETS / "x86-64.yaml").read_text())
    data.update(name=PROFILE_NAME, latency={"warmup": 0, "runs": 20})
    data["device"]["threads"] = 1
    path = tmp_path_factory.mktemp("profiles") / f"{PROFILE_NAME}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def good_bundle(fast_profile, tmp_path_factory) -> Path:
    """A passing two_io bundle, built once in this process; tests copy it."""
    out = tmp_path_factory.mktemp("good")
    result = build(load_spec(TWO_IO), load_target(str(fast_profile)), str(fast_profile),
                   BuildOptions(out_dir=out, check_reproducible=False, write_zip=False))
    assert result.exit_code == 0, result.messages
    return result.bundle_dir


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _place_previous(good: Path, out: Path) -> dict[str, bytes]:
    """Put a copy of the good bundle where the next build will go; return its bytes."""
    dest = out / "two-io" / PROFILE_NAME
    shutil.copytree(good, dest)
    return _snapshot(dest)


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_whole(bundle: Path) -> None:
    """The manifest validates and every file it lists is there with its recorded sha256."""
    manifest = load_bundle_manifest(bundle)
    listed = {f.path: f.sha256 for art in manifest.artifacts for f in art.files}
    if manifest.package is not None:
        listed.update({f.path: f.sha256 for f in manifest.package.files})
        on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
        assert on_disk - {"manifest.json"} == {f.path for f in manifest.package.files}
    assert listed, "the manifest lists no files"
    for relative, digest in listed.items():
        assert _sha256(bundle / relative) == digest, relative
    golden = [manifest.golden.inputs, manifest.golden.reference_outputs]
    golden += [p for art in manifest.artifacts if art.golden for p in (art.golden.inputs, art.golden.outputs)]
    for relative in golden:
        assert (bundle / relative).is_file(), relative


def _assert_zip_whole(zip_path: Path) -> None:
    """The zip holds one bundle: every file its manifest lists, each with its recorded sha256."""
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        (manifest_name,) = [n for n in names if n.count("/") == 1 and n.endswith("/manifest.json")]
        prefix = manifest_name[: -len("manifest.json")]
        listed = {f["path"]: f["sha256"] for f in json.loads(archive.read(manifest_name))["package"]["files"]}
        assert {n[len(prefix):] for n in names} - {"manifest.json"} == set(listed)
        for path, digest in listed.items():
            assert hashlib.sha256(archive.read(prefix + path)).hexdigest() == digest, path


def _tagged_pids(tag: str, exclude: int | None = None) -> list[int]:
    """Live processes whose environment carries ``tag`` (the CLI under test and its workers)."""
    found = []
    needle = f"{TAG_VAR}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def _cli_popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgepack.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- errors that stop a build (or a bundle check) early: one CLI process runs them all ----------
#
# Each case calls edgepack.cli.main(argv), the function behind `python -m edgepack.cli`, in one
# subprocess, capturing its exit code, stdout and stderr; an exception escaping main() is recorded as
# a traceback in that case's stderr. One process instead of ~20 spares ~20 torch imports.

CLI_BATCH_DRIVER = r'''
import contextlib, io, json, sys, traceback
from edgepack.cli import main

results = {}
for case, argv in json.loads(sys.stdin.read()).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results[case] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
sys.__stdout__.write(json.dumps(results))
'''

HEADER = "import torch\nfrom torch import nn\nfrom edgepack import ModelSpec\n"
SPEC_CASES = {  # file body, words the message must contain
    "syntax-error": ("def spec(:\n    pass\n", "Python syntax error"),
    "spec-raises": ("def spec():\n    raise RuntimeError('weights not found')\n",
                    "spec() raised RuntimeError: weights not found"),
    "wrong-type": ("def spec():\n    return {'model': None}\n", "returned dict, not edgepack.ModelSpec"),
    "inputs-do-not-fit": (HEADER + textwrap.dedent("""
        def spec():
            x = (torch.randn(1, 5),)
            return ModelSpec(name="m", model=nn.Linear(4, 3), example_inputs=x, calibration=[x])
        """), "does not run on example_inputs"),
    "calibration-nan": (HEADER + textwrap.dedent("""
        def spec():
            good = (torch.randn(1, 4),)
            bad = (torch.full((1, 4), float("nan")),)
            return ModelSpec(name="m", model=nn.Linear(4, 3), example_inputs=good, calibration=[good, bad])
        """), "sample 1 input 0 has 4 NaN/Inf"),
}
PROFILE_CASES = {
    "invalid-yaml": ("name: x\ndevice: [unclosed\n", "invalid YAML"),
    "unknown-key": ((TARGETS / "x86-64.yaml").read_text() + "colour: blue\n", "colour: unknown key"),
}
DAMAGES = ("missing-manifest", "manifest-off-schema", "missing-artifact", "corrupt-artifact")


def _damage(bundle: Path, how: str) -> str:
    """Damage a copy of a good bundle; returns words the error must contain."""
    manifest_path = bundle / "manifest.json"
    if how == "missing-manifest":
        manifest_path.unlink()
        return "manifest.json: missing"
    if how == "manifest-off-schema":
        data = json.loads(manifest_path.read_text())
        data["artifacts"][0]["status"] = "probably-fine"
        manifest_path.write_text(json.dumps(data))
        return "does not match the manifest schema at artifacts/0/status"
    if how == "missing-artifact":
        (bundle / "model.onnx").unlink()
        return "model.onnx: missing"
    if how == "corrupt-artifact":
        data = bytearray((bundle / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle / "model.onnx").write_bytes(bytes(data))
        return "model.onnx: checksum mismatch"
    raise ValueError(how)


class CliBatch:
    def __init__(self, root: Path):
        self.root = root
        self.argv: dict[str, list[str]] = {}
        self.words: dict[str, str] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def add(self, case: str, *argv: str, words: str = "") -> None:
        self.argv[case], self.words[case] = list(argv), words

    def run(self) -> None:
        proc = subprocess.run([sys.executable, "-c", CLI_BATCH_DRIVER], input=json.dumps(self.argv), cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        for case, result in json.loads(proc.stdout).items():
            self.results[case] = subprocess.CompletedProcess(self.argv[case], **result)

    def __getitem__(self, case: str) -> subprocess.CompletedProcess:
        return self.results[case]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, fast_profile, good_bundle) -> CliBatch:
    batch = CliBatch(tmp_path_factory.mktemp("cli"))
    root = batch.root
    for case, (body, words) in SPEC_CASES.items():
        path = root / f"spec_{case.replace('-', '_')}.py"
        path.write_text(body)
        batch.add(f"spec:{case}", "build", str(path), "--target", "x86-64", "--out", str(root / "dist"), words=words)
    batch.add("spec:module-reference", "build", "no_such_package_xyz.models:spec", "--target", "x86-64",
              "--out", str(root / "dist"), words="cannot import module 'no_such_package_xyz.models'")
    batch.add("spec:evaluate-raises", "build", str(TEST_MODELS / "evaluate_raises.py"), "--target", str(fast_profile),
              "--out", str(root / "dist"), *QUICK)
    for case, (text, words) in PROFILE_CASES.items():
        path = root / f"profile-{case}.yaml"
        path.write_text(text)
        batch.add(f"profile:{case}", "build", TWO_IO, "--target", str(path), "--out", str(root / "dist"), words=words)
    batch.add("model:custom-op", "build", str(TEST_MODELS / "custom_op.py"), "--target", str(fast_profile),
              "--out", str(root / "dist"), *QUICK)
    # --keep-going: int4-weight quantizes MatMul/Gemm weights, and a conv-only model has none.
    profile = yaml.safe_load(fast_profile.read_text())
    profile.update(name="kg", artifacts=[{"name": "model", "format": "onnx", "precision": "fp32"},
                                         {"name": "model-int4", "format": "onnx", "precision": "int4-weight"}])
    profile["tolerances"]["int4-weight"] = {"min_cosine": 0.9}
    (root / "kg.yaml").write_text(yaml.safe_dump(profile))
    batch.add("model:keep-going", "build", str(TEST_MODELS / "conv_only.py"), "--target", str(root / "kg.yaml"),
              "--out", str(root / "dist"), "--keep-going", *QUICK)
    blocker = root / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    batch.add("output:out-under-a-file", "build", TWO_IO, "--target", str(fast_profile), "--out", str(blocker / "sub"),
              words=str(blocker))
    for command in ("inspect", "validate"):
        for how in DAMAGES:
            bundle = root / "bundles" / f"{command}-{how}"
            shutil.copytree(good_bundle, bundle)
            batch.add(f"bundle:{command}:{how}", command, str(bundle), words=_damage(bundle, how))
    batch.run()
    return batch


@pytest.mark.parametrize("case", [*sorted(SPEC_CASES), "module-reference"])
def test_cli_spec_error_exit_2(cli, case):
    proc = cli[f"spec:{case}"]
    assert proc.returncode == 2, proc.stderr
    assert "spec error" in proc.stderr and cli.words[f"spec:{case}"] in proc.stderr
    if case != "module-reference":
        assert proc.args[1] in proc.stderr  # names the spec file
    _no_traceback(proc)


def test_cli_evaluate_raising_is_a_spec_error(cli):
    proc = cli["spec:evaluate-raises"]
    spec = TEST_MODELS / "evaluate_raises.py"
    assert proc.returncode == 2, proc.stderr
    assert "spec error" in proc.stderr and "evaluate() raised ZeroDivisionError: division by zero" in proc.stderr
    assert f"at {spec}:" in proc.stderr  # the line in the user's evaluate()
    _no_traceback(proc)
    dist = cli.root / "dist" / "evaluate-raises"
    assert not (dist / PROFILE_NAME).exists() and not (dist / f"{PROFILE_NAME}.failed").exists()
    assert leftovers(cli.root / "dist") == []


def _fn(inputs):
    return (inputs[0] * 2,)


@pytest.mark.parametrize("returned, words", [
    ([0.9], "returned list, not a dict of metrics"),
    ({"top1": "high"}, "returned str for metric 'top1', not a number"),
    ({"top1": float("nan")}, "returned nan for metric 'top1'"),
])
def test_evaluate_bad_return_is_a_spec_error(returned, words):
    evaluate = guarded_evaluate(lambda fn: returned, "models/m.py")
    with pytest.raises(SpecError) as info:
        evaluate(_fn)
    assert words in info.value.message and info.value.exit_code == 2


def test_evaluate_passes_edgepack_errors_through():
    def evaluate(fn):
        raise RuntimeCheckError("onnxruntime was killed by SIGSEGV while running model.onnx")

    with pytest.raises(RuntimeCheckError, match="SIGSEGV"):
        guarded_evaluate(evaluate, "models/m.py")(_fn)
    ok = guarded_evaluate(lambda fn: {"top1": np.float32(0.5), "n": 3}, "models/m.py")
    assert ok(_fn) == {"top1": 0.5, "n": 3.0}
    assert guarded_evaluate(ok, "models/m.py") is ok


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_cli_profile_error_exit_2(cli, case):
    proc = cli[f"profile:{case}"]
    assert proc.returncode == 2, proc.stderr
    assert "profile error" in proc.stderr and cli.words[f"profile:{case}"] in proc.stderr
    assert proc.args[3] in proc.stderr  # names the profile file
    _no_traceback(proc)


def test_unexpressible_op_is_export_error_exit_3(cli):
    proc = cli["model:custom-op"]
    assert proc.returncode == 3, proc.stderr
    assert "export error" in proc.stderr
    assert "onnx" in proc.stderr and "torch.onnx.export" in proc.stderr  # the format and the step
    assert "edgepack_test.wobble" in proc.stderr  # the op
    _no_traceback(proc)
    assert not (cli.root / "dist" / "custom-op" / PROFILE_NAME).exists()
    assert leftovers(cli.root / "dist") == []


def test_unexpressible_op_message_is_plain_text(cli):
    assert "\x1b" not in cli["model:custom-op"].stderr


def test_unexpressible_op_message_names_the_reference_export(cli):
    stderr = cli["model:custom-op"].stderr
    assert "reference" in stderr and "drop the onnx artifact" not in stderr


def test_out_under_a_regular_file_exit_2(cli):
    proc = cli["output:out-under-a-file"]
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the bundle there" in proc.stderr and "Not a directory" in proc.stderr
    assert cli.words["output:out-under-a-file"] in proc.stderr
    _no_traceback(proc)


@pytest.mark.parametrize("command", ["inspect", "validate"])
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_bundle_is_a_bundle_error(cli, command, how):
    case = f"bundle:{command}:{how}"
    proc = cli[case]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bundle error" in proc.stderr and cli.words[case] in proc.stderr
    _no_traceback(proc)


# --- builds that fail part-way -----------------------------------------------------------------

def test_keep_going_builds_the_rest_and_reports_the_failure(cli):
    proc = cli["model:keep-going"]
    assert proc.returncode == 3, proc.stderr
    assert "model-int4.onnx" in proc.stderr and "quantizer changed nothing" in proc.stderr
    _no_traceback(proc)
    out = cli.root / "dist" / "conv-only"
    assert not (out / "kg").exists()  # a failed build never takes the good bundle's place
    manifest = load_bundle_manifest(out / "kg.failed")
    assert manifest.status == "failed"
    by_name = {a.name: a for a in manifest.artifacts}
    assert by_name["model"].status == "ok" and by_name["model"].parity["passed"]
    assert _sha256(out / "kg.failed" / "model.onnx") == by_name["model"].sha256
    failed = by_name["model-int4"]
    assert failed.status == "failed" and failed.files == []
    assert "int4-weight" in failed.error and "no MatMul/Gemm" in failed.error
    assert any("model-int4.onnx" in f for f in manifest.failures)
    assert not (out / "kg.failed" / "model-int4.onnx").exists()
    assert leftovers(cli.root / "dist") == []


FSIZE_LIMIT = 24_000  # bytes: the float reference (~12 kB) fits, golden/inputs.npz (~42 kB) does not


def _limit_file_size():
    # A write past RLIMIT_FSIZE fails with EFBIG, as a full disk fails with ENOSPC. SIGXFSZ would kill the
    # process instead; ignored (Python ignores it too; this does not rely on that), the write returns the error.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


@pytest.fixture(scope="module")
def disk_full_build(good_bundle, fast_profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("disk-full")
    before = _place_previous(good_bundle, out)
    proc = subprocess.run([sys.executable, "-m", "edgepack.cli", "build", TWO_IO, "--target", str(fast_profile),
                           "--out", str(out), *QUICK], cwd=REPO, capture_output=True, text=True, timeout=900,
                          preexec_fn=_limit_file_size)
    return proc, out, before


def test_disk_full_during_write_exit_2(disk_full_build):
    proc, out, before = disk_full_build
    assert proc.returncode == 2, proc.stderr
    assert "output error" in proc.stderr and "file too large" in proc.stderr.lower()
    _no_traceback(proc)
    assert _snapshot(out / "two-io" / PROFILE_NAME) == before  # the previous bundle is untouched
    assert not (out / "two-io" / f"{PROFILE_NAME}.failed").exists()
    assert leftovers(out) == []


def test_disk_full_message_names_where(disk_full_build):
    proc, out, _ = disk_full_build
    assert "output error: :" not in proc.stderr and str(out) in proc.stderr


@pytest.mark.parametrize("signum, moment", [(signal.SIGINT, "staging"), (signal.SIGTERM, "worker")],
                         ids=["SIGINT-while-exporting", "SIGTERM-while-a-runtime-runs"])
def test_interrupted_build_exit_130(tmp_path, good_bundle, fast_profile, signum, moment):
    out = tmp_path / "dist"
    before = _place_previous(good_bundle, out)
    tag = uuid.uuid4().hex
    proc = _cli_popen("build", TWO_IO, "--target", str(fast_profile), "--out", str(out), "--quiet", *QUICK,
                      env={TAG_VAR: tag})
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the build ended (exit {proc.returncode}) before it was interrupted:\n{proc.stderr.read()}")
            staged = list((out / "two-io").glob(f".{PROFILE_NAME}.tmp-*"))
            if staged and (moment == "staging" or _tagged_pids(tag, exclude=proc.pid)):
                break
            assert time.monotonic() < deadline, "no staging dir / runtime worker appeared"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert _snapshot(out / "two-io" / PROFILE_NAME) == before
    assert not (out / "two-io" / f"{PROFILE_NAME}.failed").exists()
    assert leftovers(out) == []
    assert _tagged_pids(tag) == [], "runtime worker(s) outlived the interrupted build"


# --- containment: a runtime that crashes or hangs ---------------------------------------------

FAKE_RUNTIME = "tests.fake_runtime"
FEED = [np.arange(4, dtype=np.float32).reshape(1, 4)]


@pytest.fixture
def fake_artifact(tmp_path, monkeypatch):
    """Write an 'artifact' telling tests/fake_runtime.py how to misbehave; the worker imports it by name."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def make(behaviour: str) -> Path:
        path = tmp_path / f"{behaviour}.fake"
        path.write_text(behaviour)
        return path

    return make


def _gone(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


def _crash(path: Path) -> RuntimeCheckError:
    with pytest.raises(RuntimeCheckError) as info:
        with RuntimeSession(FAKE_RUNTIME, path, threads=1, timeout_s=120) as session:
            session.run(FEED)
    assert info.value.exit_code == 3
    assert _gone(Path(f"{path}.pid")), "the worker outlived its failure"
    return info.value


def test_runtime_segfault_is_contained_and_edgepack_carries_on(fake_artifact):
    error = _crash(fake_artifact("segv-on-run"))
    assert "was killed by SIGSEGV while running segv-on-run.fake" in error.message
    with RuntimeSession(FAKE_RUNTIME, fake_artifact("ok"), threads=1, timeout_s=120) as session:
        np.testing.assert_array_equal(session.run(FEED)[0], FEED[0] * 2)


@pytest.mark.parametrize("behaviour, words", [
    ("abort-on-run", "was killed by SIGABRT while running abort-on-run.fake"),
    ("raise-on-load", "failed while loading raise-on-load.fake: ValueError: the fake runtime refuses"),
])
def test_runtime_failure_is_contained(fake_artifact, behaviour, words):
    assert words in _crash(fake_artifact(behaviour)).message


def test_runtime_hang_is_killed_after_the_timeout(fake_artifact):
    path = fake_artifact("hang-on-run")
    with RuntimeSession(FAKE_RUNTIME, path, threads=1, timeout_s=120) as session:
        session.timeout_s = 0.5  # the load above may take seconds on a busy host; the run may not
        started = time.monotonic()
        with pytest.raises(RuntimeCheckError) as info:
            session.run(FEED)
        assert time.monotonic() - started < 30
    message = info.value.message
    assert "did not answer within 0.5 s while running hang-on-run.fake" in message and "SIGKILL" in message
    assert _gone(Path(f"{path}.pid"))


# --- concurrency and security: two builds at once, offline ----------------------------------------

def test_commit_when_another_build_lands_first(tmp_path, monkeypatch):
    dest = tmp_path / "two-io" / PROFILE_NAME
    first, second = staging_dir(dest), staging_dir(dest)
    (first / "manifest.json").write_text("first")
    (second / "manifest.json").write_text("second")
    commit_dir(first, dest)
    # The second build checked dest.exists() just before the first one's rename.
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **kw: False if self == dest else real_exists(self, **kw))
    commit_dir(second, dest)
    assert (dest / "manifest.json").read_text() == "second"
    assert leftovers(tmp_path) == []


SITECUSTOMIZE = '''
"""Test harness: refuse every network connection and name lookup, and log who tried."""
import errno
import os
import socket

_LOG = os.environ["EDGEPACK_NET_LOG"]


def _note(line):
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {line}\\n")


def _refuse(what):
    _note("blocked " + what)
    raise OSError(errno.ENETUNREACH, "network access blocked by the edgepack test: " + what)


def _guard(method):
    real = getattr(socket.socket, method)

    def guarded(self, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(f"{method} {args[-1]!r}")  # the address is the last argument of all three
        return real(self, *args)
    return guarded


for _method in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, _method, _guard(_method))
socket.getaddrinfo = lambda host, *a, **k: _refuse(f"getaddrinfo {host!r}")
socket.gethostbyname = lambda host: _refuse(f"gethostbyname {host!r}")
_note("armed")
'''


@pytest.fixture(scope="module")
def offline_builds(fast_profile, tmp_path_factory):
    """Two builds of the same model and target at the same time, with the network blocked."""
    root = tmp_path_factory.mktemp("offline")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = root / "network.log"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(root / "site"), os.environ.get("PYTHONPATH")])),
           "EDGEPACK_NET_LOG": str(log)}
    procs = [_cli_popen("build", TWO_IO, "--target", str(fast_profile), "--out", str(root / "dist"), "--quiet", env=env)
             for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results, log, root / "dist"


def test_two_builds_of_the_same_bundle_at_once(offline_builds):
    results, _, dist = offline_builds
    for proc in results:
        assert proc.returncode == 0, proc.stderr
        _no_traceback(proc)
    _assert_whole(dist / "two-io" / PROFILE_NAME)
    _assert_zip_whole(dist / f"two-io-{PROFILE_NAME}.zip")
    assert not (dist / "two-io" / f"{PROFILE_NAME}.failed").exists()
    assert leftovers(dist) == []


def test_build_makes_no_network_requests(offline_builds):
    results, log, dist = offline_builds
    lines = log.read_text().splitlines()
    armed = {line.split()[0] for line in lines if line.endswith(" armed")}
    assert len(armed) >= 4, f"the block did not reach both CLIs and their runtime workers: {lines}"
    assert [line for line in lines if " blocked " in line] == []
    assert all(proc.returncode == 0 for proc in results), [proc.stderr for proc in results]


PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt"}


def _is_pickle(data: bytes) -> bool:
    return len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5  # PROTO opcode, protocol 2..5


def test_bundle_contains_no_pickles(offline_builds):
    _, _, dist = offline_builds
    bundle = dist / "two-io" / PROFILE_NAME
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in PICKLE_SUFFIXES, path
        data = path.read_bytes()
        assert not _is_pickle(data), path
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for name in archive.namelist():
                    assert Path(name).suffix not in PICKLE_SUFFIXES, (path, name)
                    assert not _is_pickle(archive.read(name)), (path, name)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:  # raises on an object array
                for key in arrays.files:
                    assert not arrays[key].dtype.hasobject, (path, key)


# --- values checked up front, and what a failed build leaves ---------------------------------

@pytest.mark.parametrize("args, words", [
    (["validate", "dist", "--timeout", "-1"], "--timeout"), (["validate", "dist", "--timeout", "0"], "--timeout"),
    (["validate", "dist", "--timeout", "nan"], "--timeout"), (["validate", "dist", "--threads", "-5"], "--threads"),
    (["validate", "dist", "--threads", "1e9"], "--threads"), (["diagnose", "m.py", "-t", "x86-64", "--top", "0"], "--top"),
])
def test_cli_values_are_checked_before_anything_runs(args, words):
    proc = run_cli(*args)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    _no_traceback(proc)


def test_a_build_failing_at_commit_replaces_neither_the_bundle_nor_the_zip(good_bundle, fast_profile, tmp_path):
    """The zip is made beside its destination and put in place only after the directory: a build
    that fails in between leaves the previous zip and bundle as they were."""
    out = tmp_path / "dist"
    first = build(load_spec(TWO_IO), load_target(str(fast_profile)), str(fast_profile),
                  BuildOptions(out_dir=out, check_reproducible=False))
    zip_bytes = first.zip_path.read_bytes()
    bundle_before = _snapshot(first.bundle_dir)

    def fail_at_commit(step: str) -> None:
        if step == "commit":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        build(load_spec(TWO_IO), load_target(str(fast_profile)), str(fast_profile),
              BuildOptions(out_dir=out, check_reproducible=False, step_hook=fail_at_commit))
    assert first.zip_path.read_bytes() == zip_bytes and _snapshot(first.bundle_dir) == bundle_before
    assert leftovers(out) == [] and not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_failed_build_leaves_no_empty_model_folder(fast_profile, tmp_path):
    out = tmp_path / "dist"

    def fail_early(step: str) -> None:
        if step == "reference":
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        build(load_spec(TWO_IO), load_target(str(fast_profile)), str(fast_profile),
              BuildOptions(out_dir=out, step_hook=fail_early))
    assert not (out / "two-io").exists()


def test_validate_on_a_failed_bundle_says_the_build_failed(fast_profile, tmp_path):
    """A bundle whose build exceeded a budget: validate re-checks parity (passes) but exits 1
    and says what the build recorded, instead of 'passed'."""
    profile = yaml.safe_load(fast_profile.read_text())
    profile["budgets"] = {"max_bytes": 100}
    path = tmp_path / "tiny-budget.yaml"
    path.write_text(yaml.safe_dump(profile))
    result = build(load_spec(TWO_IO), load_target(str(path)), str(path),
                   BuildOptions(out_dir=tmp_path / "dist", check_reproducible=False, write_zip=False))
    assert result.exit_code == 1 and result.bundle_dir.name.endswith(".failed")
    proc = run_cli("validate", str(result.bundle_dir))
    assert proc.returncode == 1 and "this bundle's build failed" in proc.stderr and "max_bytes 100" in proc.stderr
    assert "passed:" not in proc.stderr


def test_scratch_full_is_reported_as_scratch_not_as_out(tmp_path, monkeypatch):
    """ENOSPC on another filesystem than --out, with less room there: the message names the
    scratch directory and TMPDIR."""
    import errno

    from edgepack import package

    scratch = Path("/dev/shm") / f"edgepack-test-{os.getpid()}"
    scratch.mkdir()
    try:
        if os.stat(scratch).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the test's tmp dir here")
        usage = {str(scratch): 0, str(tmp_path): 10**12}
        monkeypatch.setattr(package.shutil, "disk_usage",
                            lambda p: type("U", (), {"free": usage[str(p)]})())
        error = package.scratch_full(OSError(errno.ENOSPC, "No space left on device"), scratch, tmp_path)
        assert error is not None and "scratch" in error.message and "TMPDIR" in error.hint
        assert package.scratch_full(OSError(errno.EACCES, "denied"), scratch, tmp_path) is None
    finally:
        scratch.rmdir()


def test_a_signal_during_a_build_is_recorded_and_raised_at_the_next_step():
    """The build's handler never raises where the signal lands (inside a native import, say, which
    once turned it into std::terminate): it records it, check_interrupted raises at the next step
    boundary, and a second signal stops at once."""
    code = textwrap.dedent("""
        import os, signal
        from edgepack import cli, errors
        signal.signal(signal.SIGTERM, cli._on_signal)
        os.kill(os.getpid(), signal.SIGTERM)   # lands here: recorded, nothing raised
        import onnx                            # a native import goes on undisturbed
        try:
            errors.check_interrupted()
        except KeyboardInterrupt as exc:
            print("raised at the step:", exc)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            print("second signal: stopped at once")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "raised at the step: signal 15" in proc.stdout and "second signal: stopped at once" in proc.stdout
    assert "stopping at the next step" in proc.stderr
