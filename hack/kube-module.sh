# shellcheck shell=bash
# Sourced by hack/kube-bins (control plane) and hack/node-bins (kubelet, kube-proxy): the wrapper Go module that
# builds k8s.io/kubernetes commands from the Go module proxy, and the version ldflags of a release build.
# The caller defines log and die, and exports GOTOOLCHAIN=local GOFLAGS=-mod=mod.
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0 and its own replace lines are
# ignored when it is a dependency, so we re-create those replaces pointing at the published v0.X.Y modules.

# One Kubernetes version for the control plane and the node: a kubelet newer than the apiserver is unsupported.
K8S_VERSION=v1.37.2   # newest of 1.34-1.37 on the proxy; builds with Go 1.26

# kube_module DIR NAME: creates the Go module NAME in DIR, which requires k8s.io/kubernetes@$K8S_VERSION with every
# staging module replaced by its published v0.Y.Z, and leaves the shell in DIR.
kube_module() {
  local m=$1 name=$2 staging=v0.${K8S_VERSION#v1.}
  mkdir -p "$m" || die "cannot create $m"
  cd "$m" || die "cannot enter $m"
  go mod init "$name" >/dev/null 2>&1 || die "go mod init $name in $m"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p') \
    || die "go mod download k8s.io/kubernetes@$K8S_VERSION"
  [ -f "$gomod" ] || die "cannot download k8s.io/kubernetes@$K8S_VERSION go.mod from the module proxy"
  # Every `k8s.io/x => ./staging/src/k8s.io/x` becomes `k8s.io/x => k8s.io/x@v0.Y.Z`.
  local mods mod
  mods=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod")
  [ -n "$mods" ] || die "no staging replace lines found in $gomod"
  for mod in $mods; do go mod edit -replace="$mod=$mod@$staging" || die "go mod edit -replace=$mod=$mod@$staging"; done
  go get "k8s.io/kubernetes@$K8S_VERSION" >&2 || die "go get k8s.io/kubernetes@$K8S_VERSION"
}

# kube_ldflags: prints the -ldflags value that makes the binaries report $K8S_VERSION as a release build does.
kube_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  printf '%s\n' "$ld"
}
