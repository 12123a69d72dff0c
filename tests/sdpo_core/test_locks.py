"""The workspace's file lock: held, waited for, or refused at once."""

from __future__ import annotations

import threading
import time

import pytest

from sdpo_core.locks import file_lock


def test_a_held_lock_is_refused_without_waiting_and_free_after(tmp_path) -> None:
    path = tmp_path / "sub" / ".lock"  # the folder is made
    with file_lock(path):
        with pytest.raises(BlockingIOError):
            with file_lock(path, wait=False):
                pass
    with file_lock(path, wait=False):
        pass


def test_waiting_takes_the_lock_when_it_is_released(tmp_path) -> None:
    path = tmp_path / ".lock"
    order: list[str] = []

    def wait_for_it() -> None:
        with file_lock(path):
            order.append("waiter")

    with file_lock(path):
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.2)
        order.append("holder")
    waiter.join(5)
    assert order == ["holder", "waiter"]
