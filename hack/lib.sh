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
