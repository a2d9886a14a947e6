#!/usr/bin/env bash
# The speedrun on a lent GPU machine, as a few calls of at most 10 minutes each (docs/demo_model.md, "One lease").
#
# Why: a lent machine takes at most ~64 MiB forward per call, runs a command for at most 10 minutes, and stays
# warm only ~30 s between calls. So the driver (python -m src.speedrun) runs detached (setsid) for the whole run,
# and each call starts it, hands it the mamba-ssm build, follows it, or brings its pieces back.
#
#   bash scripts/lease_speedrun.sh start            # call 1, carry .carry: unpack and start the run, then follow;
#                                                   # .kernels and .neural carried by earlier calls are handed
#                                                   # over first (then calls 2 and 3 are not needed)
#   bash scripts/lease_speedrun.sh kernels          # call 2, carry .kernels: hand over mamba_site.txz, then follow
#   bash scripts/lease_speedrun.sh neural           # call 3, carry .neural: hand over the neural-voice corpus pack
#                                                   # (NEURAL, default .neural/neural.tar), then follow
#   bash scripts/lease_speedrun.sh receive DIR      # before `start`, carry DIR: pieces of an earlier lease into
#                                                   # RUN/pieces (DIR: a bundle of python -m src.pieces bundle)
#   bash scripts/lease_speedrun.sh follow           # calls 4..: follow until the run ends or WAIT seconds pass
#   bash scripts/lease_speedrun.sh collect export evaluate   # last call: those steps' pieces + summary into $OUT,
#                                                   # and logs.tgz (driver and step logs, train_log.txt) if room
#   bash scripts/lease_speedrun.sh collect logs     # logs.tgz and the summary alone
#   (collect index:STEP brings a step's index alone: enough to count it done where the run goes on; collect
#   STEP:A-B its index and pieces A to B, for a pack over one call's 64 MiB: stage1:0-2, then stage1:3-4)
#
# Environment: RUN (default runs/speedrun), CONFIG (default hparams/speedrun/h200.yaml), CARRY (default .carry),
# WAIT (seconds a call follows the run, default 500), NEURAL (the pack `neural` hands over, default
# .neural/neural.tar), KERNELS (the mamba-ssm build `kernels` hands over, default .kernels/mamba_site.txz),
# PYTHON (default python3), STOP_AFTER (a step name: the run stops after it, for a lease too short for the whole
# run; collect its pieces and go on elsewhere), CALL_MINUTES (the driver starts no step whose budget would end
# past this many minutes from its start: what the lease has left), OUT (where collect copies to; the lent machine
# sets it). Safest order: carry .neural and .kernels in calls of their own first (command `true`), then `start`
# with .carry hands both over before the first step; `kernels` and `neural` hand them over to a running driver.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/speedrun}
CONFIG=${CONFIG:-hparams/speedrun/h200.yaml}
CARRY=${CARRY:-.carry}
WAIT=${WAIT:-500}
PYTHON=${PYTHON:-python3}
PID_FILE=$RUN/driver.pid
EXIT_FILE=$RUN/driver.exit  # the driver's exit status, written when it ends (a zombie still answers kill -0)
LOG=$RUN/driver.log

NEURAL=${NEURAL:-.neural/neural.tar}
KERNELS=${KERNELS:-.kernels/mamba_site.txz}

running() { [ -f "$PID_FILE" ] && [ ! -f "$EXIT_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

follow() {  # print the driver's step lines as they come, until it ends or WAIT seconds pass
  local waited=0 shown=0 lines
  while :; do
    lines=$(wc -l < "$LOG" 2>/dev/null || echo 0)
    if (( lines > shown )); then
      sed -n "$((shown + 1)),${lines}p" "$LOG" | grep -E "^speedrun:|^\| |Error|error" | cut -c1-300
      shown=$lines
    fi
    if ! running; then
      local status; status=$(cat "$EXIT_FILE" 2>/dev/null || echo unknown)
      echo "lease: the run has ended, exit status $status ($(date -u +%H:%M:%S))"
      [ "$status" = 0 ] || { echo "lease: the log's last lines:"; tail -15 "$LOG"; }  # the whole error, not its first line
      return 0
    fi
    (( waited >= WAIT )) && { echo "lease: still running after ${WAIT}s; call 'follow' again"; tail -2 "$LOG"; return 0; }
    sleep 5; waited=$((waited + 5))
  done
}

hand_over() {  # SOURCE TARGET CARRIED: copy a carried file into the carry folder whole (the driver may look any time)
  [ -f "$1" ] || { echo "lease: $1 missing: name $3 in the call's carry" >&2; return 2; }
  mkdir -p "$(dirname "$2")" && cp "$1" "$2.tmp" && mv "$2.tmp" "$2"
}

case "${1:-}" in
  start)
    if running; then echo "lease: a run is already going (pid $(cat "$PID_FILE")); following it"; follow; exit; fi
    [ -d "$CARRY/debs" ] || { echo "lease: $CARRY/debs missing: make it here with scripts/fetch_carry.sh .carry and name .carry in the call's carry" >&2; exit 2; }
    mkdir -p "$RUN"
    # carried by earlier calls of this lease (they stay on a warm machine): handed over before the driver looks
    [ -f "$KERNELS" ] && hand_over "$KERNELS" "$CARRY/mamba_site.txz" "${KERNELS%%/*}" && echo "lease: mamba-ssm handed over"
    [ -f "$NEURAL" ] && hand_over "$NEURAL" "$CARRY/neural/neural.tar" "${NEURAL%%/*}" \
      && echo "lease: the neural-voice corpus handed over"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    echo "lease: starting $CONFIG in $RUN ($(date -u +%H:%M:%S))"
    rm -f "$EXIT_FILE"
    STOP="${STOP_AFTER:+--stop-after $STOP_AFTER} ${CALL_MINUTES:+--call-minutes $CALL_MINUTES}"
    export PYTHON CONFIG RUN CARRY EXIT_FILE STOP
    setsid nohup bash -c '"$PYTHON" -m src.speedrun --config "$CONFIG" --out "$RUN" --carry "$CARRY" $STOP;
                          echo $? >"$EXIT_FILE"' >"$LOG" 2>&1 &
    echo $! >"$PID_FILE"
    follow ;;
  kernels)
    hand_over "$KERNELS" "$CARRY/mamba_site.txz" "${KERNELS%%/*}" || exit 2
    echo "lease: mamba-ssm handed over; steps that start from now on use it"
    follow ;;
  neural)
    hand_over "$NEURAL" "$CARRY/neural/neural.tar" "${NEURAL%%/*}" || exit 2
    echo "lease: the neural-voice corpus handed over; the neural step merges it if it has not run yet"
    follow ;;
  receive)
    [ -d "${2:-}" ] || { echo "lease: receive DIR: ${2:-(none)} is not a folder here: name it in the call's carry" >&2; exit 2; }
    mkdir -p "$RUN/pieces"
    for file in "$2"/*; do hand_over "$file" "$RUN/pieces/${file##*/}" "$2" || exit 2; done
    echo "lease: $(ls "$2" | wc -l) files of $2 in $RUN/pieces; the run restores them at its start" ;;
  follow)
    follow ;;
  collect)
    shift
    [ $# -gt 0 ] || { echo "usage: lease_speedrun.sh collect STEP... (e.g. export evaluate)" >&2; exit 2; }
    files=()
    logs=$RUN/logs.tgz  # the driver's log, each step's log and every train_log.txt: small, and what the
    # docs' step tables and learning curves (python -m src.train_curves) are made from once the machine is gone
    tar czf "$logs" -C "$RUN" --ignore-failed-read driver.log logs \
      $(cd "$RUN" && ls -d work/*/train_log.txt 2>/dev/null) 2>/dev/null || true
    want_logs=false
    for step in "$@"; do  # STEP: its whole pack; index:STEP: its index alone (done, its folders not needed later);
      # STEP:A-B: its index and pieces A to B (a pack larger than one call brings back, over several calls)
      range=all
      case $step in
        logs) want_logs=true; continue ;;  # the logs alone (they also come with any collect that has room)
        index:*) name=${step#index:}; range=none ;;
        *:*) name=${step%%:*}; range=${step#*:} ;;
        *) name=$step ;;
      esac
      [ -f "$RUN/pieces/$name.pieces.json" ] || { echo "lease: no complete pack of step $name in $RUN/pieces" >&2; exit 2; }
      files+=("$RUN/pieces/$name.pieces.json")
      case $range in
        none) ;;
        all) files+=("$RUN"/pieces/"$name".tgz.*) ;;
        *)
          [[ $range =~ ^[0-9]+-[0-9]+$ ]] || { echo "lease: $step: a piece range is FIRST-LAST, e.g. $name:0-2" >&2; exit 2; }
          for ((number = 10#${range%-*}; number <= 10#${range#*-}; number++)); do
            piece=$(printf "%s/pieces/%s.tgz.%03d" "$RUN" "$name" "$number")
            [ -f "$piece" ] || { echo "lease: $step: no piece ${piece##*/} (ls $RUN/pieces)" >&2; exit 2; }
            files+=("$piece")
          done ;;
      esac
    done
    files+=("$RUN/pieces/summary.md")
    if [ -s "$logs" ]; then
      with_logs=$(du -cb "${files[@]}" "$logs" | tail -1 | cut -f1)
      if (( ${#files[@]} < 8 && with_logs <= 64 * 1048576 )); then
        files+=("$logs")
      elif $want_logs; then
        echo "lease: no room for logs.tgz in this call (8 files, 64 MiB): 'collect logs' alone brings it" >&2; exit 2
      else
        echo "lease: logs.tgz left out (8 files, 64 MiB a call); 'collect logs' brings it"
      fi
    fi
    total=$(du -cb "${files[@]}" | tail -1 | cut -f1)
    if (( ${#files[@]} > 8 || total > 64 * 1048576 )); then
      echo "lease: ${#files[@]} files, $total bytes: over what one call brings back (8 files, 64 MiB); collect fewer steps, or a piece range (STEP:A-B), per call" >&2
      exit 2
    fi
    cp "${files[@]}" "${OUT:?OUT is not set (the lent machine sets it)}/"
    echo "lease: brought back ${#files[@]} files ($total bytes): ${files[*]##*/}" ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
