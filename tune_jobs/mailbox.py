"""A warm group's mailbox: commands to its workers and rank 0's replies, in order.

An async actor, one per warm group (``tune_jobs.groups``). It holds each command and
reply as the bytes its sender pickled (``trainers.serve.pack``), never the object
itself: its process deserializes nothing the trials send, so it never imports what they
are made of (torch, transformers, the trial's code) and starts as a bare Ray worker.
Measured on the local debug sweep: 6.3 CPU-seconds of start-up when it held the commands
themselves (``trainers.serve`` and torch imported to read them), 2.4 now. This module
imports nothing but Ray, for the same reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray


@ray.remote(num_cpus=0)
class Mailbox:
    """Commands and replies by sequence number, each as the bytes it came as."""

    def __init__(self) -> None:
        self.commands: list[Any] = []
        self.replies: dict[int, Any] = {}
        self.changed = asyncio.Condition()

    async def send(self, command: Any) -> int:
        async with self.changed:
            self.commands.append(command)
            self.changed.notify_all()
            return len(self.commands) - 1

    async def command(self, seq: int, timeout: float) -> Any:
        """Command ``seq`` once it is sent, or ``None`` after ``timeout`` seconds."""
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: len(self.commands) > seq), timeout
                )
            except TimeoutError:
                return None
            return self.commands[seq]

    async def reply(self, seq: int, result: Any) -> None:
        async with self.changed:
            self.replies[seq] = result
            self.changed.notify_all()

    async def result(self, seq: int, timeout: float) -> tuple[bool, Any]:
        """``(True, reply)`` to command ``seq``, or ``(False, None)`` after ``timeout`` seconds."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: seq in self.replies), timeout)
            except TimeoutError:
                return False, None
            return True, self.replies.pop(seq)
