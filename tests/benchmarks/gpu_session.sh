#!/usr/bin/env bash
# Issue 14's GPU session, from the repository root of a GPU machine where MLX CUDA is installed
# (/work/shared/gpu/README.md: two calls before this one on a fresh machine). One call, under 10 minutes.
#
#   bash tests/benchmarks/gpu_session.sh            # stream: the per-token timeline, streamed vs whole,
#                                                   # with and without --engine-cpus (about 5 minutes)
#   bash tests/benchmarks/gpu_session.sh serving    # bench_serving's full comparison (ceiling, mlx_lm.server,
#                                                   # gateway; c=1,8,32,64,256), as many runs as fit in the
#                                                   # call; call it again until 3 runs are on the machine:
#                                                   # each call prints the median table of all of them
#   bash tests/benchmarks/gpu_session.sh streams    # issue 22: the gateway's CPU per SSE event, events/s,
#                                                   # TTFT split (gateway in / engine / way out) and /health
#                                                   # p99 on the real engine at c=8,32,64,256 (128 tokens,
#                                                   # median of 3); BEFORE_REV=<git revision> runs that
#                                                   # revision's gateway too, in the same call (~6 minutes)
#   bash tests/benchmarks/gpu_session.sh agent      # bench_agent: 12k-token system prompt, 6 growing turns, 4
#                                                   # agents sharing a new system prompt; gateway, then
#                                                   # mlx_lm.server (about 4 minutes with the model made)
#   bash tests/benchmarks/gpu_session.sh constrained  # issue 22: bench_constrained_serving, json_schema and a
#                                                   # forced tool call beside unconstrained at c=1 and c=8,
#                                                   # median of 3 rounds (a Qwen2.5-format model of the
#                                                   # shape; about 3 minutes with the model made);
#                                                   # BEFORE_REV=<git revision> runs that revision too
#   bash tests/benchmarks/gpu_session.sh profile    # py-spy on the engine and the gateway for 15 s of a long
#                                                   # c=64 level: where each thread's time goes (~3 minutes)
#
# What comes back, in $OUT (3 or 4 files): session.log (every step, timestamped, as it happens),
# summary.md (the tables, written as each step ends), session.tar.gz (every raw file: JSON results,
# timelines, server logs, GPU clocks, /proc and cgroup snapshots), serving-median.md (serving only).
# Every step has a deadline inside the call's budget; a failing step is logged and the next one runs;
# the EXIT trap packs whatever exists. Environment: BUDGET_S (default 560), GATEWAY_ARGS (extra
# `mlx-gateway serve` arguments for the serving runs), SERVING_RUNS (default 3), SERVERS (serving's servers,
# default mlx_lm,gateway); for a dry run on a CPU:
# SHAPE=tiny TOKENS=400,64 ALLOW_CPU=1 (and LEVELS=1,8 SERVING_ESTIMATE_S=60 for serving; REPEATS=1 for
# constrained).
set -u
MODE=${1:-stream}
START=$(date +%s)
ALLOW_CPU=${ALLOW_CPU:-}
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-/tmp/gpu-session-out}
WORK=/tmp/mlx-gateway-gpu  # survives between calls while the machine stays warm
RUN=$WORK/$MODE-$(date +%Y%m%d-%H%M%S)
[ "$MODE" = agent ] && SHAPE=${SHAPE:-llama-3.2-1b-agent}  # the 1B shape with a 32k context
SHAPE=${SHAPE:-llama-3.2-1b}
MODEL=/tmp/mlx-gateway-bench/models/bench-$SHAPE
TOKENS=${TOKENS:-512,128}
mkdir -p "$OUT" "$RUN"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PY MODEL SHAPE ALLOW_CPU WORK
export BENCH_PIDS_FILE=$RUN/started-pids  # every server the benches start (own process groups)

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/session.log" >&2; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
note() { printf '%s\n' "$@" >> "$OUT/summary.md"; }

# step NAME SECONDS CMD...: at most SECONDS (and never past the budget); output in $RUN/NAME.{out,err}.
step() {
  local name=$1 want=$2 rc
  shift 2
  local limit=$(( want < $(left) - 50 ? want : $(left) - 50 ))  # room for the benches' own cleanup
  if (( limit < 15 )); then log "SKIP $name: no time left"; return 1; fi
  log "BEGIN $name (limit ${limit}s): $*"
  timeout -k 45 "$limit" "$@" > "$RUN/$name.out" 2> "$RUN/$name.err"
  rc=$?
  log "END $name: exit $rc$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)')"
  tail -n 4 "$RUN/$name.err" | sed 's/^/      /' | tee -a "$OUT/session.log" >&2
  return $rc
}

# A bench killed mid-cleanup would leave its servers (each in its own process group) holding the GPU.
reap() {
  local pid
  for pid in $(cat "$BENCH_PIDS_FILE" 2>/dev/null); do
    if kill -0 -- "-$pid" 2>/dev/null; then  # the group still has a member (the leader may be gone)
      log "stopping leftover server group $pid"
      kill -TERM -- "-$pid" 2>/dev/null; sleep 2; kill -KILL -- "-$pid" 2>/dev/null
    fi
  done
}

pack() {
  reap
  tar -czf "$OUT/session.tar.gz" -C "$WORK" "$(basename "$RUN")" 2>/dev/null
  log "packed $(du -h "$OUT/session.tar.gz" 2>/dev/null | cut -f1) into session.tar.gz; $(left)s of the budget left"
}
trap pack EXIT

# What the scheduler, the cgroup and the GPU did, before and after (diffed by summarize_system below).
snapshot() {
  local dir=$RUN/proc-$1
  mkdir -p "$dir"
  cp /proc/interrupts "$dir/interrupts" 2>/dev/null
  cp /proc/stat "$dir/stat" 2>/dev/null
  cat /proc/pressure/cpu > "$dir/pressure-cpu" 2>/dev/null
  cat /sys/fs/cgroup/cpu.stat > "$dir/cgroup-cpu.stat" 2>/dev/null
  timeout 10 nvidia-smi -q -d CLOCK,PERFORMANCE > "$dir/nvidia-smi-q.txt" 2>&1
}

system_info() {
  {
    echo "## $(date -u)"; uname -a; echo "nproc $(nproc)"
    lscpu 2>/dev/null
    echo "## thread siblings"; cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list 2>/dev/null | sort -u | tr '\n' ' '; echo
    echo "## cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null)  cpuset: $(cat /sys/fs/cgroup/cpuset.cpus.effective 2>/dev/null)"
    echo "## allowed CPUs: $(taskset -pc $$ 2>/dev/null)"
    echo "## scheduler"; for f in /proc/sys/kernel/sched_*; do [ -r "$f" ] && echo "$(basename "$f") $(cat "$f")"; done
    cat /sys/kernel/debug/sched/features 2>/dev/null
    echo "## cpufreq governor: $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)"
    echo "## idle states: $(cat /sys/devices/system/cpu/cpu0/cpuidle/state*/name 2>/dev/null | tr '\n' ' ')"
    echo "## nvidia"; timeout 10 nvidia-smi 2>&1 | head -20
    echo "## python"; $PY -c 'import sys; print(sys.version)'
    $PY -m pip list 2>/dev/null | grep -i -E '^(mlx|granian|litestar|msgspec|httpx|transformers|tokenizers) '
    echo "## repo"; git log -1 --format='%H %s' 2>/dev/null; git status --short 2>/dev/null | head -20
  } > "$RUN/system.txt" 2>&1
}

check_mlx() {
  $PY - <<'PY'
import mlx.core as mx
device = mx.default_device()
print("mlx", mx.__version__, "on", device)
import os
assert "gpu" in str(device) or os.environ.get("ALLOW_CPU"), \
    "MLX does not see a GPU: install mlx-cuda first (/work/shared/gpu/README.md)"
import granian, litestar, msgspec, httpx, mlx_lm  # noqa: F401  everything the gateway and the benches need
PY
}

make_model() {
  $PY - <<PY
import sys
sys.path.insert(0, "tests/benchmarks")
from bench_models import ensure_model
from pathlib import Path
print(ensure_model("$SHAPE", Path("$MODEL").parent))
PY
}
export -f check_mlx make_model  # `step` runs them under `timeout`, in a child bash

# Start a GPU clock sampler for at most $1 seconds (killed by stop_sampler or its own timeout).
start_sampler() {
  timeout "$1" nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,utilization.gpu,power.draw,pstate \
    --format=csv -lms 250 > "$RUN/gpu-clocks.csv" 2>&1 &
  SAMPLER=$!
}
stop_sampler() { kill "${SAMPLER:-0}" 2>/dev/null; wait "${SAMPLER:-0}" 2>/dev/null; }

summarize_system() {
  $PY - "$RUN" >> "$OUT/summary.md" 2>&1 <<'PY'
import sys
from pathlib import Path
run = Path(sys.argv[1])
def interrupts(p):
    rows = {}
    for line in (p / "interrupts").read_text().splitlines()[1:]:
        if "nvidia" in line.lower():
            parts = line.split()
            rows[parts[0]] = [int(x) for x in parts[1:] if x.isdigit()]
    return rows
def kv(p):
    try:
        return {k: int(v) for k, v in (line.split() for line in p.read_text().splitlines())}
    except (OSError, ValueError):
        return {}
before, after = run / "proc-before", run / "proc-after"
if before.is_dir() and after.is_dir():
    a, b = interrupts(before), interrupts(after)
    for irq in b:
        d = [y - x for x, y in zip(a.get(irq, [0] * len(b[irq])), b[irq])]
        busy = {cpu: n for cpu, n in enumerate(d) if n}
        print(f"- nvidia interrupts {irq} during the session, by CPU: {busy or 'none'}")
    c0, c1 = kv(before / "cgroup-cpu.stat"), kv(after / "cgroup-cpu.stat")
    if c1:
        print(f"- cgroup: nr_throttled +{c1.get('nr_throttled', 0) - c0.get('nr_throttled', 0)}, "
              f"throttled_usec +{c1.get('throttled_usec', 0) - c0.get('throttled_usec', 0)}")
    print(f"- CPU pressure after: {(after / 'pressure-cpu').read_text().strip() if (after / 'pressure-cpu').exists() else '?'}")
clocks = run / "gpu-clocks.csv"
if clocks.exists():
    rows = [r.split(", ") for r in clocks.read_text().splitlines()[1:] if r.count(",") >= 5]
    sm = sorted(int(r[1].split()[0]) for r in rows if r[1].split()[0].isdigit())
    if sm:
        print(f"- GPU SM clock over {len(sm)} samples: min {sm[0]}, median {sm[len(sm) // 2]}, max {sm[-1]} MHz; "
              f"pstates {sorted({r[5] for r in rows})}")
PY
}

session_stream() {
  note "# GPU session (stream): $(date -u)" "" "Repository: $(git log -1 --format='%h %s' 2>/dev/null)" ""
  step ceiling 150 "$PY" tests/benchmarks/bench_ceiling.py --model "$MODEL" --max-tokens "${TOKENS%%,*}" --batch-sizes "" \
    --repeats 3 --min-seconds 0 --out "$RUN/ceiling.json"
  $PY - "$RUN/ceiling.json" >> "$OUT/summary.md" 2>/dev/null <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"- stream_generate, {c['max_tokens']} tokens, in one process (no IPC, no HTTP): "
      f"{', '.join(f'{r:.0f}' for r in c['single_runs_tok_s'])} tok/s "
      f"({1000 / max(c['single_runs_tok_s']):.3f} ms/token at best); prompt {c['prompt_tokens']} tokens\n")
PY
  snapshot before
  start_sampler "$(left)"
  # c=1, 512 tokens: the solo path, where streaming lost ~1 ms a token; c=32, 128 tokens: the batch path.
  step stream $(( $(left) - 40 )) "$PY" tests/benchmarks/bench_stream_path.py --engine mlx --model "$MODEL" \
    --concurrency 1,32 --tokens "$TOKENS" --repeats 3 --trace --affinity none,split --timeout 120 \
    --startup-timeout 180 --work-dir "$RUN/stream" --out "$RUN/stream.json"
  stop_sampler
  snapshot after
  note "## Streamed vs whole, per token (medians of the repeats)" ""
  cat "$RUN/stream.md" >> "$OUT/summary.md" 2>/dev/null || note "(no table: see session.log)"
  note "" "## Timelines (µs; median and p90 over every token)" ""
  sed -n '/^### timeline/,/^$/p' "$RUN/stream.out" >> "$OUT/summary.md" 2>/dev/null
  note "" "## The machine during the session" ""
  summarize_system
}

# The tree of revision $1 into folder $2: from git, or (the device's copy of .git can be older than the
# working tree it carries) from .gpu-carry/before-$1.tar.gz, made here by `git archive $1 | gzip`.
before_tree() {
  git archive "$1" 2>/dev/null | tar -x -C "$2" 2>/dev/null && return 0
  [ -f ".gpu-carry/before-$1.tar.gz" ] && tar -xzf ".gpu-carry/before-$1.tar.gz" -C "$2"
}

session_streams() {
  note "# GPU session (streams): $(date -u)" "" "Repository: $(git log -1 --format='%h %s' 2>/dev/null)" ""
  local before="" which repo limit
  if [ -n "${BEFORE_REV:-}" ]; then
    before=$WORK/before-$BEFORE_REV
    rm -rf "$before" && mkdir -p "$before" && before_tree "$BEFORE_REV" "$before" \
      || { log "BEFORE_REV=$BEFORE_REV could not be archived; this revision only"; before=""; }
  fi
  for which in ${before:+before} now; do
    repo=$PWD limit=$(( $(left) - 30 ))
    [ "$which" = before ] && repo=$before limit=$(( $(left) / 2 ))
    step "streams-$which" "$limit" "$PY" \
      tests/benchmarks/bench_stream_path.py --repo "$repo" --engine mlx --model "$MODEL" \
      --concurrency "${LEVELS:-8,32,64,256}" --tokens 128 --repeats "${REPEATS:-3}" --modes stream --trace --health \
      --timeout 120 \
      --startup-timeout 180 --gateway-args "--max-running 64" --work-dir "$RUN/streams-$which" \
      --out "$RUN/streams-$which.json"
    note "## $which: $( [ "$which" = before ] && echo "$BEFORE_REV" || git log -1 --format=%h 2>/dev/null)" ""
    cat "$RUN/streams-$which.md" >> "$OUT/summary.md" 2>/dev/null || note "(no table: see session.log)"
    note "" "### Timelines (µs; TTFT split at the bottom)" ""
    sed -n '/^### timeline/,/^$/p' "$RUN/streams-$which.out" >> "$OUT/summary.md" 2>/dev/null
  done
  summarize_system
}

session_serving() {
  local dir=$WORK/serving-$SHAPE want=${SERVING_RUNS:-3} estimate=${SERVING_ESTIMATE_S:-330} began took
  mkdir -p "$dir"
  note "# GPU session (serving): $(date -u)" "" "Repository: $(git log -1 --format='%h %s' 2>/dev/null)" ""
  snapshot before
  while (( $(ls "$dir"/run-*.json 2>/dev/null | wc -l) < want )); do
    if (( $(left) < estimate + 25 )); then
      log "not starting another comparison: $(left)s left, one takes about ${estimate}s; call again"
      break
    fi
    local name
    name=run-$(date +%Y%m%d-%H%M%S)
    began=$(date +%s)
    step "serving-$name" $(( $(left) - 20 )) "$PY" tests/benchmarks/bench_serving.py --shape "$SHAPE" \
      --servers "${SERVERS:-mlx_lm,gateway}" --concurrency "${LEVELS:-1,8,32,64,256}" --requests-per-client 2 \
      --level-timeout 120 --startup-timeout 240 --ceiling-timeout 240 --gateway-args "${GATEWAY_ARGS:-}" \
      --work-dir "$RUN/$name" --out "$dir/$name.md"
    took=$(( $(date +%s) - began ))
    estimate=$(( took > 60 ? took : estimate ))
    if [ -f "$dir/$name.json" ]; then
      note "## $name (${took}s)" "" "$(cat "$dir/$name.md")" ""
    else
      log "$name left no result (see $RUN/serving-$name.err)"
      break
    fi
  done
  snapshot after
  summarize_system
  if ls "$dir"/run-*.json > /dev/null 2>&1; then
    $PY tests/benchmarks/bench_serving.py --merge "$dir"/run-*.json > "$OUT/serving-median.md" 2>> "$OUT/session.log"
    cp "$dir"/run-*.json "$dir"/run-*.md "$RUN/" 2>/dev/null
    for f in $(ls "$dir"/run-*.json | tail -n 4); do cp "$f" "$OUT/serving-$(basename "$f")"; done  # merge here too
    note "" "$(cat "$OUT/serving-median.md")"
    log "runs on this machine so far: $(ls "$dir"/run-*.json | wc -l) of $want (median in serving-median.md)"
  fi
}

session_agent() {
  note "# GPU session (agent): $(date -u)" "" "Repository: $(git log -1 --format='%h %s' 2>/dev/null)" ""
  step agent $(( $(left) - 20 )) "$PY" tests/benchmarks/bench_agent.py --shape "$SHAPE" --servers gateway,mlx_lm \
    --system-tokens "${SYSTEM_TOKENS:-12000}" --startup-timeout 240 --request-timeout 120 \
    --work-dir "$RUN/agent" --out "$RUN/agent.md"
  cat "$RUN/agent.md" >> "$OUT/summary.md" 2>/dev/null || note "(no table: see session.log)"
  cp "$RUN/agent.json" "$OUT/agent.json" 2>/dev/null
}

make_constrained_model() {
  $PY - <<PY
import sys
sys.path.insert(0, "tests/benchmarks")
from bench_constrained_serving import make_model
from pathlib import Path
print(make_model("$SHAPE", Path("$WORK/constrained-models")))
PY
}
export -f make_constrained_model

session_constrained() {
  note "# GPU session (constrained): $(date -u)" "" "Repository: $(git log -1 --format='%h %s' 2>/dev/null)" ""
  local before="" which repo limit
  mkdir -p "$WORK/constrained-models"
  step constrained-model 300 bash -c make_constrained_model || { note "The Qwen-format model could not be made."; return 1; }
  if [ -n "${BEFORE_REV:-}" ]; then
    before=$WORK/before-$BEFORE_REV
    rm -rf "$before" && mkdir -p "$before" && before_tree "$BEFORE_REV" "$before" \
      || { log "BEFORE_REV=$BEFORE_REV could not be archived; this revision only"; before=""; }
  fi
  for which in now ${before:+before}; do
    repo=$PWD limit=$(( $(left) - 30 ))
    [ -n "$before" ] && [ "$which" = now ] && limit=$(( ($(left) - 30) / 2 ))
    [ "$which" = before ] && repo=$before
    mkdir -p "$RUN/constrained-$which"
    ln -sfn "$WORK/constrained-models" "$RUN/constrained-$which/models"  # the model is made once
    step "constrained-$which" "$limit" env PYTHONPATH="$repo" "$PY" "$repo/tests/benchmarks/bench_constrained_serving.py" \
      --shape "$SHAPE" --concurrency "${LEVELS:-1,8}" --repeat "${REPEATS:-3}" \
      --requests-per-client "${REQUESTS_PER_CLIENT:-2}" --work-dir "$RUN/constrained-$which" \
      --out "$RUN/constrained-$which.md"
    note "## $which: $( [ "$which" = before ] && echo "$BEFORE_REV" || git log -1 --format=%h 2>/dev/null)" ""
    cat "$RUN/constrained-$which.md" >> "$OUT/summary.md" 2>/dev/null || note "(no table: see session.log)"
    cp "$RUN/constrained-$which.json" "$OUT/" 2>/dev/null
    note ""
  done
}

# Where the engine's and the gateway's CPU time goes at c=64: py-spy (carried as a wheel) samples both
# processes for PROFILE_S seconds in the middle of a long c=64 level, per thread (busy samples only).
session_profile() {
  note "# GPU session (profile): $(date -u)" "" "Repository: $(git log -1 --format='%h %s' 2>/dev/null)" ""
  command -v py-spy > /dev/null || { log "py-spy is not installed (carry its wheel in p2)"; return 1; }
  local level=${PROFILE_LEVEL:-64} seconds=${PROFILE_S:-15} engine="" gateway="" i
  "$PY" tests/benchmarks/bench_serving.py --shape "$SHAPE" --servers gateway --skip-ceiling \
    --concurrency "$level" --requests-per-client "${PROFILE_REQUESTS:-12}" --level-timeout 200 \
    --startup-timeout 240 --gateway-args "${GATEWAY_ARGS:-}" --work-dir "$RUN/profile" \
    --out "$RUN/profile.md" > "$RUN/profile-bench.out" 2> "$RUN/profile-bench.err" &
  local bench=$!
  for i in $(seq 1 240); do  # the engine process appears once the gateway starts it, as its child
    gateway=$(pgrep -n -f "gateway.cli serve")
    [ -n "$gateway" ] && engine=$(pgrep -n -P "$gateway" -f worker)
    [ -n "$engine" ] && break
    sleep 1
  done
  [ -z "$engine" ] && { log "no engine process appeared"; wait "$bench"; return 1; }
  # The level starts after the model loads and one warm-up round: poll the bench's log for the level.
  for i in $(seq 1 180); do grep -q "concurrency $level x" "$RUN/profile-bench.err" && break; sleep 1; done
  sleep "${PROFILE_DELAY_S:-4}"
  log "profiling engine $engine and gateway $gateway for ${seconds}s"
  py-spy record -p "$engine" -d "$seconds" -r 200 --threads --nonblocking -f raw \
    -o "$RUN/engine.folded" > "$RUN/py-spy-engine.log" 2>&1 &
  py-spy record -p "$gateway" -d "$seconds" -r 200 --threads --nonblocking -f raw \
    -o "$RUN/gateway.folded" > "$RUN/py-spy-gateway.log" 2>&1 &
  wait "$bench"
  wait
  cp "$RUN"/*.folded "$OUT/" 2>/dev/null
  tail -n 3 "$RUN"/py-spy-*.log >> "$OUT/session.log" 2>/dev/null
  cat "$RUN/profile.md" >> "$OUT/summary.md" 2>/dev/null || note "(no table: see session.log)"
  for f in "$RUN"/*.folded; do
    [ -f "$f" ] && "$PY" tests/benchmarks/folded_top.py "$f" --seconds "$seconds" --rate 200 >> "$OUT/summary.md" 2>&1
  done
}

log "gpu_session.sh $MODE: budget ${BUDGET_S}s, work in $RUN, results in $OUT"
system_info
if ! step check 120 bash -c check_mlx; then
  cat "$RUN/check.err" >> "$OUT/session.log"
  note "MLX is not usable on this machine (see session.log); nothing was measured."
  exit 1
fi
log "$(cat "$RUN/check.out")"
if [ "$MODE" != constrained ] && ! step model 240 bash -c make_model; then
  note "The benchmark model could not be made (see session.log)."
  exit 1
fi
case $MODE in
  stream) session_stream ;;
  serving) session_serving ;;
  streams) session_streams ;;
  agent) session_agent ;;
  constrained) session_constrained ;;
  profile) session_profile ;;
  *) log "unknown mode $MODE (stream, serving, streams, agent, constrained or profile)"; exit 2 ;;
esac
log "done"
