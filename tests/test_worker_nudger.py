"""The worker's post-job nudger: one per process, made after a fork, never shared with the
parent (its lock, queue and thread stay the parent's)."""

from __future__ import annotations

import os

from workers import runtime


def test_a_forked_child_gets_its_own_nudger_and_the_parent_keeps_its_own() -> None:
    parent = runtime.post_job_nudger()
    assert runtime.post_job_nudger() is parent  # cached within a process
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got a fresh nudger, then exit at once
        os.close(read_end)
        fresh = runtime.post_job_nudger() is not parent
        os.write(write_end, b"1" if fresh else b"0")
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == b"1"
    assert runtime.post_job_nudger() is parent
