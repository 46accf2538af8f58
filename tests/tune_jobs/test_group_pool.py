"""The sweep's pool of warm groups (``tune_jobs.groups.GroupPool``) on a real local Ray.

The lessees are real Ray actors (one is killed, as an OOM killer would); the groups
are light stand-ins for a Train run (a name and an open/closed flag): what is under
test is who holds which group, not the Train runs, which the e2e PBT tests start.
"""

from __future__ import annotations

import pytest
import ray

from tune_jobs.groups import GroupPool, LeasedGroup


class LightGroup:
    """A group without workers: ``close`` ends it; ``alive`` until then."""

    def __init__(self, plan, prefix, taken):
        self.name = f"{prefix}{len(taken)}"
        self.mailbox, self.filesystem, self.closed = None, None, False

    @property
    def alive(self):
        return not self.closed

    def close(self):
        self.closed = True

    def failure_text(self):
        return "closed"

    def wait_ended(self, timeout):
        pass


@ray.remote(num_cpus=0)
class Lessee:
    """Stands in for a ``WarmTrial`` actor: leases with its own handle, as it does."""

    def lease(self, pool):
        me = ray.get_runtime_context().current_actor
        return ray.get(pool.lease.remote(me))[0]


@pytest.fixture(scope="module")
def lessees():
    """Three live lessees, shared by the tests (each test makes its own pool)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield [Lessee.remote() for _ in range(3)]
    ray.shutdown()


def test_a_lease_past_the_size_waits_for_a_group_given_back(lessees):
    pool = GroupPool.remote(None, 2, LightGroup)
    a, b, c = lessees
    first, second = ray.get([a.lease.remote(pool), b.lease.remote(pool)])
    assert {first, second} == {"group0", "group1"}
    waiting = c.lease.remote(pool)
    ready, _ = ray.wait([waiting], timeout=3)
    assert not ready, "a third group was started past the pool's size"
    ray.get(pool.give_back.remote(first))
    assert ray.get(waiting, timeout=30) == first  # the group given back, not a new one
    assert ray.get(pool.names.remote()) == {"all": ["group0", "group1"], "idle": []}


def test_a_dead_lessees_group_is_closed_and_replaced(lessees):
    pool = GroupPool.remote(None, 2, LightGroup)
    a, (b, c) = Lessee.remote(), lessees[1:]
    held = ray.get(a.lease.remote(pool))
    ray.get(b.lease.remote(pool))
    ray.kill(a)  # dies without giving its group back
    # the waiting lease finds the dead lessee: its group (maybe mid-command) is closed
    new = ray.get(c.lease.remote(pool), timeout=60)
    assert new == "group2"
    names = ray.get(pool.names.remote())
    assert held not in names["all"] and new in names["all"]


def test_a_renewed_group_replaces_the_dead_one_under_the_same_lease(lessees):
    pool = GroupPool.remote(None, 1, LightGroup)
    a, b = lessees[:2]
    link = LeasedGroup(pool, (ray.get(a.lease.remote(pool)), None, None))
    assert link.alive
    renewed = LeasedGroup(pool, ray.get(pool.renew.remote(link.name)))
    assert not link.alive and renewed.alive
    assert ray.get(pool.names.remote()) == {"all": [renewed.name], "idle": []}
    # still one group, still a's: another lease waits (nothing was leaked or freed)
    ready, _ = ray.wait([b.lease.remote(pool)], timeout=2)
    assert not ready


def test_the_sweeps_end_keeps_one_idle_group_for_the_export(lessees):
    """``close_all(keep=1)``: every group ends but one idle one, leased to the driver (the
    export's model work runs there); the next ``close_all()`` ends it too."""
    pool = GroupPool.remote(None, 3, LightGroup)
    a, b = Lessee.remote(), Lessee.remote()  # the module's may still wait in another pool
    names = ray.get([a.lease.remote(pool), b.lease.remote(pool)])
    for name in names:
        ray.get(pool.give_back.remote(name))
    kept = ray.get(pool.close_all.remote(keep=1))
    assert len(kept) == 1 and kept[0][0] in names
    assert ray.get(pool.names.remote()) == {"all": [kept[0][0]], "idle": [kept[0][0]]}
    assert LeasedGroup(pool, kept[0]).alive
    assert ray.get(pool.close_all.remote()) == []
    assert ray.get(pool.names.remote()) == {"all": [], "idle": []}
    assert not LeasedGroup(pool, kept[0]).alive


def test_a_call_runs_on_rank_0_and_hands_back_what_it_raised():
    """``trainers.serve.Call``: rank 0 runs the function (its exception comes back as a
    value: the group lives on); the other ranks do nothing."""
    from types import SimpleNamespace

    from trainers.serve import Call, Raised, Server

    server = Server.__new__(Server)  # the protocol only: no model, no data
    server.ctx, server.run = SimpleNamespace(rank=0), None
    assert server.handle(Call(pow, (2, 10))) == 1024
    raised = server.handle(Call(int, ("x",)))
    assert isinstance(raised, Raised) and isinstance(raised.error, ValueError)
    server.ctx.rank = 1
    assert server.handle(Call(pow, (2, 10))) is None


@ray.remote(num_cpus=0)
class FailingRank0:
    """Rank 0's side of a command that raises: it replies with its failure, then exits."""

    def fail(self, mailbox, seq):
        from trainers.serve import Failed, pack, unpack

        command = unpack(ray.get(mailbox.command.remote(seq, 30)))
        failed = Failed(f"Traceback ...\nValueError: {command} went wrong", ("ValueError",))
        ray.get(mailbox.reply.remote(seq, pack(failed)))


def test_a_failure_reply_outlives_the_worker_that_sent_it(lessees):
    """The mailbox holds a reply's bytes, not an object in the store that its sender owns:
    read after the worker that sent it is gone, the reply is still the trial's error."""
    from trainers.serve import Failed, pack, unpack
    from tune_jobs.mailbox import Mailbox

    mailbox = Mailbox.remote()
    seq = ray.get(mailbox.send.remote(pack("Interval")))
    worker = FailingRank0.remote()
    ray.get(worker.fail.remote(mailbox, seq))
    ray.kill(worker)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.fail.remote(mailbox, seq))  # gone before the reply is read
    ready, reply = ray.get(mailbox.result.remote(seq, 5))
    failed = unpack(reply)
    assert ready and isinstance(failed, Failed)
    assert failed.error.endswith("ValueError: Interval went wrong")
    assert failed.types == ("ValueError",)
