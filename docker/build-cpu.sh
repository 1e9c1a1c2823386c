#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile.cpu) with podman on a machine that reaches package
# registries but no image registry: the Debian base is made locally with mmdebstrap (from the
# Debian mirror), imported into podman, and the image built on it.
#
#   docker/build-cpu.sh [--test]      --test: then run docker/test-image.sh on the image
#
# Settings (environment):
#   IMAGE        the image to build                       (localhost/mera-ds:cpu)
#   SUITE        the Debian suite of the base             (bookworm: Python 3.11)
#   MIRROR       the Debian mirror                        (http://deb.debian.org/debian)
#   CACHE_DIR    where the base's rootfs.tar is kept and reused
#                                                         ($XDG_CACHE_HOME/mera-ds-image)
#   TORCH_SPEC   torch requirement and pip options         (torch==2.13.0)
#   WHEELS       a directory of wheels for pip, e.g. the CPU torch wheel; "" for none
#                                                         (/opt/wheels if it exists)
#   CA_BUNDLE    CA bundle pip trusts during the build (a TLS-intercepting proxy); "" for none
#                                                         (/etc/ssl/certs/ca-certificates.crt)
#   REBUILD_BASE=1  make the rootfs and the base image again
#   PODMAN       the podman command                       (podman --runtime runc)
set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/mera-ds:cpu}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mera-ds-image}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
BASE=localhost/mera-base:$SUITE
if [[ -z ${WHEELS+set} ]]; then
    WHEELS=""
    if [[ -d /opt/wheels ]]; then WHEELS=/opt/wheels; fi
fi
if [[ -z ${CA_BUNDLE+set} ]]; then
    CA_BUNDLE=""
    if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
        CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
    fi
fi
TEST=0
for arg in "$@"; do
    case $arg in
        --test) TEST=1 ;;
        *) echo "usage: $0 [--test]" >&2; exit 2 ;;
    esac
done

read -r -a PODMAN <<< "${PODMAN:-podman --runtime runc}"
# Podman gives containers nofile=1048576 by default, which a process without CAP_SYS_RESOURCE
# (a root shell in a VM sandbox, a CI runner) cannot set: runc fails with "error setting rlimit
# type 7: operation not permitted". This shell's hard limit can always be set; nproc likewise
# (32768: podman build's own default, below this kind of machine's cap).
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
[[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
ROOTFS=$CACHE_DIR/$SUITE-rootfs.tar

log() { printf '\n== %s: %s\n' "$(date +%T)" "$*"; }

if [[ ${REBUILD_BASE:-0} == 1 ]]; then
    rm -f "$ROOTFS"
fi

fresh=0
if [[ ! -s $ROOTFS ]]; then
    fresh=1
    log "making the $SUITE rootfs with mmdebstrap: $ROOTFS"
    mkdir -p "$CACHE_DIR"
    # No man pages, docs (the copyright files stay) or translations; apt's lists are left out.
    mmdebstrap --variant=minbase --format=tar \
        --include=ca-certificates,python3,python3-venv,tini,make \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$SUITE" "$ROOTFS.tmp" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb ${MIRROR%/debian}/debian-security $SUITE-security main"
    mv "$ROOTFS.tmp" "$ROOTFS"
fi

# A new rootfs is imported again (the tag moves to it; the old base goes with the last image on it).
if [[ $fresh == 1 ]] || ! "${PODMAN[@]}" image exists "$BASE"; then
    log "importing $ROOTFS as $BASE"
    "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$ROOTFS" "$BASE"
fi

# --format docker: the OCI format has no SHELL, and buildah would then run RUN with /bin/sh.
build=("${ULIMITS[@]}" --format docker
       -f docker/Dockerfile.cpu
       --build-arg "BASE_IMAGE=$BASE"
       --build-arg "TORCH_SPEC=$TORCH_SPEC"
       -t "$IMAGE")
if [[ -n $WHEELS ]]; then build+=(--build-context "wheels=$WHEELS"); fi
if [[ -n $CA_BUNDLE ]]; then build+=(--secret "id=ca,src=$CA_BUNDLE"); fi

log "building $IMAGE: podman build ${build[*]} ."
"${PODMAN[@]}" build "${build[@]}" .
"${PODMAN[@]}" image ls "$IMAGE"

if [[ $TEST == 1 ]]; then
    IMAGE=$IMAGE ENGINE="${PODMAN[*]}" RUN_OPTS="${ULIMITS[*]}" docker/test-image.sh
fi
