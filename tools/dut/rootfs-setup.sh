#!/bin/sh
# Run by tools/build_dut_images.py inside a fresh debootstrap root (chroot): makes it the root a
# board mounts over NFS. Argument: 1 to drop documentation, manual pages and translations.
set -eu
slim="${1:-1}"

echo pumice-nfs > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tpumice-nfs\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
# root logs in on the console with no password (LAVA's auto_login sends "root"); SSH takes keys only
passwd -d root >/dev/null
# the root is the NFS mount the initramfs made (rw or ro from the command line): nothing to remount
echo "# the root filesystem is mounted over NFS by the initramfs" > /etc/fstab
# each boot makes its own machine id (several boards boot copies of one root)
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
# what the package installation left behind
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/apt/* \
    /var/log/dpkg.log /var/log/bootstrap.log /var/log/alternatives.log
if [ "$slim" = 1 ]; then
    rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/*
fi
