"""The strategies, registered by (section, method) when this package is imported: every strategy
module is listed here, so none is registered only because another module imports it."""

from agent.actions import command, finalize  # noqa: F401  (command; finalize ends every job)
from agent.actions.boot import bootloader, qemu, uboot  # noqa: F401  (boot: bootloader, qemu, u-boot)
from agent.actions.deploy import tftp, tmpfs  # noqa: F401  (deploy to: tftp, tmpfs)
from agent.actions.test import shell  # noqa: F401  (test: definitions)
