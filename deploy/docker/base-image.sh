#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim where no registry can be reached: Debian bookworm
# (debootstrap) with python3, python3-venv, python3-pip, ca-certificates and this machine's own
# trusted CA certificates, so that pip inside a container build reaches PyPI the way this machine
# does. Imported and tagged so that `FROM python:3.11-slim` resolves with --pull=never.
#
#   deploy/docker/base-image.sh [IMAGE]      (default IMAGE: docker.io/library/python:3.11-slim)
#
# ENGINE=podman|docker (default: podman). Root is needed (debootstrap). An image already tagged
# IMAGE that this script built with the same CA certificates is reused; FORCE=1 rebuilds it.
set -euo pipefail

IMAGE=${1:-docker.io/library/python:3.11-slim}
ENGINE=${ENGINE:-podman}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

# The machine's extra CA certificates (a corporate or egress proxy's), and pip's settings for them.
shopt -s nullglob
extra_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
ca_digest=$({ echo "$SUITE $PACKAGES v1"; cat "${extra_cas[@]}" /dev/null; } | sha256sum | cut -c1-16)

if [[ ${FORCE:-0} != 1 ]] && "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
    # Ours with other CA certificates is rebuilt; a real python image (no label) is kept.
    label=$("$ENGINE" image inspect --format '{{ index .Config.Labels "convserve.base" }}' "$IMAGE" 2>/dev/null || true)
    if [[ -z $label || $label == "<no value>" || $label == "$ca_digest" ]]; then
        echo "base image $IMAGE: reused"
        exit 0
    fi
    echo "base image $IMAGE: CA certificates changed, rebuilding"
fi

command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
}

rootfs=$(mktemp -d /var/tmp/convserve-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"

cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
# Like the official images: no package caches kept in layers, no recommends.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT::Install-Recommends "false";
APT

if ((${#extra_cas[@]})); then
    cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
fi
# pip (also a newer one inside a virtual environment) uses the system bundle, extra CAs included.
cat >"$rootfs/etc/pip.conf" <<'PIP'
[global]
cert = /etc/ssl/certs/ca-certificates.crt
disable-pip-version-check = true
PIP

rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
    "$rootfs"/var/cache/debconf/*-old
ln -sf python3 "$rootfs/usr/bin/python"
version=$(chroot "$rootfs" python3 --version)

tar --numeric-owner -C "$rootfs" -c . | "$ENGINE" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL convserve.base=$ca_digest" \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "base image $IMAGE: built ($version)"
