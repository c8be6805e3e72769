#!/usr/bin/env bash
# One tmux pane per service following its log, and one with `rlbus tail` (the live view).
#
#   scripts/tmux.sh OUTPUT_DIR [--detach] [--session NAME] [-- RLBUS_TAIL_ARGS...]
#
# OUTPUT_DIR is a run folder (output_dir): local runs (`rlbus rl`) follow logs/<service>.log;
# runs submitted from this host with `rlbus rl --slurm` follow logs/<task>.out, the copies of
# each task's console streamed back by the launcher. Panes wait for files that do not exist yet.
# `rlbus tail` gets RLBUS_TAIL_ARGS, by default `@ OUTPUT_DIR/configs/rl.toml`; for a run on
# another host: scripts/tmux.sh OUTPUT_DIR -- --monitor tcp://HOST:5556
# --detach leaves the session running without attaching (attach with `tmux attach -t NAME`).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
run_dir=$(cd "$1" 2>/dev/null && pwd) || { echo "tmux.sh: no run folder $1" >&2; exit 2; }
shift
session="rlbus-$(basename "$run_dir")"
detach=0
tail_args=(@ "$run_dir/configs/rl.toml")
while [ $# -gt 0 ]; do
    case "$1" in
        --detach) detach=1 ;;
        --session) session="$2"; shift ;;
        --) shift; tail_args=("$@"); break ;;
        *) echo "tmux.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done
command -v tmux >/dev/null || { echo "tmux.sh: tmux is not installed (scripts/ci/install_slurm.sh installs it)" >&2; exit 1; }
session=${session//[.:]/_}  # tmux reads '.' and ':' in a target as window and pane separators

repo=$(cd "$(dirname "$0")/.." && pwd)
if command -v rlbus >/dev/null; then
    rlbus=(rlbus)
else
    rlbus=("${PYTHON:-$(command -v python3)}" -m rlbus)
fi

# The files to follow: task copies of a SLURM run, else each service's own log.
files=()
if [ -f "$run_dir/slurm_jobs.json" ]; then
    mapfile -t files < <("${PYTHON:-python3}" - "$run_dir" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for array in json.loads((run / "slurm_jobs.json").read_text()):
    many = array["section"] in ("inference", "env_worker")
    for task in range(array["num_tasks"]):
        print(run / "logs" / (f"{array['service']}-{task}.out" if many else f"{array['service']}.out"))
EOF
)
else
    for service in monitor orchestrator trainer inference env-worker; do
        files+=("$run_dir/logs/$service.log")
    done
fi

if tmux has-session -t "=$session" 2>/dev/null; then
    echo "tmux.sh: session $session exists already (tmux attach -t $session, or kill-session)" >&2
    exit 1
fi
quoted_tail=$(printf '%q ' "${rlbus[@]}" tail "${tail_args[@]}")
tmux new-session -d -s "$session" -n rlbus -c "$repo" -x 200 -y 60 "$quoted_tail; exec bash"
tmux set-option -w -t "$session:rlbus" pane-border-status top
tmux select-pane -t "$session:rlbus.0" -T "rlbus tail"
for file in "${files[@]}"; do
    name=$(basename "$file"); name=${name%.*}
    tmux split-window -t "$session:rlbus" -c "$repo" "tail -n 200 -F $(printf '%q' "$file")"
    tmux select-pane -t "$session:rlbus" -T "$name"
    tmux select-layout -t "$session:rlbus" tiled >/dev/null
done
tmux select-pane -t "$session:rlbus.0"
echo "tmux session $session: rlbus tail and ${#files[@]} log pane(s)"
if [ "$detach" -eq 0 ]; then
    if [ -n "${TMUX:-}" ]; then
        exec tmux switch-client -t "$session"
    fi
    exec tmux attach -t "$session"
fi
