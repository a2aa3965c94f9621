# The real node's boot script, run as root in the qemu guest by tests/src/real_node/mod.rs after vm.rs has set up
# the network. It turns the guest into a Kubernetes node: containerd, kube-proxy and kubelet from hack/node-bins,
# the images from hack/build-image imported, and the disks an administrator would prepare for Berth's pools.
# Then it waits: the node runs until the host kills the guest. Every step logs a line (node: …) to the console and
# long outputs go to files in $BERTH_NODE_LOGS, which the host keeps.
set -u
export PATH=/var/lib/node/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
log() { echo "node: $(date +%T) $*"; }
fail() { echo "node: FAILED: $*"; exit 1; }
step() { local what=$1; shift; "$@" || fail "$what ($*)"; }
by_serial() {
  local d
  for d in /sys/block/*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  return 1
}
cfg=$BERTH_NODE_DIR
logs=$BERTH_NODE_LOGS

# State on a virtual disk: the guest's root is the host's, read-only. /var/lib holds kubelet's, containerd's, CNI's
# and Berth's state (nothing of the host's /var/lib is needed in the guest); /var/log holds the pods' logs.
state=$(by_serial node-state.img) || fail "no state disk"
step "mkfs of the state disk" mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$state"
step "mounting the state disk" mount -o noinit_itable "$state" /var/lib
mkdir -p /var/lib/node/bin /var/lib/node/cni/bin /var/lib/node/log /var/lib/berth/pools
step "mounting /var/log" mount --bind /var/lib/node/log /var/log
# containerd needs shared mount propagation for HostToContainer and Bidirectional volume mounts.
step "making / rshared" mount --make-rshared /
# Go binaries run from the 9p root are about twice as slow: copy them onto the disk.
step "copying the node binaries" cp "$BERTH_NODE_BINS"/kubelet "$BERTH_NODE_BINS"/kube-proxy "$BERTH_NODE_BINS"/containerd \
  "$BERTH_NODE_BINS"/ctr "$BERTH_NODE_BINS"/containerd-shim-runc-v2 "$BERTH_NODE_BINS"/runc /var/lib/node/bin/
step "copying the CNI plugins" cp "$BERTH_NODE_BINS"/cni/bin/* /var/lib/node/cni/bin/

# What an administrator prepares for Berth's pools (deploy/agent/agent.toml and the tests' configs name them):
# an XFS disk mounted with project quotas, and a volume group.
xfs=$(by_serial node-xfs.img) || fail "no XFS disk"
mkdir -p /var/lib/berth/pools/quota
step "mkfs.xfs" mkfs.xfs -q -f "$xfs"
step "mounting the XFS disk with prjquota" mount -o prjquota "$xfs" /var/lib/berth/pools/quota
vgdisk=$(by_serial node-lvm.img) || fail "no LVM disk"
step "loading device-mapper" modprobe -a dm_mod dm_thin_pool
step "pvcreate" lvm pvcreate -q "$vgdisk"
step "vgcreate" lvm vgcreate -q berth "$vgdisk"

# Networking for pods and Services: bridged pod traffic through iptables (kube-proxy's rules), forwarding on.
# nf_conntrack: kube-proxy sets its timeouts in /proc/sys/net/netfilter at start and exits without it.
step "loading br_netfilter, overlay, nf_conntrack" modprobe -a br_netfilter overlay nf_conntrack
step "sysctls" sysctl -q -w net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

log "starting containerd"
containerd --config "$cfg/containerd.toml" >"$logs/containerd.log" 2>&1 &
for _ in $(seq 300); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
ctr version >/dev/null 2>&1 || fail "containerd did not answer within 60 s (see containerd.log)"
# The images are imported while kubelet starts and registers (each takes about 40 s under TCG): the host waits for
# both, the Node Ready and the marker images.imported in the logs directory. A failed import ends the node.
import_images() {
  local file ref t
  while read -r file ref; do
    t=$SECONDS
    ctr -n k8s.io images import "$BERTH_IMAGES/$file" >>"$logs/images.log" 2>&1 ||
      { echo "node: FAILED: importing $ref (see images.log)"; exit 1; }
    log "imported $ref in $((SECONDS - t)) s"
  done <"$BERTH_IMAGES/images"
  : >"$logs/images.imported"
}
import_images &
imports=$!

log "starting kube-proxy and kubelet"
kube-proxy --config "$cfg/kube-proxy.yaml" >"$logs/kube-proxy.log" 2>&1 &
proxy=$!
kubelet --config "$cfg/kubelet.yaml" --kubeconfig "$cfg/kubelet.kubeconfig" --node-ip 10.0.2.15 \
  --hostname-override "$BERTH_NODE_NAME" --node-labels "kubernetes.io/hostname=$BERTH_NODE_HOSTNAME" \
  >"$logs/kubelet.log" 2>&1 &
kubelet=$!
log "node started"
# Either daemon exiting, or a failed import, ends the node: the host sees the guest stop and reports this line and
# the logs.
while :; do
  wait -n -p done "$kubelet" "$proxy" ${imports:+"$imports"}
  rc=$?
  case $done in
    "$imports") [ "$rc" = 0 ] || fail "the images were not imported"; imports= ;;
    "$proxy") fail "kube-proxy exited ($rc); the end of kube-proxy.log: $(tail -n 20 "$logs/kube-proxy.log")" ;;
    *) fail "kubelet exited ($rc); the end of kubelet.log: $(tail -n 20 "$logs/kubelet.log")" ;;
  esac
done
