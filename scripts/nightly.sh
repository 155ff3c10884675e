#!/usr/bin/env bash
# The nightly run: lab up -> conformance -> ALWAYS lab logs + lab down, even on failure or SIGINT/SIGTERM.
#
# Usage: scripts/nightly.sh [SPEC]            (SPEC default: $LAB or labs/default.yaml; `make nightly LAB=...`)
#
# Stages, in order: render (spec check, artifacts) -> preclean (lab down of a leftover of the same lab) -> up ->
# conformance -> collect (phase timings, state logs, `lab status`, `lab logs`) -> down. collect and down run
# whatever happened before them. The last line printed is the verdict, e.g.
#   nightly: PASSED (14 checks passed) in 1520s; artifacts in artifacts/nightly-20260101T020000Z
#   nightly: FAILED at provisioning (lab up exit 1): phase wait: ... ; artifacts in ...
#   nightly: FAILED at conformance (could not run, pytest exit 3): kubeconfig ... does not exist; ...
#
# Exit codes (docs/nightly.md):
#   0    passed: every conformance check passed (a skipped check is not a pass)
#   1    conformance ran and a check failed, errored or was skipped
#   2    bad input: the spec is invalid or missing, or the tools are missing (nothing was created)
#   3    provisioning failed: `lab up` failed (logs collected, lab removed)
#   4    conformance could not run: no usable cluster/kubeconfig, pytest usage or internal error, no checks
#   5    teardown failed: `lab down` failed, the lab may still exist (wins over 0, 1, 3 and 4)
#   130  interrupted by SIGINT, 143 by SIGTERM (logs collected, lab removed; 5 if that removal failed)
#
# Environment:
#   ARTIFACTS      artifacts folder (default artifacts/nightly-<UTC timestamp>); created, must not be non-empty
#   LAB_NETNS      run every lab/conformance command inside this network namespace (`ip netns exec NS ...`),
#                  for a libvirtd running in a namespace (this project's test machine: LAB_NETNS=labns)
#   LAB_WRAP       further command prefix, word-split (e.g. "sudo -E"); applied inside LAB_NETNS
#   LAB_STATE_DIR  lab state root (default .lab), passed through to `lab`
#   CONFORMANCE_ARGS  extra pytest arguments for the suite (word-split), e.g. "-n 4 --dist loadgroup"
#   NIGHTLY_PRECLEAN  1 (default): `lab down` before `lab up`, so a leftover of a killed run never blocks a night
#   NIGHTLY_LOGS_TIMEOUT / NIGHTLY_DOWN_TIMEOUT  seconds for `lab logs` / `lab down` (default 900 / 900)
#   NIGHTLY_GRACE   seconds a child gets to stop after the forwarded SIGINT before SIGTERM/SIGKILL (default 60)
# During collect/down further signals are reported but do not stop the cleanup (only SIGKILL does).
set -uo pipefail

started=$(date +%s)
caller_pwd=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$caller_pwd/$1" ;; esac; }

SPEC_ARG=${1:-${LAB:-labs/default.yaml}}
if [[ -f "$SPEC_ARG" ]]; then SPEC=$(abspath "$SPEC_ARG"); else SPEC="$ROOT/$SPEC_ARG"; fi
ARTIFACTS=$(abspath "${ARTIFACTS:-$ROOT/artifacts/nightly-$(date -u +%Y%m%dT%H%M%SZ)}")
CONSOLE="$ARTIFACTS/console"
export COLUMNS=${NIGHTLY_COLUMNS:-200}   # rich wraps at 80 columns when not on a terminal: keep lines greppable
export PYTHONUNBUFFERED=1

cd "$ROOT" || exit 2

say() { printf 'nightly: %s\n' "$*" >&2; }

# ------------------------------------------------------------------------------------------- verdict

STAGE=setup
SIGNAL=
IN_CLEANUP=0
CHILD=
declare -A SECONDS_OF=()
declare -A RC_OF=()

verdict() {  # verdict CODE MESSAGE: one line on stdout and in the artifacts, then exit
    local code=$1 msg=$2 total=$(( $(date +%s) - started ))
    local line="nightly: $msg in ${total}s; artifacts in $ARTIFACTS"
    if [[ -d "$ARTIFACTS" ]]; then
        printf '%s\nexit %s\n' "$line" "$code" >"$ARTIFACTS/verdict.txt"
        write_summary_json "$code" "$msg" "$total"
    fi
    printf '%s\n' "$line"
    exit "$code"
}

write_summary_json() {
    local stages="" s
    for s in "${!SECONDS_OF[@]}"; do stages+="\"$s\": {\"seconds\": ${SECONDS_OF[$s]}, \"exit\": ${RC_OF[$s]:-null}}, "; done
    "$PY" - "$ARTIFACTS/nightly.json" "$1" "$2" "$3" "$SPEC" "${LAB_NAME:-}" "{${stages%, }}" <<'EOF' || true
import json, sys
path, code, msg, total, spec, name, stages = sys.argv[1:]
json.dump({"exit": int(code), "verdict": "PASSED" if code == "0" else "FAILED", "message": msg,
           "seconds": int(total), "spec": spec, "lab": name or None, "stages": json.loads(stages)},
          open(path, "w"), indent=2, sort_keys=True)
EOF
}

# ------------------------------------------------------------------------------------------- running children

LAB_PREFIX=()
[[ -n "${LAB_NETNS:-}" ]] && LAB_PREFIX+=(ip netns exec "$LAB_NETNS")
# shellcheck disable=SC2206
[[ -n "${LAB_WRAP:-}" ]] && LAB_PREFIX+=($LAB_WRAP)

# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
    local sig=$1
    if (( IN_CLEANUP )); then
        say "got SIG$sig during cleanup: lab logs/down continue (only SIGKILL stops them)"
        [[ -z "$SIGNAL" ]] && SIGNAL=$sig
        return
    fi
    [[ -z "$SIGNAL" ]] && SIGNAL=$sig
    say "got SIG$sig during $STAGE: stopping it, then collecting logs and removing the lab"
    # children run in their own process group (set -m): Ctrl-C on a terminal reaches only this script, and the
    # child gets one SIGINT (timeout passes it on), which `lab` and pytest turn into their KeyboardInterrupt path
    [[ -n "$CHILD" ]] && kill -INT "$CHILD" 2>/dev/null
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap '' HUP   # a closed terminal must not skip the cleanup

# run STAGE LOGFILE TIMEOUT CMD...: CMD in the background (own process group), output to the console and LOGFILE.
# Returns CMD's exit status. A signal is forwarded once as SIGINT; after NIGHTLY_GRACE seconds TERM, then KILL.
run() {
    local name=$1 log=$2 limit=$3 t0 rc waited=0 grace=${NIGHTLY_GRACE:-60}
    shift 3
    t0=$(date +%s)
    printf '$ %s\n' "$*" >>"$log"
    set -m   # own process group: a terminal's Ctrl-C reaches only this script, and SIGINT is not ignored
    if (( limit > 0 )); then
        timeout --signal=INT --kill-after=60 "$limit" "$@" > >(tee -a "$log") 2>&1 &
    else
        "$@" > >(tee -a "$log") 2>&1 &
    fi
    CHILD=$!
    set +m
    while kill -0 "$CHILD" 2>/dev/null; do
        if [[ -n "$SIGNAL" ]] && (( ! IN_CLEANUP )); then
            waited=$((waited + 1))
            if (( waited == grace )); then
                say "$name still running ${grace}s after SIGINT: sending SIGTERM"
                kill -TERM -- "-$CHILD" 2>/dev/null
            elif (( waited == grace + 15 )); then
                say "$name still running after SIGTERM: sending SIGKILL"
                kill -KILL -- "-$CHILD" 2>/dev/null
            fi
        fi
        sleep 1 & wait $! 2>/dev/null   # an interruptible sleep: the trap runs at once
    done
    wait "$CHILD"; rc=$?
    CHILD=
    wait 2>/dev/null   # the tee of the process substitution
    SECONDS_OF[$name]=$(( $(date +%s) - t0 ))
    RC_OF[$name]=$rc
    return "$rc"
}

first_error() {  # the `error:` ... `hint:` block a `lab` command printed, on one line
    awk '/^error: /{e=1; sub(/^error: /, "")} e{print} e && /^hint: /{exit}' "$1" 2>/dev/null \
        | tr '\n' ' ' | tr -s ' ' | sed 's/ *$//' | cut -c1-600
}

# ------------------------------------------------------------------------------------------- setup

PY="$ROOT/.venv/bin/python"
LAB_BIN="$ROOT/.venv/bin/lab"
if [[ ! -x "$LAB_BIN" ]]; then
    say "no $LAB_BIN: running make deps (system packages and the virtualenv)"
    make -C "$ROOT" deps || { PY=python3; mkdir -p "$ARTIFACTS"; verdict 2 "FAILED at setup: make deps failed"; }
fi
if [[ -d "$ARTIFACTS" && -n "$(ls -A "$ARTIFACTS" 2>/dev/null)" ]]; then
    printf 'nightly: FAILED at setup: artifacts folder %s is not empty; use a new ARTIFACTS\n' "$ARTIFACTS"
    exit 2
fi
mkdir -p "$CONSOLE" || exit 2
LABX=("${LAB_PREFIX[@]}" "$LAB_BIN")   # the lab CLI, inside LAB_NETNS / LAB_WRAP
[[ -f "$SPEC" ]] || verdict 2 "FAILED at setup: no lab spec $SPEC_ARG"
if [[ -n "${LAB_NETNS:-}" && ! -e "/run/netns/$LAB_NETNS" ]]; then
    verdict 2 "FAILED at setup: LAB_NETNS=$LAB_NETNS: no such network namespace (ip netns list)"
fi
say "spec $SPEC, artifacts $ARTIFACTS${LAB_NETNS:+, inside netns $LAB_NETNS}"

# ------------------------------------------------------------------------------------------- stages

STAGE=render
run render "$CONSOLE/render.log" 0 "$LAB_BIN" render -c "$SPEC" -o "$ARTIFACTS/rendered"
case ${RC_OF[render]} in
    0) ;;
    2) verdict 2 "FAILED at input (lab render exit 2): $(first_error "$CONSOLE/render.log")" ;;
    *) say "lab render exit ${RC_OF[render]}: $(first_error "$CONSOLE/render.log"); lab up will judge the host" ;;
esac
LAB_NAME=$("$PY" -c 'import sys; from lab.spec import load_lab; print(load_lab(sys.argv[1]).name)' "$SPEC") \
    || verdict 2 "FAILED at input: cannot read the lab name from $SPEC"
STATE_DIR=$(abspath "${LAB_STATE_DIR:-.lab}")/$LAB_NAME

collect() {
    IN_CLEANUP=1
    STAGE=collect
    if [[ -f "$STATE_DIR/state.json" ]]; then   # before `lab down` removes the state dir
        cp "$STATE_DIR/state.json" "$ARTIFACTS/state.json"
        "$PY" - "$STATE_DIR/state.json" "$ARTIFACTS/phases.json" "$ARTIFACTS/phases.txt" <<'EOF' || true
import json, sys
from lab.pipeline import phase_names, up_phases
state = json.load(open(sys.argv[1]))
phases = state.get("phases", {})
json.dump({"lab": state.get("lab"), "virt_type": state.get("virt_type"), "phases": phases},
          open(sys.argv[2], "w"), indent=2)
known = phase_names(up_phases())
order = [n for n in known if n in phases] + sorted(set(phases) - set(known))
with open(sys.argv[3], "w") as out:
    for name in order:
        p = phases[name]
        label = "total" if name == "_total" else name
        out.write(f"{label:<12} {p.get('status', '?'):<12} {p.get('seconds', 0):>9.1f}s  {p.get('reason', '')}\n")
EOF
    fi
    [[ -d "$STATE_DIR/logs" ]] && cp -r "$STATE_DIR/logs" "$ARTIFACTS/state-logs"
    timeout 120 "${LABX[@]}" status -c "$SPEC" -o json >"$ARTIFACTS/status.json" 2>"$CONSOLE/status.log" \
        || say "lab status failed (see $CONSOLE/status.log)"
    run logs "$CONSOLE/logs.log" "${NIGHTLY_LOGS_TIMEOUT:-900}" "${LABX[@]}" logs -c "$SPEC" -o "$ARTIFACTS/logs" \
        || say "lab logs exit ${RC_OF[logs]} (see $CONSOLE/logs.log)"
}

teardown() {  # teardown MAIN_CODE MAIN_MESSAGE: lab down, then the verdict
    STAGE=down
    if run down "$CONSOLE/down.log" "${NIGHTLY_DOWN_TIMEOUT:-900}" "${LABX[@]}" down -c "$SPEC" \
            && [[ ! -e "$STATE_DIR" ]]; then
        verdict "$1" "$2"
    fi
    local why
    why=$(first_error "$CONSOLE/down.log"); [[ -e "$STATE_DIR" ]] && why="${why:+$why; }$STATE_DIR still exists"
    verdict 5 "FAILED at teardown (lab down exit ${RC_OF[down]}): $why; THE LAB MAY STILL EXIST, run: lab down -c $SPEC_ARG (before that: $2)"
}

interrupted() {  # the verdict after a signal: lab cleaned up, exit 128+N
    local code=130; [[ "$SIGNAL" == TERM ]] && code=143
    collect
    teardown "$code" "INTERRUPTED by SIG$SIGNAL during $1; logs collected and the lab removed"
}

if [[ "${NIGHTLY_PRECLEAN:-1}" == 1 ]]; then
    STAGE=preclean
    run preclean "$CONSOLE/preclean.log" "${NIGHTLY_DOWN_TIMEOUT:-900}" "${LABX[@]}" down -c "$SPEC" \
        || verdict 3 "FAILED at provisioning: removing a leftover lab $LAB_NAME failed (lab down exit ${RC_OF[preclean]}): $(first_error "$CONSOLE/preclean.log")"
    [[ -n "$SIGNAL" ]] && verdict "$([[ $SIGNAL == TERM ]] && echo 143 || echo 130)" "INTERRUPTED by SIG$SIGNAL before lab up"
fi

STAGE=provisioning
run up "$CONSOLE/up.log" 0 "${LABX[@]}" up -c "$SPEC"
up_rc=$?
[[ -n "$SIGNAL" ]] && interrupted provisioning
if (( up_rc != 0 )); then
    collect
    code=3; (( up_rc == 2 )) && code=2
    teardown "$code" "FAILED at provisioning (lab up exit $up_rc): $(first_error "$CONSOLE/up.log")"
fi

STAGE=conformance
KUBECONFIG_FILE=$("$LAB_BIN" kubeconfig -c "$SPEC" 2>"$CONSOLE/kubeconfig.log") || KUBECONFIG_FILE="$STATE_DIR/kubeconfig"
# an explicit kubeconfig always: never let the suite fall back to $KUBECONFIG or ~/.kube/config (another cluster)
# shellcheck disable=SC2086
run conformance "$CONSOLE/conformance.log" 0 "${LAB_PREFIX[@]}" "$PY" -m pytest conformance -p no:cacheprovider -ra \
    --lab "$SPEC" --kubeconfig "$KUBECONFIG_FILE" --junitxml "$ARTIFACTS/junit.xml" \
    --results-dir "$ARTIFACTS/conformance" ${CONFORMANCE_ARGS:-}
cf_rc=$?
if [[ ! -s "$ARTIFACTS/junit.xml" ]]; then   # the suite stopped before any check: CI still gets a failing JUnit case
    "$PY" - "$ARTIFACTS/junit.xml" "$CONSOLE/conformance.log" "$cf_rc" <<'EOF' || true
import sys
import xml.etree.ElementTree as ET
path, log, rc = sys.argv[1:]
root = ET.Element("testsuites")
suite = ET.SubElement(root, "testsuite", name="conformance", tests="1", failures="0", errors="1", skipped="0")
case = ET.SubElement(suite, "testcase", classname="conformance", name="suite_could_run")
err = ET.SubElement(case, "error", message=f"the conformance suite did not run its checks (pytest exit {rc})")
err.text = open(log, errors="replace").read()[-20000:]
ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
EOF
fi
[[ -f "$ARTIFACTS/conformance/conformance-latest.json" ]] && \
    cp "$ARTIFACTS/conformance/conformance-latest.json" "$ARTIFACTS/conformance.json"
[[ -n "$SIGNAL" ]] && interrupted conformance
collect

counts() {  # "N passed, N failed, ..." from the JSON report
    "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))["counts"]
print(f"{c[\"pass\"]} passed, {c[\"fail\"]} failed, {c[\"error\"]} errors, {c[\"skip\"]} skipped")' \
        "$ARTIFACTS/conformance.json" 2>/dev/null
}
skipped() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["counts"]["skip"])' \
    "$ARTIFACTS/conformance.json" 2>/dev/null || echo 0; }

case $cf_rc in
    0)  if [[ ! -f "$ARTIFACTS/conformance.json" ]]; then
            teardown 4 "FAILED at conformance (pytest exit 0 but no JSON report was written)"
        elif (( $(skipped) > 0 )); then
            teardown 1 "FAILED at conformance: $(counts) (a skip is not a pass; reasons in conformance.log)"
        fi
        teardown 0 "PASSED ($(counts))" ;;
    1)  teardown 1 "FAILED at conformance: $(counts); failing checks in junit.xml and console/conformance.log" ;;
    *)  why=$(grep -m1 -A1 'conformance preflight failed' "$CONSOLE/conformance.log" | tail -n1 | sed 's/^ *//')
        [[ -z "$why" ]] && why=$(grep -m1 -E '^(ERROR|E  |pytest: error)' "$CONSOLE/conformance.log")
        teardown 4 "FAILED at conformance (could not run, pytest exit $cf_rc): ${why:-see console/conformance.log}" ;;
esac
