#!/usr/bin/env bash
# The main job on an example: concurrent reserves from several processes, a halt,
# an escalation and its approval, releases, then `escalate runs show`.
# Runs in a fresh runs root so it can be repeated; the path is printed at the end.
set -euo pipefail

ESCALATE_RUNS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/escalate-demo.XXXXXX")
export ESCALATE_RUNS_DIR ESCALATE_ACTOR=demo
RUN=demo

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
# Run a command that is expected to refuse, and show its exit code.
expect() { local want=$1; shift; printf '$ %s\n' "$*"; set +e; "$@"; local got=$?; set -e
           printf '  (exit %s)\n' "$got"; [ "$got" -eq "$want" ] || { echo "expected exit $want" >&2; exit 1; }; }

step "A run with a \$10 budget: at most \$4 a task, and a person sees anything over \$3 or over budget"
show escalate runs init "$RUN" --cap 10 --task-cap 4 --escalation enforce \
     --approval-threshold 3 --max-extension 2

step "Eight worker processes reserve \$1.20 each at the same moment"
for i in 1 2 3 4 5 6 7 8; do
  escalate reserve "$RUN" "worker-$i" --estimate 1.20 &
done
wait
echo "(all eight fit: 8 x \$1.20 = \$9.60 of \$10.00, each decided under the run's lock)"

step "A task asks for more than the task cap: it is halted, and the halt is in the log"
expect 3 escalate reserve "$RUN" big-refactor --estimate 5

step "Another asks for \$1.50 with \$0.40 left: it escalates to a person"
expect 4 escalate reserve "$RUN" docs-pass --estimate 1.50
ESC=$(escalate escalations --run "$RUN" --open --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["escalations"][0]["id"])')
show escalate escalations --run "$RUN" --open

step "The task waits in the background while alice approves $ESC"
escalate wait "$RUN" "$ESC" --timeout 60 & waiter=$!
show escalate approve "$RUN" "$ESC" --by alice
wait "$waiter" && echo "(the waiting process was released with exit 0)"
expect 5 escalate pause "$RUN" "$ESC" --by bob

step "Workers finish and release what they actually spent (one ran over)"
for i in 1 2 3 4 5 6 7; do show escalate release "$RUN" "worker-$i" --actual 0.9$i; done
show escalate release "$RUN" worker-8 --actual 1.35
show escalate release "$RUN" docs-pass --actual 1.10
echo "(a retried release is safe:)"
show escalate release "$RUN" worker-8 --actual 1.35

step "The run"
show escalate runs show "$RUN"
show escalate runs verify "$RUN"

printf '\nThe run is in %s — look again with:\n  ESCALATE_RUNS_DIR=%s escalate runs show %s\n' \
  "$ESCALATE_RUNS_DIR" "$ESCALATE_RUNS_DIR" "$RUN"
