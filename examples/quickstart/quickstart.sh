#!/usr/bin/env bash
# Lifeboat quickstart: protect a real VM block layer on this machine with standalone Lifeboat,
# no cluster and no cloud account. It
#   1. starts qemu-storage-daemon with a 64 MiB qcow2 disk (QMP + an NBD export the "guest"
#      writes through with qemu-io), as QEMU would run a VM's disks;
#   2. writes a ReplicationPolicy (local folder target, 30 s copy frequency) and a ProtectedVM;
#   3. runs `lifeboat standalone` on them: initial replication, then a delta cycle every 30 s;
#   4. writes to the disk as the guest, waits for a cycle to ship it, lists the recovery points,
#      runs a test failover and compares the materialised disk with the source, then cleans up.
# Everything it runs is the production code path. Needs: Rust (cargo), qemu-utils.
#
#   examples/quickstart/quickstart.sh            # keeps its folder and prints where it is
#   LIFEBOAT=/path/to/lifeboat examples/quickstart/quickstart.sh   # use a built binary
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
work=${LIFEBOAT_QUICKSTART_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/lifeboat-quickstart.XXXXXX")}
mkdir -p "$work"/{manifests,state,replicas,failover}
work=$(cd "$work" && pwd)
if [ -z "${LIFEBOAT:-}" ]; then
  echo "== building lifeboat (cargo build -p lifeboat)"
  (cd "$here" && cargo build --quiet -p lifeboat)
  LIFEBOAT="$here/target/debug/lifeboat"
fi
for tool in qemu-img qemu-io qemu-storage-daemon; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing: install Debian's qemu-utils" >&2; exit 1; }
done

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== the VM: a 64 MiB qcow2 disk served by qemu-storage-daemon in $work"
qemu-img create -q -f qcow2 "$work/web-01-root.qcow2" 64M
qemu-io -f qcow2 "$work/web-01-root.qcow2" -c 'write -q -P 0x42 0 8M' -c 'write -q -P 0x43 32M 4M' >/dev/null
qemu-storage-daemon \
  --blockdev "driver=file,node-name=root-file,filename=$work/web-01-root.qcow2" \
  --blockdev driver=qcow2,node-name=root,file=root-file \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=guest,node-name=root,name=root,writable=on \
  --chardev "socket,path=$work/qmp.sock,server=on,wait=off,id=qmp0" --monitor chardev=qmp0 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/qmp.sock" ] && [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
guest="nbd+unix:///root?socket=$work/nbd.sock"

echo "== the manifests (the same ones kubectl apply takes)"
cat > "$work/manifests/policy.yaml" <<YAML
apiVersion: lifeboat.io/v1alpha1
kind: ReplicationPolicy
metadata: {name: local-30s, namespace: default}
spec:
  copyFrequency: 30s
  recoveryPointRetentionHours: 1
  target:
    local: {path: $work/replicas}
YAML
cat > "$work/manifests/web-01.yaml" <<YAML
apiVersion: lifeboat.io/v1alpha1
kind: ProtectedVM
metadata: {name: web-01, namespace: default}
spec:
  vmName: web-01
  nodeName: $(hostname)
  hypervisor:
    qemu: {qmpSocket: $work/qmp.sock}
  disks:
    - {name: root, path: $work/web-01-root.qcow2, blockNode: root}
  policyRef: {name: local-30s}
YAML
"$LIFEBOAT" validate "$work"/manifests/*.yaml

echo "== lifeboat standalone (log: $work/lifeboat.log)"
RUST_LOG=${RUST_LOG:-info} "$LIFEBOAT" standalone --manifests "$work/manifests" --state-dir "$work/state" \
  --failover-dir "$work/failover" >"$work/lifeboat.log" 2>&1 &
pids+=($!)
lb() { "$LIFEBOAT" "$@" --state-dir "$work/state"; }
points() { lb status --json | sed -n 's/.*"count": \([0-9]*\).*/\1/p' | head -1; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq "$seconds"); do "$@" && return 0; sleep 1; done
  echo "error: timed out waiting for $what; the daemon's log:" >&2; tail -n 30 "$work/lifeboat.log" >&2; exit 1
}
protected() { lb status | grep -q ' Protected ' && [ "$(points)" -ge 1 ]; }
wait_for 120 "initial replication and the first recovery point" protected
echo "== initial replication done, first recovery point cut:"
lb status

echo "== the guest writes 2 MiB at 16 MiB; the next cycle ships it"
before=$(points)
qemu-io -f raw "$guest" -c 'write -q -P 0x77 16M 2M' >/dev/null
more_points() { [ "$(points)" -gt "$before" ]; }
wait_for 90 "a delta cycle" more_points
lb status
echo "== recovery points:"
lb points web-01

echo "== test failover to the latest point"
lb failover web-01 --test
image="$work/failover/web-01-test-root.img"
qemu-img convert -O raw --image-opts "driver=nbd,server.type=unix,server.path=$work/nbd.sock,export=root" "$work/source.raw"
if cmp -s "$image" "$work/source.raw"; then
  echo "== the test failover disk equals the source, byte for byte"
else
  echo "error: the test failover disk differs from the source" >&2; exit 1
fi
lb cleanup web-01
rm -f "$work/source.raw"
echo "== done. Everything is in $work (replicas in $work/replicas, state in $work/state)."
