#!/usr/bin/env bash
# Build a local debian:bookworm-slim with debootstrap and import it with
# podman (buildah has no import) into the containers storage that buildah and
# podman share (root: /var/lib/containers).
#
#   deploy/build-base.sh [IMAGE]        default IMAGE: localhost/debian:bookworm-slim
#
# Why: this machine reaches Debian's mirror, PyPI and npm, but no container
# registry, so the Dockerfile's base image is made here.  The rootfs is a
# minbase debootstrap from the mirror the host's apt uses, trimmed the way the
# official slim image is (dpkg path excludes, apt clean-up hooks), plus what
# the host needs to reach the outside: its CA certificates (a TLS-intercepting
# egress proxy signs with its own CA) and its proxy/apt Acquire settings.
# Those host additions make the image a *local development* base only; the
# release workflow builds on the real debian:bookworm-slim.
#
# Environment overrides: MIRROR, SECURITY_MIRROR, SUITE (bookworm), FORCE=1
# (rebuild even when the image exists).
set -euo pipefail

IMAGE=${1:-localhost/debian:bookworm-slim}
SUITE=${SUITE:-bookworm}
FORCE=${FORCE:-0}

log() { printf 'build-base: %s\n' "$*" >&2; }

image_exists() { command -v podman >/dev/null 2>&1 && podman image exists "$1"; }

# The host's mirror for a suite, from apt's own view of its sources (covers
# both sources.list and deb822 .sources files).  Needs `apt-get update` done.
host_site() {
    # shellcheck disable=SC2016 # $(SITE) is apt's format field, not a shell expansion
    apt-get indextargets --format '$(SITE) $(CODENAME)' 2>/dev/null |
        awk -v s="$1" '$2 == s { print $1; exit }'
}

if [ "$FORCE" != 1 ] && image_exists "$IMAGE"; then
    log "$IMAGE already exists (FORCE=1 to rebuild)"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { log "must run as root (debootstrap)"; exit 1; }
for tool in debootstrap podman tar; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing $tool: make image-deps"; exit 1; }
done

MIRROR=${MIRROR:-$(host_site "$SUITE")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(host_site "$SUITE-security")}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
log "suite $SUITE from $MIRROR (security: $SECURITY_MIRROR)"

WORK=$(mktemp -d /var/tmp/build-base.XXXXXX)
cleanup() {
    if mountpoint -q "$WORK/rootfs/proc" 2>/dev/null; then umount "$WORK/rootfs/proc"; fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
ROOT=$WORK/rootfs

keyring_args=()
if [ -r /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    keyring_args=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
fi

# debootstrap honours http_proxy/https_proxy from the environment.
debootstrap --variant=minbase "${keyring_args[@]}" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    exit 1
}

# --- trim like the official slim image (debuerreotype's "slimify") ---------
install -d "$ROOT/etc/dpkg/dpkg.cfg.d" "$ROOT/etc/apt/apt.conf.d"
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# trimmed like debian:*-slim: no documentation, manuals or translations
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
cat >"$ROOT/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$ROOT/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' >"$ROOT/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$ROOT/etc/apt/apt.conf.d/docker-autoremove-suggests"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOT/usr/share/man/"* "$ROOT/usr/share/info/"* "$ROOT/usr/share/groff/"* \
    "$ROOT/usr/share/lintian/overrides/"* "$ROOT/usr/share/linda/"*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +

# --- apt sources: the same mirror as the host, with updates and security ----
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# --- the host's way out: CA certificates, proxy, apt Acquire settings -------
install -d -m 0755 "$ROOT/etc/ssl/certs" "$ROOT/usr/local/share/ca-certificates"
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
    # Read by curl/apt/pip (Debian's pip uses the system bundle) before the
    # ca-certificates package exists in the image; regenerated when it is
    # installed, from /usr/share + /usr/local/share/ca-certificates below.
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi
if [ -d /usr/local/share/ca-certificates ]; then
    cp -a /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/"
fi
{
    # apt's own Acquire settings of the host (proxy, a frozen mirror's dates)
    apt-config dump 2>/dev/null |
        grep -E '^Acquire::(https?::Proxy|ftp::Proxy|Check-Valid-Until|Check-Date)[ :]' || true
    # a proxy given only in the environment
    for var in http_proxy https_proxy; do
        val=${!var:-}
        upper=${var^^}
        val=${val:-${!upper:-}}
        if [ -n "$val" ]; then
            printf 'Acquire::%s::Proxy "%s";\n' "${var%_proxy}" "$val"
        fi
    done
} | sort -u >"$WORK/99host"
if [ -s "$WORK/99host" ]; then
    install -m 0644 "$WORK/99host" "$ROOT/etc/apt/apt.conf.d/99host"
    log "apt settings from the host: $(tr '\n' ' ' <"$WORK/99host")"
fi

# --- bring it up to date with -updates and -security, as the official image is
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    http_proxy="${http_proxy:-}" https_proxy="${https_proxy:-}" \
    sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Use-Pty=0 upgrade' >>"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    exit 1
}
umount "$ROOT/proc"

# --- empty the caches and import -------------------------------------------
rm -rf "$ROOT/var/lib/apt/lists/"* "$ROOT/var/cache/apt/"* "$ROOT/var/cache/debconf/"*-old \
    "$ROOT/var/log/"*.log "$ROOT/var/log/apt/"* "$ROOT/tmp/"* "$ROOT/var/tmp/"*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/etc/hostname" "$ROOT/etc/resolv.conf"

changes=(--change 'CMD ["bash"]'
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
tar -C "$ROOT" --numeric-owner -cf - . | podman import -q "${changes[@]}" - "$IMAGE" >/dev/null
log "imported $IMAGE"
