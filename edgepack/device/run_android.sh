#!/usr/bin/env bash
# Run an edgepack bundle on an Android device over adb; write device_report.json on this host.
#
#   device/run_android.sh [BUNDLE_DIR]        (default: the bundle this script sits in)
#   edgepack ingest BUNDLE_DIR device_report.json
#
# What it does:
#   1. pushes the bundle to $DEVICE_ROOT/<model>-<target> (default /data/local/tmp/edgepack/...),
#   2. .tflite: runs TFLite's benchmark_model (--graph, --num_threads, --use_xnnpack) if present,
#   3. .pte:    runs ExecuTorch's xnn_executor_runner / executor_runner if present, fed with the
#               first golden input (raw tensors written by this script),
#   4. if a Python with numpy and a runtime is on the device (Termux: DEVICE_PYTHON=...), runs
#      device/validate.py there too, which checks checksums and parity against the golden outputs,
#   5. pulls the outputs and assembles device_report.json (latency source: device).
# The native tools measure latency only; parity on the device needs step 4.
#
# Environment (all optional):
#   ADB              adb binary (default: adb); ANDROID_SERIAL picks the device as usual
#   DEVICE_ROOT      where bundles go on the device (default: /data/local/tmp/edgepack)
#   BENCHMARK_MODEL  TFLite benchmark_model on the device (default: /data/local/tmp/benchmark_model)
#   EXECUTOR_RUNNER  ExecuTorch runner on the device (default: the first of
#                    /data/local/tmp/xnn_executor_runner, /data/local/tmp/executor_runner)
#   DEVICE_PYTHON    python on the device for device/validate.py (default: python3 or python on
#                    the device PATH, if any)
#   THREADS RUNS WARMUP   default: the profile's device.threads, latency.runs, latency.warmup
#   USE_XNNPACK      true|false for benchmark_model (default: true)
#   REPORT           output path (default: device_report.json in the current directory)
#   HOST_PYTHON      python3 on this host, standard library only (default: python3)
#
# Exit codes: 0 measured (and parity passed where checked); 1 parity failed on the device;
#             2 setup error (no adb/device/bundle, nothing could run); 3 a tool failed on the device.
set -euo pipefail

die() {
  echo "error: $1" >&2
  [ -n "${2:-}" ] && echo "  hint: $2" >&2
  exit 2
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUNDLE=$(cd "${1:-$SCRIPT_DIR/..}" 2>/dev/null && pwd) || die "bundle directory ${1:-} not found" "pass dist/<model>/<target>"
[ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE/manifest.json missing" "pass an edgepack bundle directory"

ADB=${ADB:-adb}
HOST_PYTHON=${HOST_PYTHON:-python3}
DEVICE_ROOT=${DEVICE_ROOT:-/data/local/tmp/edgepack}
BENCHMARK_MODEL=${BENCHMARK_MODEL:-/data/local/tmp/benchmark_model}
USE_XNNPACK=${USE_XNNPACK:-true}
REPORT=${REPORT:-device_report.json}

command -v "$ADB" >/dev/null 2>&1 || die "adb not found (ADB=$ADB)" "install Android platform-tools or set ADB"
command -v "$HOST_PYTHON" >/dev/null 2>&1 || die "$HOST_PYTHON not found" "set HOST_PYTHON to a python3"
state=$("$ADB" get-state 2>/dev/null || true)
[ "$state" = "device" ] || die "no device ready (adb get-state: ${state:-none})" "connect a device, enable USB debugging, or set ANDROID_SERIAL"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgepack-android.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Bundle facts from the manifest: NAME, THREADS, RUNS, WARMUP, then one "file<TAB>format" per artifact.
# The manifest is untrusted: every value that becomes a path or a word of a remote command must be a
# plain name (letters, digits, . _ -) or a bounded integer, or the script stops here.
"$HOST_PYTHON" - "$BUNDLE" >"$WORK/plan.txt" <<'PY' || die "the manifest names something this script will not pass to the device" "rebuild the bundle with edgepack"
import json, re, sys
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
def refuse(what, value):
    sys.exit(f"error: {what} {value!r} is not a plain name")
def count(value, low, high, what):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        sys.exit(f"error: {what} {value!r} is not a whole number in [{low}, {high}]")
    return value
m = json.load(open(sys.argv[1] + "/manifest.json"))
p = m["target"].get("profile") or {}
name = f"{m['model']['name']}-{m['target']['name']}"
if not SAFE.fullmatch(name):
    refuse("bundle name", name)
print(name)
print(count((p.get("device") or {}).get("threads", 1), 1, 1024, "device.threads"))
print(count((p.get("latency") or {}).get("runs", 30), 1, 10_000_000, "latency.runs"))
print(count((p.get("latency") or {}).get("warmup", 5), 0, 10_000_000, "latency.warmup"))
for a in m["artifacts"]:
    if a.get("file") and a.get("files"):
        if not SAFE.fullmatch(str(a["file"])) or a.get("format") not in ("tflite", "pte", "onnx"):
            refuse("artifact file", a["file"])
        print(f"{a['file']}\t{a['format']}")
PY
NAME=$(sed -n 1p "$WORK/plan.txt")
THREADS=${THREADS:-$(sed -n 2p "$WORK/plan.txt")}
RUNS=${RUNS:-$(sed -n 3p "$WORK/plan.txt")}
WARMUP=${WARMUP:-$(sed -n 4p "$WORK/plan.txt")}
for value in "$THREADS" "$RUNS" "$WARMUP"; do
  case "$value" in ''|*[!0-9]*) die "THREADS, RUNS and WARMUP must be whole numbers (got '$value')" "unset them or pass digits";; esac
done
case "$USE_XNNPACK" in true|false) ;; *) die "USE_XNNPACK must be true or false" "unset it or pass true/false";; esac
REMOTE="$DEVICE_ROOT/$NAME"
LOGS="$WORK/logs"
mkdir -p "$LOGS"

# stdin from /dev/null: adb shell would otherwise swallow the artifact list the loop below reads.
dev() { "$ADB" shell "$@" </dev/null; }
# One word for the device's shell: single-quoted, with any ' inside closed, escaped and reopened.
q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
dev_has() { dev "[ -x $(q "$1") ]" >/dev/null 2>&1; }

echo "pushing $BUNDLE to $REMOTE" >&2
dev "rm -rf $(q "$REMOTE") && mkdir -p $(q "$REMOTE")"
"$ADB" push "$BUNDLE/." "$REMOTE/" >/dev/null

# Device description (getprop), one key=value per line.
for prop in ro.product.manufacturer ro.product.model ro.build.version.release ro.soc.model ro.product.cpu.abi; do
  printf '%s=%s\n' "$prop" "$(dev getprop "$prop" 2>/dev/null | tr -d '\r')"
done >"$LOGS/getprop.txt"
dev uname -m 2>/dev/null | tr -d '\r' >"$LOGS/uname.txt" || true

runner=${EXECUTOR_RUNNER:-}
if [ -z "$runner" ]; then
  for candidate in /data/local/tmp/xnn_executor_runner /data/local/tmp/executor_runner; do
    if dev_has "$candidate"; then runner=$candidate; break; fi
  done
fi

tool_failed=0
while IFS=$'\t' read -r file format; do
  case "$format" in
    tflite)
      if dev_has "$BENCHMARK_MODEL"; then
        echo "benchmark_model: $file ($THREADS threads, xnnpack $USE_XNNPACK, $WARMUP warmup + $RUNS runs)" >&2
        if ! dev "$(q "$BENCHMARK_MODEL") $(q "--graph=$REMOTE/$file") --num_threads=$THREADS \
              --use_xnnpack=$USE_XNNPACK --warmup_runs=$WARMUP --num_runs=$RUNS" >"$LOGS/$file.benchmark_model.log" 2>&1; then
          echo "  benchmark_model failed; log kept in the report" >&2
          tool_failed=1
        fi
      else
        echo "skip $file: no benchmark_model at $BENCHMARK_MODEL (set BENCHMARK_MODEL)" >&2
      fi
      ;;
    pte)
      if [ -n "$runner" ] && dev_has "$runner"; then
        # Raw little-endian tensors of the first golden sample, in input order.
        inputs=$("$HOST_PYTHON" - "$BUNDLE" "$file" "$WORK/inputs-$file" <<'PY'
import ast, io, json, os, sys, zipfile
bundle, file, out = sys.argv[1:4]
m = json.load(open(os.path.join(bundle, "manifest.json")))
art = next(a for a in m["artifacts"] if a.get("file") == file)
os.makedirs(out, exist_ok=True)
paths = []
with zipfile.ZipFile(os.path.join(bundle, art["golden"]["inputs"])) as npz:
    for i, spec in enumerate(art["io"]["inputs"]):
        data = npz.read(spec["name"] + ".npy")
        major = data[6]
        hlen = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
        start = (10 if major == 1 else 12) + hlen
        header = ast.literal_eval(data[(10 if major == 1 else 12):start].decode("latin1"))
        if header["fortran_order"] or header["descr"][0] == ">":
            sys.exit(f"{spec['name']}: unexpected array layout {header}")
        row = (len(data) - start) // max(1, header["shape"][0])
        path = os.path.join(out, f"input_{i}.bin")
        open(path, "wb").write(data[start:start + row])
        paths.append(path)
print(" ".join(paths))
PY
)
        remote_inputs=""
        for path in $inputs; do
          "$ADB" push "$path" "$REMOTE/$(basename "$path")" >/dev/null
          remote_inputs="${remote_inputs:+$remote_inputs,}$REMOTE/$(basename "$path")"
        done
        total=$((WARMUP + RUNS))
        echo "$(basename "$runner"): $file ($THREADS threads, $total executions, first $WARMUP not counted when per-run times are printed)" >&2
        if ! dev "$(q "$runner") $(q "--model_path=$REMOTE/$file") $(q "--inputs=$remote_inputs") \
              --num_executions=$total --cpu_threads=$THREADS" >"$LOGS/$file.executor_runner.log" 2>&1; then
          echo "  $(basename "$runner") failed; log kept in the report" >&2
          tool_failed=1
        fi
        echo "$runner" >"$LOGS/$file.executor_runner.tool"
      else
        echo "skip $file: no executor_runner on the device (set EXECUTOR_RUNNER)" >&2
      fi
      ;;
    *)
      echo "skip $file: no native $format benchmark tool in this script (device/validate.py covers it)" >&2
      ;;
  esac
done < <(tail -n +5 "$WORK/plan.txt")

python_on_device=${DEVICE_PYTHON:-}
if [ -z "$python_on_device" ]; then
  python_on_device=$(dev "command -v python3 || command -v python" 2>/dev/null | tr -d '\r' | head -n 1 || true)
fi
if [ -n "$python_on_device" ]; then
  echo "device/validate.py with $python_on_device" >&2
  set +e
  dev "cd $(q "$REMOTE") && $(q "$python_on_device") device/validate.py --threads $THREADS --runs $RUNS \
       --warmup $WARMUP --report $(q "$REMOTE/device_report.validate.json")" >"$LOGS/validate.log" 2>&1
  echo $? >"$LOGS/validate.rc"
  set -e
  "$ADB" pull "$REMOTE/device_report.validate.json" "$LOGS/device_report.validate.json" >/dev/null 2>&1 || true
else
  echo "no python on the device: parity not checked there (set DEVICE_PYTHON, e.g. Termux's python)" >&2
fi

"$HOST_PYTHON" - "$BUNDLE" "$LOGS" "$REPORT" "$THREADS" "$RUNS" "$WARMUP" "$tool_failed" <<'PY'
import datetime, json, os, re, sys

bundle, logs, report_path, threads, runs, warmup, tool_failed = sys.argv[1:8]
threads, runs, warmup, tool_failed = int(threads), int(runs), int(warmup), int(tool_failed)
manifest = json.load(open(os.path.join(bundle, "manifest.json")))


def read(name):
    path = os.path.join(logs, name)
    return open(path, errors="replace").read() if os.path.exists(path) else None


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(times):
    return {"runs": len(times), "p50_ms": round(percentile(times, 50), 4), "p90_ms": round(percentile(times, 90), 4),
            "min_ms": round(min(times), 4), "mean_ms": round(sum(times) / len(times), 4)}


def benchmark_model(text):
    # Last "count=N first=.. curr=.. min=.. max=.. avg=.. std=.. [p5=.. median=.. p95=..]" line, in us.
    lines = [l for l in text.splitlines() if re.search(r"count=\d+ first=", l)]
    if not lines:
        return None
    fields = dict(re.findall(r"(\w+)=([0-9.e+-]+)", lines[-1]))
    us = lambda key: round(float(fields[key]) / 1000.0, 4) if key in fields else None
    return {"runs": int(float(fields["count"])), "p50_ms": us("median"), "p90_ms": None, "min_ms": us("min"),
            "mean_ms": us("avg")}


def executor_runner(text):
    per_run = [float(x) for x in re.findall(r"Iteration \d+ of \d+: ([0-9.]+) ms", text)]
    if len(per_run) > warmup:
        return summary(per_run[warmup:])
    match = re.search(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms", text)
    if not match:
        return None
    count, total = int(match.group(1)), float(match.group(2))
    return {"runs": count, "p50_ms": None, "p90_ms": None, "min_ms": None, "mean_ms": round(total / count, 4),
            "note": "mean over all executions including warmup: this runner prints no per-run times"}


props = dict(l.split("=", 1) for l in (read("getprop.txt") or "").splitlines() if "=" in l)
device = {"manufacturer": props.get("ro.product.manufacturer"), "model": props.get("ro.product.model"),
          "android_release": props.get("ro.build.version.release"), "soc": props.get("ro.soc.model"),
          "abi": props.get("ro.product.cpu.abi"), "machine": (read("uname.txt") or "").strip() or None}
device = {k: v for k, v in device.items() if v}
device["label"] = " ".join(v for v in (device.get("manufacturer"), device.get("model")) if v) or "android device"

validated = {}
validate_report = read("device_report.validate.json")
if validate_report:
    data = json.loads(validate_report)
    validated = {a["file"]: a for a in data.get("artifacts", [])}
    device["python"] = (data.get("device") or {}).get("python")

artifacts, exit_code = [], 0
for art in manifest["artifacts"]:
    if not (art.get("file") and art.get("files")):
        continue
    file = art["file"]
    entry = {"file": file, "format": art["format"], "precision": art.get("precision"), "sha256": art.get("sha256")}
    v = validated.get(file)
    if v and v.get("status") in ("passed", "parity-failed", "error"):
        entry.update({k: v[k] for k in ("status", "reason", "runtime", "runtime_version", "parity",
                                        "host_agreement", "latency") if k in v})
    native, tool = None, None
    text = read(f"{file}.benchmark_model.log")
    if text is not None:
        native, tool = benchmark_model(text), "benchmark_model"
        entry["runtime"] = "litert"
    text_et = read(f"{file}.executor_runner.log")
    if text_et is not None:
        native, tool = executor_runner(text_et), os.path.basename((read(f"{file}.executor_runner.tool") or "executor_runner").strip())
        entry["runtime"] = "executorch"
    if tool:
        log = text if text is not None else text_et
        entry["tool_log_tail"] = log.splitlines()[-15:]
        if native is None:
            entry.setdefault("status", "error")
            entry.setdefault("reason", f"{tool} printed no timings")
            exit_code = max(exit_code, 3)
        else:
            # The native tool is what an app runs: its figure is the device latency.
            if "latency" in entry:
                entry["python_latency"] = entry["latency"]
            entry["latency"] = {"source": "device", "tool": tool, "runtime": entry["runtime"], "threads": threads,
                                "warmup": warmup, **native}
            entry.setdefault("status", "measured")
    if "status" not in entry:
        entry.update(status="skipped", reason="no benchmark tool and no python on the device for this format")
    if entry["status"] == "parity-failed" and exit_code == 0:
        exit_code = 1
    if entry["status"] == "error":
        exit_code = 3
    artifacts.append(entry)

if tool_failed:
    exit_code = max(exit_code, 3)
if not any(a["status"] != "skipped" for a in artifacts):
    exit_code = 2
report = {"schema_version": 1, "kind": "edgepack-device-report", "created_by": "device/run_android.sh",
          "created_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "bundle": {"model": manifest["model"]["name"], "target": manifest["target"]["name"],
                     "edgepack_version": manifest.get("edgepack_version"),
                     "payload_sha256": (manifest.get("package") or {}).get("payload_sha256")},
          "device": device, "settings": {"threads": threads, "warmup": warmup, "runs": runs},
          "artifacts": artifacts, "passed": exit_code == 0, "exit_code": exit_code}
if exit_code == 2:
    report["error"] = "nothing ran on the device: no benchmark tool found and no python with a runtime"
tmp = report_path + ".tmp"
with open(tmp, "w") as handle:
    json.dump(report, handle, indent=2)
    handle.write("\n")
os.replace(tmp, report_path)
for a in artifacts:
    lat = a.get("latency") or {}
    figure = lat.get("p50_ms") if lat.get("p50_ms") is not None else lat.get("mean_ms")
    print(f"{a['file']}: {a['status']}" + (f", {figure} ms ({lat.get('tool')})" if figure is not None else "")
          + (f" - {a['reason']}" if a.get("reason") else ""), file=sys.stderr)
print(f"report: {os.path.abspath(report_path)}", file=sys.stderr)
sys.exit(exit_code)
PY
