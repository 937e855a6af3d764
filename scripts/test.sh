#!/usr/bin/env bash
# Installs what the tests need (Debian packages, pjdfstest, the 'tests' user
# pjdfstest switches to), then runs the test suite. Run as root: the tests
# mount real FUSE and overlay filesystems.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=
for tool in fusermount3 newuidmap setfattr getfacl python3 unshare stress-ng podman runc busybox strace setcap \
    buildah slirp4netns catatonit fuse-overlayfs usermod; do
  command -v "$tool" >/dev/null || need_apt=1
done
if [ -n "$need_apt" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 attr acl python3 util-linux kmod stress-ng podman runc busybox-static strace libcap2-bin \
    buildah uidmap slirp4netns catatonit fuse-overlayfs passwd >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
# pjdfstest switches to user and group 'tests'. Either may exist without the
# other (useradd --user-group refuses when the group is already there).
getent group tests >/dev/null || groupadd tests
id -u tests >/dev/null 2>&1 || useradd --no-create-home -g tests tests
# Rootless tests map its subordinate ids in user namespaces.
grep -q '^tests:' /etc/subuid 2>/dev/null || usermod --add-subuids 100000-165535 tests
grep -q '^tests:' /etc/subgid 2>/dev/null || usermod --add-subgids 100000-165535 tests
export PJDFSTEST=${PJDFSTEST:-$HOME/.cargo/bin/pjdfstest}
[ -x "$PJDFSTEST" ] || cargo install --locked --quiet pjdfstest

# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --locked --no-fail-fast "$@"
