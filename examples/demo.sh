#!/usr/bin/env bash
# The main job on an example: concurrent reserves from several processes, a halt,
# an escalation and its approval, releases, then `escalate runs show`.
# Runs in a fresh runs root inside the checkout (build/demo-runs) so it can be repeated
# and leaves nothing elsewhere; `make clean` removes it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ESCALATE_RUNS_DIR="$ROOT/build/demo-runs"
rm -rf "$ESCALATE_RUNS_DIR"
mkdir -p "$ESCALATE_RUNS_DIR"
export ESCALATE_RUNS_DIR ESCALATE_ACTOR=demo
RUN=demo

# Bold headings on a terminal only: piped or logged output gets no escape codes.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
show() { printf '$ %s\n' "$*"; "$@"; }
# Run a command that is expected to refuse, and show its exit code.
expect() { local want=$1; shift; printf '$ %s\n' "$*"; set +e; "$@"; local got=$?; set -e
           printf '  (exit %s)\n' "$got"; [ "$got" -eq "$want" ] || { echo "expected exit $want" >&2; exit 1; }; }
# Run a command in the background with each line of its output labelled [label].
labelled() { local label=$1; shift; "$@" 2>&1 | sed -u "s/^/[$label] /"; }
# One field of `escalate runs show RUN --json`.
field() { escalate runs show "$RUN" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

step "A run with a \$10 budget: at most \$4 a task, and a person sees anything over \$3 or over budget"
show escalate runs init "$RUN" --cap 10 --task-cap 4 --escalation enforce \
     --approval-threshold 3 --max-extension 2

step "Eight worker processes reserve \$1.20 each at the same moment"
workers=()
for i in 1 2 3 4 5 6 7 8; do
  labelled "worker-$i" escalate reserve "$RUN" "worker-$i" --estimate 1.20 & workers+=($!)
done
for pid in "${workers[@]}"; do wait "$pid"; done  # set -e: a refused worker stops the demo
[ "$(field reserved_micros)" -eq 9600000 ] || { echo "expected \$9.60 reserved" >&2; exit 1; }
echo "(checked: all eight fit, 8 x \$1.20 = \$9.60 of \$10.00 reserved, each decided under the run's lock)"

step "A task asks for more than the task cap: it is halted, and the halt is in the log"
expect 3 escalate reserve "$RUN" big-refactor --estimate 5

step "Another asks for \$1.50 with \$0.40 left: it escalates to a person"
expect 4 escalate reserve "$RUN" docs-pass --estimate 1.50
ESC=$(escalate escalations --run "$RUN" --open --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["escalations"][0]["id"])')
show escalate escalations --run "$RUN" --open

step "The task waits in the background while alice approves $ESC"
labelled waiter escalate wait "$RUN" "$ESC" --timeout 60 & waiter=$!
show escalate approve "$RUN" "$ESC" --by alice
if wait "$waiter"; then echo "(checked: the waiting process was released with exit 0)"
else echo "the waiting process exited $?, not 0" >&2; exit 1; fi
expect 5 escalate pause "$RUN" "$ESC" --by bob

step "Workers finish and release what they actually spent (one ran over)"
for i in 1 2 3 4 5 6 7; do show escalate release "$RUN" "worker-$i" --actual 0.9$i; done
show escalate release "$RUN" worker-8 --actual 1.35
show escalate release "$RUN" docs-pass --actual 1.10
echo "(a retried release changes nothing:)"
before=$(wc -l < "$ESCALATE_RUNS_DIR/$RUN/events.ndjson")
show escalate release "$RUN" worker-8 --actual 1.35
[ "$(wc -l < "$ESCALATE_RUNS_DIR/$RUN/events.ndjson")" -eq "$before" ] \
  || { echo "the retried release wrote to the log" >&2; exit 1; }

step "The run"
show escalate runs show "$RUN"
show escalate runs verify "$RUN"

escalate_bin="$(command -v escalate)"
printf '\nThe run is in %s. The command is in the virtual environment, not on your PATH:\n' \
  "${ESCALATE_RUNS_DIR#"$ROOT"/}"
printf '  %s runs show %s --runs-dir %s\n' "${escalate_bin#"$ROOT"/}" "$RUN" "${ESCALATE_RUNS_DIR#"$ROOT"/}"
printf 'or put it on your PATH for this shell first:  source .venv/bin/activate\n'
