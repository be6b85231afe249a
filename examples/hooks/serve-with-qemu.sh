#!/bin/sh
# A RecoveryPlan hook: serve every recovered disk of the group's VMs with qemu-storage-daemon,
# over NBD on a unix socket, where a VM started on the recovered disks finds its storage
# (`qemu-system-x86_64 -drive file=nbd+unix:///root?socket=DIR/web-01-root.sock`, or a
# libvirt <disk type='network'> of protocol nbd). At the cleanup of a test failover it stops
# them again, before the disks are removed, and so it does at a failback (LIFEBOAT_ACTION
# Failback, as a ProtectedVM's recoveredVm hook: the recovered VM was stopped and its last
# writes shipped; the VM runs at the primary site again).
#
#   serve-with-qemu.sh DIR     DIR: where the sockets and pid files go (created)
#
# Lifeboat gives the hook LIFEBOAT_ACTION, LIFEBOAT_VMS (the group's VMs) and, per VM,
# LIFEBOAT_DISKS_<VM> (upper case, `_` for other characters): one disk=location line per
# recovered disk.
set -eu

dir=${1:?usage: serve-with-qemu.sh DIR}
mkdir -p "$dir"
# A commit changes nothing the disks' servers see.
[ "$LIFEBOAT_ACTION" != Commit ] || exit 0

for vm in $LIFEBOAT_VMS; do
    if [ "$LIFEBOAT_ACTION" = CleanupTestFailover ] || [ "$LIFEBOAT_ACTION" = Failback ]; then
        for pid in "$dir/$vm"-*.pid; do
            [ -f "$pid" ] || continue
            kill "$(cat "$pid")" 2>/dev/null || true
            rm -f "$pid" "${pid%.pid}.sock"
            echo "stopped ${pid%.pid}.sock"
        done
        continue
    fi
    key=$(printf '%s' "$vm" | tr '[:lower:]' '[:upper:]' | tr -c 'A-Z0-9' '_')
    eval "disks=\${LIFEBOAT_DISKS_$key:-}"
    if [ -z "$disks" ]; then
        echo "no recovered disks for $vm (LIFEBOAT_DISKS_$key is empty)" >&2
        exit 1
    fi
    printf '%s\n' "$disks" | while IFS='=' read -r disk path; do
        [ -n "$disk" ] || continue
        case "$path" in
            *.qcow2) format=qcow2 ;;
            *) format=raw ;;
        esac
        socket="$dir/$vm-$disk.sock"
        pid="$dir/$vm-$disk.pid"
        if [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; then
            kill "$(cat "$pid")"
        fi
        rm -f "$socket"
        # NB: a comma in an option value is written as two (QEMU's option syntax).
        file=$(printf '%s' "$path" | sed 's/,/,,/g')
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=file,filename=$file" \
            --blockdev "driver=$format,node-name=disk,file=file" \
            --nbd-server "addr.type=unix,addr.path=$socket" \
            --export "type=nbd,id=export,node-name=disk,name=$disk,writable=on" \
            --pidfile "$pid" --daemonize
        echo "serving $vm disk $disk ($path) at $socket"
    done
done
