#!/usr/bin/env bash
# Fetches what the Linux-as-a-TD test boots (tests/qemu/tests/linux_td.rs):
# Debian's stock 6.12 cloud kernel (built with CONFIG_INTEL_TDX_GUEST=y) and
# busybox-static, both taken from their .debs with apt-get download and
# dpkg-deb -x, into a cache folder that is never committed.
#
# Usage: scripts/fetch-linux-td.sh [--refresh] [CACHE_DIR]   (default target/linux-td)
#
# Writes CACHE_DIR/kernel (the bzImage), CACHE_DIR/busybox (static) and
# CACHE_DIR/SOURCE (key=value: packages, versions, apt origins, checksums),
# SOURCE last, so its presence means the cache is complete. A complete cache
# is used as it is, without asking apt anything (quick, works offline);
# --refresh resolves and downloads again.
# Needs root only when apt cannot find the kernel: it then adds a
# bookworm-backports source and runs apt-get update once.
#
# Then, cached or not, scripts/build-linux-td-module.sh builds
# linux-td/module/ (coco_race.ko) against Debian's linux-headers of exactly
# this kernel into CACHE_DIR/coco_race.ko (headers in CACHE_DIR/headers/),
# and stops if headers and kernel do not match.
set -euo pipefail
cd "$(dirname "$0")/.."

refresh=
cache=
for arg in "$@"; do
    case $arg in
        --refresh) refresh=1 ;;
        -*) echo "fetch-linux-td: error: unknown option $arg" >&2; exit 2 ;;
        *) [ -z "$cache" ] || { echo "fetch-linux-td: error: more than one CACHE_DIR" >&2; exit 2; }
           cache=$arg ;;
    esac
done
cache=${cache:-target/linux-td}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

die() { echo "fetch-linux-td: error: $*" >&2; exit 1; }
say() { echo "fetch-linux-td: $*"; }

if [ -z "$refresh" ] && [ -s "$cache/SOURCE" ] && [ -s "$cache/kernel" ] && [ -x "$cache/busybox" ]; then
    say "cached in $cache: $(grep -E '^kernel_package=|^kernel_version=' "$cache/SOURCE" | cut -d= -f2 | paste -sd' ')"
    exec scripts/build-linux-td-module.sh "$cache"
fi

for tool in apt-cache apt-get dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian-based host)"
done

META=linux-image-6.12-cloud-amd64

# The versioned kernel package the meta package depends on, e.g.
# linux-image-6.12.117+deb12-cloud-amd64 (empty if apt does not know it).
resolve_kernel() {
    apt-cache depends "$META" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-6\.12\.[^ ]*-cloud-amd64\(-unsigned\)\{0,1\}\)$/\1/p' \
        | head -n1 || true # an unknown package is an empty answer, not an error
}

# Adds bookworm-backports (where Debian ships 6.12 for bookworm besides
# bookworm-security) unless some source already has it, then updates once.
apt_updated=
add_backports_and_update() {
    [ -z "$apt_updated" ] || return 0
    [ "$(id -u)" -eq 0 ] || die "apt has no $META; run as root so a bookworm-backports source can be added"
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding /etc/apt/sources.list.d/bookworm-backports.sources"
        cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
}

kernel_meta_dep=$(resolve_kernel)
if [ -z "$kernel_meta_dep" ]; then
    add_backports_and_update
    kernel_meta_dep=$(resolve_kernel)
fi
[ -n "$kernel_meta_dep" ] || die "$META: apt-cache depends names no linux-image-6.12.*-cloud-amd64 package, even with bookworm-backports"

# Prefer the signed image; the -unsigned one is the same kernel.
signed=${kernel_meta_dep%-unsigned}
kernel_pkg=
for candidate in "$signed" "$signed-unsigned"; do
    if apt-cache show --no-all-versions "$candidate" >/dev/null 2>&1; then
        kernel_pkg=$candidate
        break
    fi
done
[ -n "$kernel_pkg" ] || die "$signed: neither it nor its -unsigned variant is known to apt"

# candidate_version PACKAGE, origin_line PACKAGE VERSION: from apt-cache policy,
# the candidate and the first archive line under it in the version table.
candidate_version() {
    apt-cache policy "$1" | awk '$1 == "Candidate:" { print $2; exit }' || true
}
origin_line() {
    apt-cache policy "$1" | awk -v v="$2" '
        found && NF >= 2 { sub(/^ +/, ""); print; exit }
        { f = $1 == "***" ? $2 : $1; if (f == v) found = 1 }' || true
}

kernel_ver=$(candidate_version "$kernel_pkg")
busybox_pkg=busybox-static
busybox_ver=$(candidate_version "$busybox_pkg")
[ -n "$kernel_ver" ] && [ "$kernel_ver" != "(none)" ] || die "$kernel_pkg: apt has no candidate version"
[ -n "$busybox_ver" ] && [ "$busybox_ver" != "(none)" ] || die "$busybox_pkg: apt has no candidate version"

# apt-get download runs as the unprivileged _apt user when started as root;
# a work folder under a fresh clone in /root is not reachable by it (apt
# then warns and downloads as root), so download into a folder _apt owns.
work=$(mktemp -d /tmp/fetch-linux-td.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir "$work/debs"
if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$work/debs"
fi

download() { (cd "$work/debs" && apt-get download -qq "$1=$2"); }
say "downloading $kernel_pkg=$kernel_ver and $busybox_pkg=$busybox_ver"
if ! download "$kernel_pkg" "$kernel_ver" || ! download "$busybox_pkg" "$busybox_ver"; then
    # Stale package lists name a version the archive no longer has.
    say "download failed; updating the package lists once and retrying"
    add_backports_and_update
    kernel_ver=$(candidate_version "$kernel_pkg")
    busybox_ver=$(candidate_version "$busybox_pkg")
    download "$kernel_pkg" "$kernel_ver" || die "$kernel_pkg=$kernel_ver: apt-get download failed"
    download "$busybox_pkg" "$busybox_ver" || die "$busybox_pkg=$busybox_ver: apt-get download failed"
fi
kernel_deb=$(ls "$work/debs/${kernel_pkg}_"*.deb)
busybox_deb=$(ls "$work/debs/${busybox_pkg}_"*.deb)

dpkg-deb -x "$kernel_deb" "$work/kernel-root"
dpkg-deb -x "$busybox_deb" "$work/busybox-root"
vmlinuz=$(ls "$work"/kernel-root/boot/vmlinuz-* 2>/dev/null | head -n1)
config=$(ls "$work"/kernel-root/boot/config-* 2>/dev/null | head -n1)
[ -n "$vmlinuz" ] || die "$kernel_deb: no boot/vmlinuz-* inside"
[ -x "$work/busybox-root/bin/busybox" ] || die "$busybox_deb: no bin/busybox inside"

# A bzImage has "HdrS" at offset 0x202 (Linux boot protocol); a kernel built
# without TDX guest support would only prove that Linux is not a TD.
[ "$(dd if="$vmlinuz" bs=1 skip=514 count=4 status=none)" = HdrS ] \
    || die "$vmlinuz: not a bzImage (no HdrS at 0x202)"
tdx_config=$(sed -n 's/^CONFIG_INTEL_TDX_GUEST=//p' "${config:-/dev/null}")
[ "$tdx_config" = y ] || die "$kernel_pkg: CONFIG_INTEL_TDX_GUEST is '${tdx_config:-unset}', not y"
"$work/busybox-root/bin/busybox" true || die "$busybox_deb: bin/busybox does not run"

# Copies, not links: the unpacked trees (modules and all) are thrown away.
install -m 644 "$vmlinuz" "$cache/kernel.new" && mv -f "$cache/kernel.new" "$cache/kernel"
install -m 755 "$work/busybox-root/bin/busybox" "$cache/busybox.new" && mv -f "$cache/busybox.new" "$cache/busybox"

{
    echo "kernel_package=$kernel_pkg"
    echo "kernel_version=$kernel_ver"
    echo "kernel_origin=$(origin_line "$kernel_pkg" "$kernel_ver")"
    echo "kernel_meta_package=$META"
    echo "kernel_file=boot/$(basename "$vmlinuz")"
    echo "kernel_sha256=$(sha256sum "$cache/kernel" | cut -d' ' -f1)"
    echo "kernel_deb=$(basename "$kernel_deb")"
    echo "kernel_deb_sha256=$(sha256sum "$kernel_deb" | cut -d' ' -f1)"
    echo "kernel_config_intel_tdx_guest=$tdx_config"
    echo "busybox_package=$busybox_pkg"
    echo "busybox_version=$busybox_ver"
    echo "busybox_origin=$(origin_line "$busybox_pkg" "$busybox_ver")"
    echo "busybox_sha256=$(sha256sum "$cache/busybox" | cut -d' ' -f1)"
    echo "fetched=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$cache/SOURCE.new"
mv -f "$cache/SOURCE.new" "$cache/SOURCE"
say "wrote $cache/{kernel,busybox,SOURCE}:"
sed 's/^/  /' "$cache/SOURCE"

# The module for issue 8's race and benchmark, for exactly this kernel.
scripts/build-linux-td-module.sh "$cache"
