# Shared by the hack/ scripts: timing of phases and the PATH of pip-installed tools.

# pip installs console scripts (vng) next to the interpreter; make sure they are found even without pyenv shims.
if command -v python3 >/dev/null; then
  PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
  export PATH
fi

# phase NAME COMMAND...: runs COMMAND, then prints how long it took; a failing phase fails the script.
phase() {
  local name=$1; shift
  local start=$SECONDS
  printf '\n=== %s\n' "$name" >&2
  "$@"
  printf '=== %s: %d s\n' "$name" "$((SECONDS - start))" >&2
}

# real_node_inputs: exports BERTH_NODE_BINS (hack/node-bins) and BERTH_IMAGES (hack/build-image target/images, its
# pause image the sandbox image that containerd runs, with the PostgreSQL image the real-node test runs), building
# what is missing; values already set are kept.
# hack/test-vm and hack/up --real-node need both.
real_node_inputs() {
  BERTH_NODE_BINS=${BERTH_NODE_BINS:-$(hack/node-bins | tail -n 1)}
  BERTH_IMAGES=${BERTH_IMAGES:-$(real_node_images "$BERTH_NODE_BINS" | tail -n 1)}
  export BERTH_NODE_BINS BERTH_IMAGES
}

# real_node_images NODE_BINS: builds the real node's images into target/images (hack/build-image; the last line on
# stdout is that directory) for the node binaries in NODE_BINS (hack/node-bins' output).
real_node_images() {
  hack/build-image --postgres --pause-ref "$(cat "$1/sandbox-image")" target/images
}

# Builds that later phases need, run in the background while the test phases before them leave cores idle (the
# end-to-end tests leave about half of two cores idle: they mostly wait for the control plane). Niced to 19, so a
# test phase beside them gets the CPU when it wants it; they still slow it (their writes delay the tests' fsyncs,
# and nice does not reach the disk): the end-to-end phase took 940 s beside cold builds, 733 s without
# (docs/fuzzing.md, "What it costs CI").
#
# background NAME [--after OTHER] COMMAND...: starts COMMAND niced in its own process group (once OTHER, started
#   before, has ended, whatever its result); its output goes to target/background/NAME.log, and the last line of its
#   stdout to target/background/NAME.out.
# await NAME: waits for it, prints how long it ran and how long the caller waited; a failed one's log tail is
#   printed and await fails. stop_background (an EXIT trap) kills what is still running.
declare -A background_pids=() background_started=()
background() {
  local name=$1 after=; shift
  if [ "${1:-}" = --after ]; then after=${background_pids[$2]:-}; shift 2; fi
  local dir=target/background
  mkdir -p "$dir"
  rm -f "$dir/$name.out"
  printf '=== %s: started in the background (nice 19%s), its output in %s/%s.log\n' "$name" \
    "${after:+, after the one before}" "$dir" "$name" >&2
  # setsid: its own process group, so that stop_background reaches cargo's and go's children too. The timer starts
  # when the command does, not while it waits for the one before.
  setsid -w nice -n 19 bash -c '
    log=$0.log; after=$1; shift
    [ -z "$after" ] || tail --pid="$after" -f /dev/null
    start=$SECONDS
    set -o pipefail
    : > "$log"
    "$@" 2>>"$log" | tee -a "$log" | tail -n 1 > "$0.out"
    rc=$?
    echo "ran $((SECONDS - start)) s, exit $rc" >> "$log"
    exit $rc' "$dir/$name" "$after" "$@" &
  background_pids[$name]=$!
  background_started[$name]=$SECONDS
}
await() {
  local name=$1 rc=0 waited=$SECONDS
  wait "${background_pids[$name]}" || rc=$?
  unset "background_pids[$name]"
  printf '=== %s (background): %s, %d s after it was started (%s); waited %d s for it here\n' "$name" \
    "$([ $rc -eq 0 ] && echo done || echo "FAILED (exit $rc)")" \
    "$((SECONDS - background_started[$name]))" "$(tail -n 1 "target/background/$name.log")" \
    "$((SECONDS - waited))" >&2
  if [ $rc -ne 0 ]; then
    tail -n 40 "target/background/$name.log" >&2
    return $rc
  fi
}
stop_background() {
  local pid
  for pid in "${background_pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
}
