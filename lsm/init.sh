#!/bin/busybox sh
# /init of the `make test-lsm` guest (runs as PID 1 from the initramfs).
#
# Mounts the host's root read-only over 9p, loads the SELinux policy, switches to
# enforcing and runs the project's tests/lsm with the project's own .venv inside a chroot.
# Everything the host needs to know is printed as `LSM-...` lines on the serial console.
# Parameters arrive from the kernel command line as environment variables:
#   lsm_root    the repository's absolute path on the host (e.g. /work/main)
#   lsm_policy  the compiled policy's absolute path on the host
#   lsm_args    extra pytest arguments, comma-separated (optional)
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "LSM-INIT-FAIL $*"
    poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# busybox insmod resolves no dependencies: the order matters.
for module in $(cat /modules.order); do
    insmod "/lib/modules/$module.ko" || fail "insmod $module"
done

# Loopback for the tests' TCP connections (the fds a handoff carries).
ifconfig lo 127.0.0.1 up || fail "loopback"

mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host \
    || fail "mount 9p hostroot"
mount -t proc proc /host/proc || fail "mount /host/proc"
mount -t sysfs sysfs /host/sys || fail "mount /host/sys"
mount -t devtmpfs devtmpfs /host/dev || fail "mount /host/dev"
mount -t securityfs securityfs /host/sys/kernel/security 2>/dev/null
mount -t selinuxfs selinuxfs /host/sys/fs/selinux || fail "mount selinuxfs"
# The shared tree is read-only: sockets and temporary files go to a tmpfs.
mkdir -p /host/dev/shm && mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
# A checkout under /tmp (CI may clone there) must stay visible under that tmpfs.
case "$lsm_root" in /tmp/*)
    mkdir -p /host/dev/shm/.host-tmp && mount -o bind /host/tmp /host/dev/shm/.host-tmp \
        || fail "bind the host's /tmp" ;;
esac
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "mount tmpfs /host/tmp"
case "$lsm_root" in /tmp/*)
    mkdir -p "/host$lsm_root" \
        && mount -o bind "/host/dev/shm/.host-tmp/${lsm_root#/tmp/}" "/host$lsm_root" \
        || fail "bind the checkout $lsm_root" ;;
esac

# The policy must reach the kernel in one write(): dd with a block larger than the file.
dd if="/host$lsm_policy" of=/host/sys/fs/selinux/load bs=4M 2>/dev/null \
    || fail "load policy $lsm_policy"
echo 1 > /host/sys/fs/selinux/enforce || fail "set enforcing"
echo
echo "LSM-ENFORCE $(cat /host/sys/fs/selinux/enforce)"
echo "LSM-KERNEL $(uname -r)"

args=$(echo "${lsm_args:-}" | tr ',' ' ')
# The subshell (not PID 1) enters the runner's domain; pytest and its children inherit it.
(
    echo -n "u:r:handoffd_runner_t" > /proc/self/attr/current || exit 97
    exec chroot /host /usr/bin/env -i \
        PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 \
        PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HANDOFFD_LSM_GUEST=1 \
        /bin/sh -c "cd '$lsm_root' && exec .venv/bin/python -m pytest tests/lsm \
            -p no:cacheprovider -p no:hypothesispytest -q -rA --color=no $args"
)
echo "LSM-EXIT $?"
poweroff -f
