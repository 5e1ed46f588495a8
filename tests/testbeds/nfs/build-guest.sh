#!/bin/bash
# Builds the NFS test bed's guest: Debian's own kernel (as an uncompressed vmlinux, booted
# through PVH) and an initramfs with busybox, the virtio/9p/NFS client modules and ./init.
#
#   build-guest.sh OUT_DIR
#
# Writes OUT_DIR/vmlinux, OUT_DIR/initrd.img and, last, OUT_DIR/.complete holding the version
# string (kernel package + hashes of init and of this script). Idempotent: when .complete
# already holds the version string this run would build, it exits 0 at once. The kernel .deb
# is downloaded into OUT_DIR and kept, so a rebuild (after editing init) downloads nothing.
# Needs root (apt-get download, mknod) and Debian's packages: qemu-system-x86 busybox-static
# cpio kmod (and python3, dpkg, apt, which a Debian machine has).
set -euo pipefail

die() {
    echo "build-guest.sh: error: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: build-guest.sh OUT_DIR"
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC=$HERE/init
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

need() { # need COMMAND-OR-PATH PACKAGE
    if [[ $1 == /* ]]; then
        [ -x "$1" ] && return 0
    else
        command -v "$1" >/dev/null 2>&1 && return 0
    fi
    die "'$1' not found: install the Debian package '$2' (apt-get install -y $2)"
}
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
need depmod kmod
need modprobe kmod
need python3 python3
need dpkg-deb dpkg
need apt-get apt
need gzip gzip
need flock util-linux
need /bin/busybox busybox-static
# Debian's plain 'busybox' package also installs /bin/busybox, dynamically linked: useless in
# an initramfs that has no libc.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    die "/bin/busybox is not the static one: install the Debian package 'busybox-static'"
fi

# --- Which kernel: the one linux-image-amd64 depends on ("Depends: linux-image-6.1.0-N-amd64
# (= VERSION)"). One apt-cache call: without a pkgcache.bin each call parses the lists (0.5 s).
kernel_dep() {
    apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
        sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-amd64\) *(= *\([^ )]*\)).*$/\1 \2/p' | head -n1
}
DEP=$(kernel_dep)
if [ -z "$DEP" ]; then
    echo "build-guest.sh: apt does not know linux-image-amd64 yet; running apt-get update" >&2
    apt-get update -qq || die "apt-get update failed"
    DEP=$(kernel_dep)
fi
[ -n "$DEP" ] || die "cannot find the kernel package that linux-image-amd64 depends on (apt-cache show linux-image-amd64)"
PKG=${DEP% *}
PKGVER=${DEP#* }
KVER=${PKG#linux-image-}

INIT_HASH=$(sha256sum "$INIT_SRC" | cut -c1-16)
SELF_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
VERSION="kernel=$KVER pkg=$PKGVER init=$INIT_HASH build=$SELF_HASH"

if [ -f "$OUT/.complete" ] && [ "$(cat "$OUT/.complete")" = "$VERSION" ]; then
    exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Two test processes may build the same OUT_DIR at once: one builds, the other waits.
exec 9>"$OUT/.lock"
flock 9
if [ -f "$OUT/.complete" ] && [ "$(cat "$OUT/.complete")" = "$VERSION" ]; then
    exit 0
fi
rm -f "$OUT/.complete"
echo "build-guest.sh: building $VERSION into $OUT" >&2

# --- Kernel package: downloaded once into OUT_DIR.
DEB=$(ls "$OUT"/"${PKG}"_*.deb 2>/dev/null | grep -F "_${PKGVER/:/%3a}_" | head -n1 || true)
if [ -z "$DEB" ]; then
    (cd "$OUT" && apt-get download -q -o APT::Sandbox::User=root "$PKG=$PKGVER") >&2 ||
        die "apt-get download $PKG=$PKGVER failed"
    DEB=$(ls "$OUT"/"${PKG}"_*.deb 2>/dev/null | grep -F "_${PKGVER/:/%3a}_" | head -n1 || true)
    [ -n "$DEB" ] || die "apt-get download did not leave ${PKG}_*.deb in $OUT"
fi
# Older kernels' packages from earlier builds are of no more use.
for old in "$OUT"/linux-image-*.deb; do
    [ "$old" = "$DEB" ] || rm -f "$old"
done

# The package unpacked (400 MB) only for the build's time; removed at the end.
KDIR=$OUT/kernel
rm -rf "$KDIR"
mkdir -p "$KDIR"
dpkg-deb -x "$DEB" "$KDIR"
MODROOT=$KDIR
if [ ! -d "$KDIR/lib/modules/$KVER" ] && [ -d "$KDIR/usr/lib/modules/$KVER" ]; then
    MODROOT=$KDIR/usr
fi
[ -d "$MODROOT/lib/modules/$KVER" ] || die "$PKG has no lib/modules/$KVER"
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "$PKG has no boot/vmlinuz-$KVER"

# --- vmlinux: the xz stream inside the bzImage, decompressed once (booting it through PVH
# skips the kernel's own slow decompression under TCG).
python3 - "$VMLINUZ" "$OUT/vmlinux.tmp" <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
magic = b"\xfd7zXZ\x00"
pos = data.find(magic)
while pos >= 0:
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
    except lzma.LZMAError:
        out = b""
    if out.startswith(b"\x7fELF"):
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit("no xz-compressed ELF image found in " + sys.argv[1])
EOF
mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"

# --- Modules, in load order.
depmod -b "$MODROOT" "$KVER"
STAGE=$OUT/initrd-root
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,hr,w,etc,lib/modules/"$KVER"}
: >"$STAGE/etc/modules.load"
declare -A seen=()
for m in virtio_pci virtio_net nfsv3 nfsv4 9pnet_virtio 9p; do
    deps=$(modprobe -d "$MODROOT" -S "$KVER" --show-depends "$m") || die "modprobe --show-depends $m failed"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue # "builtin NAME" lines need nothing
        [ -z "${seen[$path]:-}" ] || continue
        seen[$path]=1
        rel=${path#"$MODROOT"/lib/modules/"$KVER"/}
        mkdir -p "$STAGE/lib/modules/$KVER/$(dirname "$rel")"
        cp "$path" "$STAGE/lib/modules/$KVER/$rel"
        echo "/lib/modules/$KVER/$rel" >>"$STAGE/etc/modules.load"
    done <<<"$deps"
done
[ -s "$STAGE/etc/modules.load" ] || die "no module to load (modprobe --show-depends listed none)"

# --- busybox and its applets.
cp /bin/busybox "$STAGE/bin/busybox"
for applet in $("$STAGE/bin/busybox" --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$STAGE/$(dirname "$applet")"
    ln -sf /bin/busybox "$STAGE/$applet"
done
mknod -m 600 "$STAGE/dev/console" c 5 1
mknod -m 666 "$STAGE/dev/null" c 1 3
install -m 755 "$INIT_SRC" "$STAGE/init"
echo "$VERSION" >"$STAGE/etc/qs-guest-version"

(cd "$STAGE" && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 >"$OUT/initrd.img.tmp"
mv -f "$OUT/initrd.img.tmp" "$OUT/initrd.img"
rm -rf "$STAGE" "$KDIR"

echo "$VERSION" >"$OUT/.complete.tmp"
mv -f "$OUT/.complete.tmp" "$OUT/.complete"
echo "build-guest.sh: done: $OUT/vmlinux $OUT/initrd.img ($(du -h "$OUT/initrd.img" | cut -f1))" >&2
