# The real node's boot script, run as root in the qemu guest by tests/src/real_node/mod.rs after vm.rs has set up
# the network. It turns the guest into a Kubernetes node: containerd, kube-proxy and kubelet from hack/node-bins,
# the images from hack/build-image, and the disks an administrator would prepare for Berth's pools. Then it
# waits: the node runs until the host kills the guest, or asks it to shut down (RealNode::reboot).
# With BERTH_NODE_MODE=bake it instead prepares the node's state disk once (tests/src/real_node/baked.rs keeps it
# and boots every node on a copy-on-write overlay of it): the node binaries copied onto it, every image imported
# into containerd's store, the key BERTH_NODE_KEY written; then it exits. Every step logs a line (node: …) to the
# console and long outputs go to files in $BERTH_NODE_LOGS, which the host keeps.
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

# containerd with this node's configuration, its logs in containerd.log; the PID in $containerd.
start_containerd() {
  log "starting containerd"
  containerd --config "$cfg/containerd.toml" >>"$logs/containerd.log" 2>&1 &
  containerd=$!
  for _ in $(seq 300); do ctr version >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "containerd did not answer within 60 s (see containerd.log)"
}

# import_images FILE...: imports those archives of $BERTH_IMAGES into containerd's k8s.io namespace.
import_images() {
  local file t
  for file in "$@"; do
    t=$SECONDS
    # --local: the client reads the archive and skips every blob containerd has; through the transfer API the
    # whole archive is streamed to containerd again (70 s for Berth's 73 MB image under TCG, its content all
    # baked already).
    ctr -n k8s.io images import --local "$BERTH_IMAGES/$file" >>"$logs/images.log" 2>&1 ||
      { echo "node: FAILED: importing $file (see images.log)"; return 1; }
    log "imported $file in $((SECONDS - t)) s"
  done
}

if [ "${BERTH_NODE_MODE:-run}" = bake ]; then
  # Lazy inode tables, never initialised (noinit_itable): the disk stays sparse, the cached copy small.
  step "mkfs of the state disk" mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$state"
  step "mounting the state disk" mount -o noinit_itable "$state" /var/lib
  mkdir -p /var/lib/node/bin /var/lib/node/cni/bin
  # Go binaries run from the 9p root are about twice as slow: copy them onto the disk.
  step "copying the node binaries" cp "$BERTH_NODE_BINS"/kubelet "$BERTH_NODE_BINS"/kube-proxy \
    "$BERTH_NODE_BINS"/containerd "$BERTH_NODE_BINS"/ctr "$BERTH_NODE_BINS"/containerd-shim-runc-v2 \
    "$BERTH_NODE_BINS"/runc /var/lib/node/bin/
  step "copying the CNI plugins" cp "$BERTH_NODE_BINS"/cni/bin/* /var/lib/node/cni/bin/
  step "loading overlay" modprobe overlay
  start_containerd
  # shellcheck disable=SC2046 # every archive the list names
  import_images $(cut -d' ' -f1 "$BERTH_IMAGES/images") || fail "the images were not imported"
  kill -TERM "$containerd" && wait "$containerd"
  echo "$BERTH_NODE_KEY" >/var/lib/node/baked
  step "unmounting the state disk" umount /var/lib
  log "baked"
  exit 0
fi

step "mounting the state disk" mount -o noinit_itable "$state" /var/lib
[ "$(cat /var/lib/node/baked 2>/dev/null)" = "$BERTH_NODE_KEY" ] ||
  fail "the state disk is not the baked disk of key $BERTH_NODE_KEY (it has: $(cat /var/lib/node/baked 2>&1))"
mkdir -p /var/lib/node/log /var/lib/berth/pools
step "mounting /var/log" mount --bind /var/lib/node/log /var/log
# containerd needs shared mount propagation for HostToContainer and Bidirectional volume mounts.
step "making / rshared" mount --make-rshared /

# What an administrator prepares for Berth's pools (deploy/agent/agent.toml and the tests' configs name them):
# an XFS disk mounted with project quotas, and a volume group.
# Made on the first boot; a later boot (RealNode::reboot) finds them as they were left.
xfs=$(by_serial node-xfs.img) || fail "no XFS disk"
mkdir -p /var/lib/berth/pools/quota
if blkid -p "$xfs" >/dev/null 2>&1; then
  log "the XFS disk has its filesystem (a later boot)"
else
  step "mkfs.xfs" mkfs.xfs -q -f "$xfs"
fi
step "mounting the XFS disk with prjquota" mount -o prjquota "$xfs" /var/lib/berth/pools/quota
vgdisk=$(by_serial node-lvm.img) || fail "no LVM disk"
# loop: kubelet holds every raw block volume it maps into a pod open through a loop device of its own
# (`losetup -f` of the device's node in its plugin directory; without the module the pod never starts).
step "loading device-mapper, loop" modprobe -a dm_mod dm_thin_pool loop
if lvm vgs berth >/dev/null 2>&1; then
  log "the volume group berth exists (a later boot)"
else
  step "pvcreate" lvm pvcreate -q "$vgdisk"
  step "vgcreate" lvm vgcreate -q berth "$vgdisk"
fi

# Networking for pods and Services: bridged pod traffic through iptables (kube-proxy's rules), forwarding on.
# nf_conntrack: kube-proxy sets its timeouts in /proc/sys/net/netfilter at start and exits without it.
step "loading br_netfilter, overlay, nf_conntrack" modprobe -a br_netfilter overlay nf_conntrack
step "sysctls" sysctl -q -w net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
# Pods' traffic to outside their range (the API server at 10.0.2.2) leaves with the node's address.
step "masquerading the pod range" iptables -t nat -A POSTROUTING -s "$BERTH_POD_CIDR" ! -d "$BERTH_POD_CIDR" -j MASQUERADE

start_containerd
# The images the baked disk does not hold (BERTH_NODE_IMPORT: Berth's own, new with every build, from an archive
# without its Debian base layer, which is baked) are imported while kubelet starts and registers: the host waits
# for both, the Node Ready and the marker images.imported in the logs directory. A failed import ends the node.
# shellcheck disable=SC2086 # a list of file names
(import_images $BERTH_NODE_IMPORT && : >"$logs/images.imported") &
imports=$!

log "starting kube-proxy and kubelet"
# Appended to: a later boot's lines follow the first's.
kube-proxy --config "$cfg/kube-proxy.yaml" >>"$logs/kube-proxy.log" 2>&1 &
proxy=$!
start_kubelet() {
  kubelet --config "$cfg/kubelet.yaml" --kubeconfig "$cfg/kubelet.kubeconfig" --node-ip 10.0.2.15 \
    --hostname-override "$BERTH_NODE_NAME" --node-labels "kubernetes.io/hostname=$BERTH_NODE_HOSTNAME" \
    >>"$logs/kubelet.log" 2>&1 &
  kubelet=$!
}
start_kubelet
log "node started"
# What the guest's CPUs do (under emulation they are what every step waits for): top every 20 s in top.log.
(while sleep 20; do date +%T; top -b -n 1 -w 160 | head -n 18; done) >>"$logs/top.log" 2>&1 &

# The host asks for a shutdown (RealNode::reboot) by creating the file `shutdown` in the logs directory (9p
# without a cache: the guest sees it at once). What a reboot does to a node, in order: kubelet and kube-proxy
# stop, the pods' processes are killed, containerd stops, the disks are synced; then the guest powers off.
(while [ ! -e "$logs/shutdown" ]; do sleep 1; done) &
asked=$!
# The host stops kubelet alone (RealNode::stop_kubelet: the file `kubelet-stop`), as an administrator or a crash
# would: the pods' containers and their mounts stay. node.sh answers `kubelet-stopped` once it has exited, and
# starts it again when asked (`kubelet-start`), answering `kubelet-started`.
watch_stop() { (while [ ! -e "$logs/kubelet-stop" ]; do sleep 1; done) & stop_asked=$!; }
watch_stop
stop_kubelet_until_asked() {
  log "stopping kubelet (asked)"
  kill -TERM "$kubelet" 2>/dev/null
  wait "$kubelet"
  rm -f "$logs/kubelet-stop" "$logs/kubelet-started"
  : >"$logs/kubelet-stopped"
  log "kubelet stopped"
  while [ ! -e "$logs/kubelet-start" ] && [ ! -e "$logs/shutdown" ]; do sleep 1; done
  rm -f "$logs/kubelet-start" "$logs/kubelet-stopped"
  start_kubelet
  : >"$logs/kubelet-started"
  log "kubelet started again"
  watch_stop
}
shutdown_node() {
  log "shutting down: kubelet, kube-proxy, the pods' processes, containerd"
  kill -TERM "$kubelet" "$proxy" 2>/dev/null
  wait "$kubelet" "$proxy"
  for task in $(ctr -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1
  done
  kill -TERM "$containerd" && wait "$containerd"
  sync
  log "shut down"
  exit 0
}

# Either daemon exiting, or a failed import, ends the node: the host sees the guest stop and reports this line and
# the logs.
while :; do
  wait -n -p done "$kubelet" "$proxy" "$asked" "$stop_asked" ${imports:+"$imports"}
  rc=$?
  case $done in
    "$asked") shutdown_node ;;
    "$stop_asked") stop_kubelet_until_asked ;;
    "$imports") [ "$rc" = 0 ] || fail "the images were not imported"; imports= ;;
    "$proxy") fail "kube-proxy exited ($rc); the end of kube-proxy.log: $(tail -n 20 "$logs/kube-proxy.log")" ;;
    *) fail "kubelet exited ($rc); the end of kubelet.log: $(tail -n 20 "$logs/kubelet.log")" ;;
  esac
done
