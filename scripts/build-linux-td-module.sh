#!/usr/bin/env bash
# Builds linux-td/module/ (coco_race.ko, issue 8's Linux side) out of tree
# against Debian's linux-headers for exactly the kernel that
# scripts/fetch-linux-td.sh fetched (it calls this script), into the same
# cache folder, never committed:
#
#   CACHE_DIR/headers/         linux-headers-<abi>-cloud-amd64, -common and
#                              linux-kbuild-<abi>, unpacked with dpkg-deb -x
#   CACHE_DIR/module-build/    the copy of linux-td/module/ kbuild builds in
#   CACHE_DIR/coco_race.ko     the module (uncompressed, unsigned)
#   CACHE_DIR/MODULE           key=value: packages, versions, vermagic, sha256
#
# Usage: scripts/build-linux-td-module.sh [CACHE_DIR]   (default target/linux-td)
#
# Stops, saying which, when the headers' version or release differs from the
# kernel's, or the module's vermagic does not name the kernel's release.
# Installs gcc-12, make, dwarves (pahole, for the module's BTF), libelf-dev
# and binutils with apt-get when missing (needs root then). Idempotent: the
# unpacked headers are reused while their recorded version matches.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

cache=${1:-target/linux-td}
[ $# -le 1 ] || { echo "build-linux-td-module: error: usage: $0 [CACHE_DIR]" >&2; exit 2; }
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

die() { echo "build-linux-td-module: error: $*" >&2; exit 1; }
say() { echo "build-linux-td-module: $*"; }

source_value() { sed -n "s/^$1=//p" "$cache/SOURCE" | head -n1; }
[ -s "$cache/SOURCE" ] && [ -s "$cache/kernel" ] \
    || die "$cache/SOURCE or kernel missing: run scripts/fetch-linux-td.sh first"

kernel_pkg=$(source_value kernel_package)
kernel_ver=$(source_value kernel_version)
[ -n "$kernel_pkg" ] && [ -n "$kernel_ver" ] || die "$cache/SOURCE names no kernel_package/kernel_version"
# linux-image-6.12.117+deb12-cloud-amd64[-unsigned] -> 6.12.117+deb12-cloud-amd64
release=${kernel_pkg#linux-image-}
release=${release%-unsigned}
flavour=cloud-amd64
abi=${release%-"$flavour"}
[ "$abi" != "$release" ] || die "$kernel_pkg: not a -$flavour kernel"

# The release and Debian version the bzImage itself carries (boot protocol:
# the u16 at 0x20e points, from 0x200, at the kernel version string).
version_offset=$(od -An -tu2 -j $((0x20e)) -N2 "$cache/kernel" | tr -d ' ')
image_version=$(dd if="$cache/kernel" bs=1 skip=$((version_offset + 0x200)) count=256 status=none \
    | tr '\0' '\n' | head -n1)
image_release=${image_version%% *}
[ "$image_release" = "$release" ] \
    || die "the kernel file's release is '$image_release', its package $kernel_pkg says '$release'"
case "$image_version" in
    *" Debian $kernel_ver "*) ;;
    *) die "the kernel file says '$image_version', not Debian $kernel_ver (SOURCE's kernel_version)" ;;
esac

headers_pkgs=("linux-headers-$release" "linux-headers-$abi-common" "linux-kbuild-$abi")
headers=$cache/headers
kdir=$headers/usr/src/linux-headers-$release
ksrc=$headers/usr/src/linux-headers-$abi-common

# Build tools: the compiler the kernel was built with (.kernelvariables
# names x86_64-linux-gnu-gcc-12), make, pahole for BTF, objcopy.
missing=()
command -v x86_64-linux-gnu-gcc-12 >/dev/null || missing+=(gcc-12)
command -v make >/dev/null || missing+=(make)
command -v pahole >/dev/null || missing+=(dwarves)
command -v objcopy >/dev/null || missing+=(binutils)
[ -e /usr/include/libelf.h ] || missing+=(libelf-dev)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
fi

if [ -s "$headers/VERSION" ] && [ "$(cat "$headers/VERSION")" = "$kernel_ver" ] \
    && [ -f "$kdir/Makefile" ] && [ -f "$ksrc/Makefile" ] && [ -x "$kdir/scripts/mod/modpost" ]; then
    say "headers cached in $headers: ${headers_pkgs[*]} $kernel_ver"
else
    for tool in apt-get dpkg-deb; do
        command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian-based host)"
    done
    work=$(mktemp -d /tmp/build-linux-td-module.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work"
    mkdir "$work/debs"
    # apt-get download runs as _apt when started as root: a folder it owns.
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
        chown _apt "$work/debs"
    fi
    say "downloading ${headers_pkgs[*]} at $kernel_ver (the kernel's version)"
    specs=()
    for pkg in "${headers_pkgs[@]}"; do specs+=("$pkg=$kernel_ver"); done
    if ! (cd "$work/debs" && apt-get download -qq "${specs[@]}"); then
        say "download failed; apt-get update once and retrying"
        [ "$(id -u)" -eq 0 ] && apt-get update -qq || true
        (cd "$work/debs" && apt-get download -qq "${specs[@]}") || {
            for pkg in "${headers_pkgs[@]}"; do
                echo "  $pkg: apt's candidate $(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')" >&2
            done
            die "cannot download the headers at the kernel's version $kernel_ver (above: what apt has); not building a module for another kernel"
        }
    fi
    rm -rf "$headers.new"
    mkdir -p "$headers.new"
    for pkg in "${headers_pkgs[@]}"; do
        deb=$(ls "$work/debs/${pkg}_"*.deb 2>/dev/null | head -n1)
        [ -n "$deb" ] || die "$pkg: apt-get download left no .deb"
        got=$(dpkg-deb -f "$deb" Version)
        [ "$got" = "$kernel_ver" ] || die "$pkg is version $got, the kernel is $kernel_ver: headers and kernel must match"
        dpkg-deb -x "$deb" "$headers.new"
        echo "${pkg}_deb=$(basename "$deb") sha256=$(sha256sum "$deb" | cut -d' ' -f1)" >>"$headers.new/DEBS"
    done
    echo "$kernel_ver" >"$headers.new/VERSION"
    rm -rf "$headers"
    mv "$headers.new" "$headers"
    kdir=$headers/usr/src/linux-headers-$release
    ksrc=$headers/usr/src/linux-headers-$abi-common
fi

# The headers' own idea of the release must be the kernel's.
headers_release=$(sed -n 's/^override KERNELRELEASE = //p' "$kdir/.kernelvariables" 2>/dev/null || true)
[ "$headers_release" = "$release" ] \
    || die "linux-headers-$release says KERNELRELEASE='$headers_release', the kernel is $release"

# The arch headers' Makefile is one line, `include /usr/src/linux-headers-
# <abi>-common/Makefile`: an absolute path outside the cache. Give kbuild
# the -common Makefile directly instead (-f): its srctree is the folder of
# that Makefile and its objtree the -C folder, so nothing in /usr/src is
# read or written.
build=$cache/module-build
rm -rf "$build"
mkdir -p "$build"
cp "$repo/linux-td/module/coco_race.c" "$repo/linux-td/module/Kbuild" "$build/"
say "building coco_race.ko against $kdir"
make -s -C "$kdir" -f "$ksrc/Makefile" M="$build" modules \
    || die "kbuild failed for linux-td/module/ against linux-headers-$release"
ko=$build/coco_race.ko
[ -s "$ko" ] || die "kbuild left no $ko"
[ "$(head -c4 "$ko" | od -An -c | tr -d ' ')" = '177ELF' ] || die "$ko is not an ELF file (compressed?)"

# vermagic: its first word is the release the module loads into.
modinfo=$(objcopy -O binary --only-section=.modinfo "$ko" /dev/stdout | tr '\0' '\n')
vermagic=$(sed -n 's/^vermagic=//p' <<<"$modinfo")
license=$(sed -n 's/^license=//p' <<<"$modinfo")
[ "${vermagic%% *}" = "$release" ] \
    || die "coco_race.ko's vermagic is '$vermagic', the kernel is $release: not loading a mismatched module"
case " $vermagic " in *" SMP "*) ;; *) die "coco_race.ko's vermagic '$vermagic' lacks SMP" ;; esac
[ "$license" = GPL ] || die "coco_race.ko's license is '$license', not GPL"

install -m 644 "$ko" "$cache/coco_race.ko.new" && mv -f "$cache/coco_race.ko.new" "$cache/coco_race.ko"
{
    echo "module=coco_race.ko"
    echo "module_sha256=$(sha256sum "$cache/coco_race.ko" | cut -d' ' -f1)"
    echo "vermagic=$vermagic"
    echo "kernel_release=$release"
    echo "headers_version=$(cat "$headers/VERSION")"
    echo "headers_packages=${headers_pkgs[*]}"
    sed 's/^/headers_/' "$headers/DEBS"
    echo "compiler=$(x86_64-linux-gnu-gcc-12 --version | head -n1)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$cache/MODULE.new"
mv -f "$cache/MODULE.new" "$cache/MODULE"
say "wrote $cache/coco_race.ko (vermagic: $vermagic)"
