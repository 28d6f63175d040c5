#!/usr/bin/env bash
# Host bootstrap for desanet (run by `make setup`, as root): Debian packages,
# kernel headers where BCC looks for them, and bpffs. Idempotent: a second run
# installs nothing and returns in about a second.
#
# Usage: setup-host.sh --arch ARCH --kernel-flavour FLAVOUR PACKAGE...
# The Makefile picks the flavour of Debian's kernel packages for the architecture
# (`dpkg --print-architecture`); an empty one means desanet knows none for it.
set -euo pipefail

arch="" flavour=""
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --arch) arch=$2 ;;
        --kernel-flavour) flavour=$2 ;;
        *) echo "desanet setup: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done

if [[ -z $flavour ]]; then
    echo "desanet setup: no Debian kernel flavour known for architecture" \
        "'${arch:-unknown}' (known: amd64, arm64, armhf, riscv64): add it to" \
        "KERNEL_FLAVOUR in the Makefile" >&2
    exit 1
fi

if [[ $EUID -ne 0 ]]; then
    echo "desanet setup: run as root (or with sudo): it installs Debian packages" >&2
    exit 1
fi

missing=()
for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "desanet setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel
# ships no headers (a custom kernel), point it at Debian's split headers:
# build -> linux-headers-*-FLAVOUR, source -> linux-headers-*-common.
kdir="/lib/modules/$(uname -r)"
if [[ ! -e "$kdir/build/include" ]]; then
    arch_hdr=$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -n1)
    common_hdr=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
    if [[ -z "$arch_hdr" || -z "$common_hdr" ]]; then
        echo "desanet setup: no linux-headers-*-$flavour/-common under /usr/src for BCC" >&2
        exit 1
    fi
    mkdir -p "$kdir"
    ln -sfn "$arch_hdr" "$kdir/build"
    ln -sfn "$common_hdr" "$kdir/source"
    echo "desanet setup: BCC headers: $kdir/build -> $arch_hdr"
fi

if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
fi
