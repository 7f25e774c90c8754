"""The strategies, registered by (section, method) when this package is imported."""

import agent.actions.boot.uboot  # noqa: F401  (boot u-boot, deploy to: tftp)
from agent.actions import command, finalize  # noqa: F401
from agent.actions.boot import qemu  # noqa: F401
from agent.actions.deploy import tmpfs  # noqa: F401
from agent.actions.test import shell  # noqa: F401
