"""pytest fixtures of the emulated arm64 board: ``from boards.fixtures import *`` in a test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boards import Arm64Board, start_board

__all__ = ["arm64_board", "board"]


@pytest.fixture(scope="module")
def arm64_board(dut_images, tmp_path_factory) -> Iterator[Arm64Board]:
    """The emulated arm64 board with its cable and ser2net, for one test module."""
    # a short path: unix socket names are limited to 107 bytes
    directory = Path(tmp_path_factory.mktemp("board", numbered=True))
    board = start_board(dut_images.arm64.uboot, directory)
    try:
        yield board
    finally:
        board.stop()


@pytest.fixture
def board(arm64_board: Arm64Board) -> Iterator[Arm64Board]:
    """The module's board for one test; its faults are undone and it is off afterwards."""
    try:
        yield arm64_board
    finally:
        arm64_board.heal()
        arm64_board.power_off()
