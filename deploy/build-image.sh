#!/bin/sh
# Build hugepaged's container image with nothing pulled from a container registry: a Debian
# base made here from the Debian archive, then deploy/Containerfile on top of it.
#
#   deploy/build-image.sh [TAG]        TAG defaults to localhost/hugepaged:VERSION (pyproject's)
#
# Needs root, mmdebstrap and buildah (apt-get install mmdebstrap buildah); no container
# runtime: buildah runs the Containerfile's RUN step with chroot isolation. Environment:
#   SUITE     Debian release of the base (bookworm: python3 3.11)
#   MIRROR    Debian archive (http://deb.debian.org/debian)
#   BASE_TAG  name of the base image (localhost/hugepaged-base:$SUITE)
#   CONTAINERS_STORAGE_CONF   where buildah keeps its images (containers-storage.conf(5))
# tests/test_container.py runs this script, then runs the image with the DaemonSet's
# privileges against a real process.
set -eu

cd "$(dirname "$0")/.."
TAG=${1:-localhost/hugepaged:$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_TAG=${BASE_TAG:-localhost/hugepaged-base:$SUITE}

now() { date +%s.%N; }
secs() { awk "BEGIN { printf \"%.1f\", $2 - $1 }"; }

# 1. The base: Debian's Essential packages (util-linux gives nsenter and setpriv) plus
# python3 and its venv module, and libstdc++6, which numpy's manylinux wheels take from the
# system; installed by mmdebstrap straight into an empty image's root.
# mmdebstrap rather than debootstrap: it installs through apt with unsafe I/O, 17 s here where
# debootstrap --variant=minbase took 38 s for the same packages. (With a root file system
# tarball instead, `podman import base.tar "$BASE_TAG"` makes the same image.)
t0=$(now)
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mmdebstrap --quiet --variant=essential --include=python3,python3-venv,libstdc++6 \
    "$SUITE" "$(buildah mount "$ctr")" "$MIRROR"
buildah commit --quiet --rm "$ctr" "$BASE_TAG" >/dev/null
trap - EXIT
t1=$(now)

# 2. The image. pip in the RUN step trusts the CA certificates this host trusts (a TLS
# proxy's, say): the host's bundle is mounted for the build only, never kept in the image.
set --
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    set -- --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
fi
buildah bud --quiet --isolation chroot "$@" --build-arg "BASE=$BASE_TAG" \
    -f deploy/Containerfile -t "$TAG" . >/dev/null
t2=$(now)
echo "built $TAG on $BASE_TAG: base $(secs "$t0" "$t1") s, image $(secs "$t1" "$t2") s"
