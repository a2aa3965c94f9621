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
# pause image the sandbox image that containerd runs), building what is missing; values already set are kept.
# hack/test-vm and hack/up --real-node need both.
real_node_inputs() {
  BERTH_NODE_BINS=${BERTH_NODE_BINS:-$(hack/node-bins | tail -n 1)}
  BERTH_IMAGES=${BERTH_IMAGES:-$(hack/build-image --pause-ref "$(cat "$BERTH_NODE_BINS/sandbox-image")" target/images |
    tail -n 1)}
  export BERTH_NODE_BINS BERTH_IMAGES
}
