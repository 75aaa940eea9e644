#!/usr/bin/env bash
# `make test-lsm`: run tests/lsm under real SELinux labels in a qemu guest.
#
# This host's kernel has no LSM that labels sockets (SO_PEERSEC -> ENOPROTOOPT), so the
# guest boots Debian's own kernel (downloaded, unpacked, never installed) with SELinux
# enforcing a tiny CIL policy (lsm/policy.cil), mounts this host's root read-only over
# 9p and runs the project's tests/lsm with the project's .venv.  Results come back as
# `LSM-...` lines on the serial console.  Everything built lives under .lsm/ and is
# reused: the kernel .deb and its unpacked tree, the initramfs and the policy (rebuilt
# only when their inputs change).
#
# Environment: LSM_TIMEOUT (seconds, default 600), LSM_MIN_CASES (default 35),
# LSM_PYTEST_ARGS (extra pytest arguments, comma-separated, no spaces),
# LSM_KERNEL_SUITE (boot the kernel of another Debian suite instead of this host's apt
# candidate, e.g. trixie-backports: fetched from deb.debian.org and verified against the
# suite's InRelease signed by Debian's archive keyring), LSM_MODULES (the modules to load,
# for a kernel whose built-in set differs).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LSM_DIR="$ROOT/.lsm"
TIMEOUT=${LSM_TIMEOUT:-600}
MIN_CASES=${LSM_MIN_CASES:-35}
# Modules the Debian kernel needs, in dependency order: virtio-9p for the host's root;
# then kernel TLS (the tls ULP) and the AEADs TLS 1.3 uses, for the kTLS tests.  The
# guest has no modprobe, so nothing is loaded on demand.
MODULES=${LSM_MODULES:-"virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
9pnet 9pnet_virtio netfs fscache 9p
gf128mul ghash-generic ctr gcm libchacha chacha_generic libpoly1305 poly1305_generic
chacha20poly1305 tls"}
KERNEL_SUITE=${LSM_KERNEL_SUITE:-}
MIRROR=http://deb.debian.org/debian
ARCHIVE_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PACKAGES="qemu-system-x86 busybox-static cpio secilc zstd xz-utils"

say() { echo "test-lsm: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

ensure_packages() {
    local missing=""
    command -v qemu-system-x86_64 >/dev/null || missing="$missing qemu-system-x86"
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
        || missing="$missing busybox-static"
    command -v cpio >/dev/null || missing="$missing cpio"
    command -v secilc >/dev/null || missing="$missing secilc"
    command -v zstd >/dev/null || missing="$missing zstd"
    command -v xz >/dev/null || missing="$missing xz-utils"
    if [ -n "$KERNEL_SUITE" ]; then
        command -v curl >/dev/null || missing="$missing curl"
        command -v gpgv >/dev/null || missing="$missing gpgv"
        [ -s "$ARCHIVE_KEYRING" ] || missing="$missing debian-archive-keyring"
    fi
    [ -z "$missing" ] && return 0
    say "installing Debian packages:$missing"
    command -v apt-get >/dev/null || die "apt-get not found; install:$missing"
    if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
        die "not root and no sudo; install:$missing"
    fi
    as_root apt-get update -q >/dev/null || die "apt-get update failed"
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        $missing >/dev/null || die "apt-get install$missing failed"
}

# Prints the name of the kernel image package linux-image-amd64 currently depends on,
# falling back to the last one used when apt-cache cannot answer (offline re-run).
kernel_dependency() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

resolve_kernel_package() {
    local pkg
    pkg=$(kernel_dependency)
    if [ -z "$pkg" ] && [ ! -s "$LSM_DIR/kernel-package" ]; then
        # A fresh machine may have no package lists yet (e.g. a slim container image).
        as_root apt-get update -q >/dev/null 2>&1 && pkg=$(kernel_dependency)
    fi
    if [ -z "$pkg" ] && [ -s "$LSM_DIR/kernel-package" ]; then
        pkg=$(cat "$LSM_DIR/kernel-package")
    fi
    [ -n "$pkg" ] || die "cannot resolve linux-image-amd64's kernel package (apt-cache)"
    echo "$pkg"
}

fetch_kernel() {
    local pkg=$1 deb
    mkdir -p "$LSM_DIR/debs"
    deb=$(find "$LSM_DIR/debs" -maxdepth 1 -name "${pkg}_*_amd64.deb" | head -n1)
    if [ -z "$deb" ]; then
        say "downloading $pkg"
        # apt's sandbox user cannot write here; a private temp dir it may write to.
        local tmp
        tmp=$(mktemp -d)
        chmod 777 "$tmp"
        (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1) \
            || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
        mv "$tmp"/*.deb "$LSM_DIR/debs/" && rm -rf "$tmp"
        deb=$(find "$LSM_DIR/debs" -maxdepth 1 -name "${pkg}_*_amd64.deb" | head -n1)
    fi
    echo "$pkg" > "$LSM_DIR/kernel-package"
    KERNEL_TREE="$LSM_DIR/kernel/$pkg"
    # Re-unpacked when MODULES changes: the pruned tree keeps only those.
    if [ "$(cat "$KERNEL_TREE/.unpacked" 2>/dev/null)" != "$MODULES" ]; then
        say "unpacking $(basename "$deb")"
        rm -rf "$KERNEL_TREE" && mkdir -p "$KERNEL_TREE"
        dpkg-deb -x "$deb" "$KERNEL_TREE"
        prune_kernel_tree
        echo "$MODULES" > "$KERNEL_TREE/.unpacked"
    fi
    find_vmlinuz "$pkg"
}

# The SHA-256 an index (InRelease's file list, a Packages stanza) gives for $2.
suite_sha256() {
    awk -v want="$2" '/^SHA256:/ { inside = 1; next } /^[^ ]/ { inside = 0 }
        inside && $3 == want { print $1; exit }' "$1"
}

# Downloads $1 (a path under the mirror) to $2 unless it is there with SHA-256 $3.
verified_download() {
    local url=$MIRROR/$1 out=$2 sha=$3
    if [ ! -s "$out" ] || ! echo "$sha  $out" | sha256sum -c --status; then
        curl -fsS --retry 3 -o "$out.tmp" "$url" || die "download failed: $url"
        echo "$sha  $out.tmp" | sha256sum -c --status || die "SHA-256 mismatch: $url"
        mv "$out.tmp" "$out"
    fi
}

# One field of package $2's stanza in the Packages file $1.
package_field() {
    awk -v pkg="$2" -v field="$3:" '$1 == "Package:" { inside = ($2 == pkg) }
        inside && $1 == field { print $2; exit }' "$1"
}

# The kernel linux-image-amd64 depends on in $KERNEL_SUITE, unpacked into KERNEL_TREE:
# the archive's InRelease is checked with gpgv against Debian's keyring, Packages.xz
# against InRelease, and each .deb against Packages.  Newer kernels split the image into
# linux-binary-* (vmlinuz) and linux-modules-*: whichever of these exist are unpacked.
fetch_suite_kernel() {
    local dir=$LSM_DIR/suites/$KERNEL_SUITE sha image version part file
    mkdir -p "$dir"
    curl -fsS --retry 3 -o "$dir/InRelease" "$MIRROR/dists/$KERNEL_SUITE/InRelease" \
        || die "cannot fetch $KERNEL_SUITE's InRelease"
    gpgv --keyring "$ARCHIVE_KEYRING" "$dir/InRelease" 2>/dev/null \
        || die "$KERNEL_SUITE's InRelease does not verify against $ARCHIVE_KEYRING"
    sha=$(suite_sha256 "$dir/InRelease" main/binary-amd64/Packages.xz)
    [ -n "$sha" ] || die "no Packages.xz in $KERNEL_SUITE's InRelease"
    verified_download "dists/$KERNEL_SUITE/main/binary-amd64/Packages.xz" \
        "$dir/Packages.xz" "$sha"
    xz -dc "$dir/Packages.xz" > "$dir/Packages"
    image=$(awk '$1 == "Package:" { inside = ($2 == "linux-image-amd64") }
        inside && $1 == "Depends:" { print; exit }' "$dir/Packages" \
        | grep -o 'linux-image-[0-9][^ ,]*-amd64' | head -n1)
    [ -n "$image" ] || die "no linux-image-amd64 in $KERNEL_SUITE"
    version=${image#linux-image-}
    KERNEL_TREE="$LSM_DIR/kernel/$image"
    if [ "$(cat "$KERNEL_TREE/.unpacked" 2>/dev/null)" != "$MODULES" ]; then
        say "fetching $image from $KERNEL_SUITE"
        rm -rf "$KERNEL_TREE" && mkdir -p "$KERNEL_TREE"
        for part in linux-image linux-binary linux-modules; do
            file=$(package_field "$dir/Packages" "$part-$version" Filename)
            [ -n "$file" ] || continue
            verified_download "$file" "$dir/${file##*/}" \
                "$(package_field "$dir/Packages" "$part-$version" SHA256)"
            dpkg-deb -x "$dir/${file##*/}" "$KERNEL_TREE"
        done
        prune_kernel_tree
        echo "$MODULES" > "$KERNEL_TREE/.unpacked"
    fi
    find_vmlinuz "$image"
}

# VMLINUZ, KVER and MODULE_DIR of the unpacked tree (/boot or /usr/lib/modules layout).
find_vmlinuz() {
    # (find fails on whichever layout is absent: not an error under pipefail here)
    VMLINUZ=$(find "$KERNEL_TREE/boot" -name 'vmlinuz-*' 2>/dev/null | head -n1 || true)
    if [ -n "$VMLINUZ" ]; then
        KVER=${VMLINUZ##*/vmlinuz-}
    else
        VMLINUZ=$(find "$KERNEL_TREE/usr/lib/modules" -name vmlinuz 2>/dev/null | head -n1 || true)
        [ -n "$VMLINUZ" ] || die "no vmlinuz in $1"
        KVER=$(basename "$(dirname "$VMLINUZ")")
    fi
    MODULE_DIR=$(find "$KERNEL_TREE/lib/modules" "$KERNEL_TREE/usr/lib/modules" \
        -maxdepth 1 -name "$KVER" 2>/dev/null | head -n1 || true)
    [ -n "$MODULE_DIR" ] || die "no modules for $KVER in $1"
}

# Keeps only what the guest uses (vmlinuz and MODULES): 400+ MB less under .lsm/.
prune_kernel_tree() {
    local module keep=()
    for module in $MODULES; do keep+=(! -name "$module.ko*"); done
    find "$KERNEL_TREE" -path '*/modules/*' -name '*.ko*' -type f "${keep[@]}" -delete
    rm -rf "$KERNEL_TREE/usr/share" "$KERNEL_TREE/usr/lib/linux"
}

busybox_path() {
    dpkg -L busybox-static | grep -m1 '/bin/busybox$'
}

# Builds the initramfs when its inputs (init script, busybox, kernel version) change.
build_initramfs() {
    local busybox key out stage module ko
    busybox=$(busybox_path)
    key=$( { cat "$ROOT/lsm/init.sh"; cksum < "$busybox"; echo "$KVER $MODULES"; } \
        | cksum | cut -d' ' -f1)
    out="$LSM_DIR/initramfs-$KVER-$key.cpio.gz"
    INITRAMFS=$out
    [ -s "$out" ] && return 0
    say "building initramfs for $KVER"
    stage="$LSM_DIR/initramfs.d"
    rm -rf "$stage" && mkdir -p "$stage"/{bin,proc,sys,dev,lib/modules}
    cp "$busybox" "$stage/bin/busybox"
    cp "$ROOT/lsm/init.sh" "$stage/init" && chmod 755 "$stage/init"
    for module in $MODULES; do
        ko=$(find "$MODULE_DIR" -name "$module.ko*" | head -n1)
        [ -n "$ko" ] || die "module $module not in the kernel package"
        case "$ko" in
            *.ko.xz) xz -dc "$ko" > "$stage/lib/modules/$module.ko" ;;
            *.ko.zst) zstd -qdc "$ko" > "$stage/lib/modules/$module.ko" ;;
            *.ko) cp "$ko" "$stage/lib/modules/$module.ko" ;;
        esac
        echo "$module" >> "$stage/modules.order"
    done
    rm -f "$LSM_DIR/initramfs-$KVER"-*.cpio.gz
    (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -9) > "$out.tmp"
    mv "$out.tmp" "$out"
}

build_policy() {
    local key out
    key=$(cksum < "$ROOT/lsm/policy.cil" | cut -d' ' -f1)
    out="$LSM_DIR/policy-$key.bin"
    POLICY=$out
    [ -s "$out" ] && return 0
    say "compiling lsm/policy.cil"
    rm -f "$LSM_DIR"/policy-*.bin
    secilc -M false -c 33 -o "$out.tmp" -f /dev/null "$ROOT/lsm/policy.cil" >&2 \
        || die "secilc failed on lsm/policy.cil"
    mv "$out.tmp" "$out"
}

boot_guest() {
    local log=$LSM_DIR/last-run${KERNEL_SUITE:+-$KERNEL_SUITE}.log
    say "booting $KVER under qemu (TCG; timeout ${TIMEOUT}s)"
    local append="console=ttyS0 rdinit=/init panic=-1 lsm=selinux selinux=1 quiet loglevel=3"
    append="$append lsm_root=$ROOT lsm_policy=$POLICY lsm_args=${LSM_PYTEST_ARGS:-}"
    set +e
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
        -accel tcg -cpu max -smp 1 -m 1024 -nographic -no-reboot -nodefaults -serial stdio \
        -kernel "$VMLINUZ" -initrd "$INITRAMFS" -append "$append" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        < /dev/null 2>&1 | sed -u 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g; s/\r$//' | tee "$log"
    local statuses=("${PIPESTATUS[@]}")
    set -e
    [ "${statuses[0]}" = 124 ] && die "guest timed out after ${TIMEOUT}s (log: $log)"
    [ "${statuses[0]}" = 0 ] || die "qemu exited with status ${statuses[0]} (log: $log)"
    check_results "$log"
}

check_results() {
    local log=$1 passed not_passed exit_line
    if grep -q '^LSM-INIT-FAIL' "$log"; then
        die "guest set-up failed: $(grep -m1 '^LSM-INIT-FAIL' "$log")"
    fi
    grep -q '^LSM-ENFORCE 1$' "$log" || die "SELinux was not enforcing in the guest"
    exit_line=$(grep -m1 '^LSM-EXIT ' "$log" || true)
    [ -n "$exit_line" ] || die "the guest never reported pytest's exit status (log: $log)"
    passed=$(grep -c '^LSM-CASE passed ' "$log" || true)
    not_passed=$(grep '^LSM-CASE ' "$log" | grep -vc '^LSM-CASE passed ' || true)
    say "$passed passed, $not_passed not passed; guest pytest ${exit_line#LSM-}"
    grep '^LSM-LABEL ' "$log" | sed 's/^/test-lsm: /' >&2 || true
    [ "$exit_line" = "LSM-EXIT 0" ] || die "pytest failed in the guest"
    [ "$not_passed" = 0 ] || die "$not_passed case(s) did not pass (skipped counts as failed)"
    [ "$passed" -ge "$MIN_CASES" ] || die "only $passed cases ran, expected >= $MIN_CASES"
    say "OK"
}

main() {
    local start=$SECONDS
    mkdir -p "$LSM_DIR"
    [ -x "$ROOT/.venv/bin/python" ] || die ".venv missing: run make venv first"
    ensure_packages
    local package
    if [ -n "$KERNEL_SUITE" ]; then
        fetch_suite_kernel
    else
        package=$(resolve_kernel_package)
        fetch_kernel "$package"
    fi
    build_initramfs
    build_policy
    boot_guest
    say "took $((SECONDS - start)) s"
}

main "$@"
