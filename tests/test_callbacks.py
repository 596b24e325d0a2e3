"""Scheduling order, handles, contexts and errors of callbacks."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import socket
import sys
import threading
import time
import types
from unittest import mock

import ferroloop
import pytest


def test_call_soon_is_fifo_and_new_callbacks_run_next_turn(loop):
    order = []

    def first():
        order.append("first")
        loop.call_soon(order.append, "scheduled-during-turn")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == ["first", "second"]
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == ["first", "second", "scheduled-during-turn"]


def test_timers_fire_in_time_order_and_equal_times_in_scheduling_order(loop):
    order = []
    now = loop.time()
    loop.call_at(now + 0.03, order.append, "c")
    loop.call_at(now + 0.01, order.append, "a1")
    loop.call_at(now + 0.01, order.append, "a2")
    loop.call_later(0.02, order.append, "b")
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert order == ["a1", "a2", "b", "c"]


def test_many_timers_in_and_out_of_order_fire_sorted_with_cancelled_ones_skipped(loop):
    # Ascending deadlines, shuffled ones and equal ones interleaved, a third cancelled:
    # whatever structure keeps them, they must fire in deadline order (asyncio's heap
    # does not order equal deadlines, so neither does this test).
    import random

    rng = random.Random(7)
    base = loop.time() + 0.02
    offsets = [i * 1e-4 for i in range(300)]
    offsets += [rng.uniform(0, 0.03) for _ in range(300)]
    offsets += [0.015] * 50
    rng.shuffle(offsets[300:])
    fired, expected = [], {}
    for seq, offset in enumerate(offsets):
        handle = loop.call_at(base + offset, fired.append, seq)
        if seq % 3 == 0:
            handle.cancel()
        else:
            expected[seq] = handle.when()
    loop.call_at(base + 0.05, loop.stop)
    loop.run_forever()
    assert sorted(fired) == sorted(expected)
    deadlines = [expected[seq] for seq in fired]
    assert deadlines == sorted(deadlines)
    assert len(loop._scheduled) == 0


def test_call_later_waits_at_least_its_delay(loop):
    fired = []
    start = loop.time()
    loop.call_later(0.05, lambda: (fired.append(loop.time()), loop.stop()))
    loop.run_forever()
    assert fired[0] - start >= 0.05 - loop._clock_resolution


def test_cancelled_handles_do_not_run(loop):
    ran = []
    h1 = loop.call_soon(ran.append, 1)
    h2 = loop.call_later(0.001, ran.append, 2)
    h1.cancel()
    h2.cancel()
    assert h1.cancelled() and h2.cancelled()
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert ran == []


def test_timer_handle_surface(loop):
    h = loop.call_later(10, print)
    assert isinstance(h.when(), float)
    assert h.when() == pytest.approx(loop.time() + 10, abs=0.5)
    assert "print" in repr(h) and "when=" in repr(h)
    h.cancel()
    assert "cancelled" in repr(h)


def test_context_is_copied_at_scheduling_and_explicit_context_used(loop):
    var = contextvars.ContextVar("var", default="unset")
    seen = []
    var.set("outer")
    loop.call_soon(lambda: seen.append(var.get()))
    ctx = contextvars.Context()
    ctx.run(var.set, "explicit")
    loop.call_soon(lambda: seen.append(var.get()), context=ctx)
    var.set("changed-after")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == ["outer", "explicit"]


@pytest.mark.parametrize("factory", [False, True], ids=["no-factory", "task-factory"])
def test_create_task_name_and_context_as_asyncio_of_this_version(loop, factory):
    # create_task(context=) is 3.11+: before, both loops refuse it, with or without a
    # task factory, and a task runs in a copy of the caller's context.
    if factory:
        loop.set_task_factory(lambda lp, coro, **kw: asyncio.Task(coro, loop=lp, **kw))
    var = contextvars.ContextVar("var", default="caller")
    ctx = contextvars.Context()
    ctx.run(var.set, "given")

    async def read():
        return var.get()

    if sys.version_info >= (3, 11):
        task = loop.create_task(read(), name="named", context=ctx)
        expected = "given"
    else:
        coro = read()
        with pytest.raises(TypeError, match="context"):
            loop.create_task(coro, name="named", context=ctx)
        coro.close()
        task = loop.create_task(read(), name="named")
        expected = "caller"
    assert task.get_name() == "named"
    assert loop.run_until_complete(task) == expected


def test_callbacks_scheduled_from_an_empty_context_each_run_in_their_own_copy(loop):
    # ferroloop makes no context object for a handle whose caller's context is empty:
    # the copies must still be separate, mutable, and the one get_context() returns.
    var = contextvars.ContextVar("var", default="unset")
    seen = []

    def setter(tag):
        seen.append((tag, var.get()))
        var.set(tag)

    def schedule():
        loop.call_soon(setter, "a")
        loop.call_soon(setter, "b")
        loop.call_later(0, setter, "c")
        handle = loop.call_soon(setter, "d")
        ctx = handle._context
        assert isinstance(ctx, contextvars.Context) and len(ctx) == 0
        assert handle._context is ctx
        ctx.run(var.set, "preset")
        t = threading.Thread(target=loop.call_soon_threadsafe, args=(setter, "e"))
        t.start()
        t.join()
        loop.call_later(0.001, loop.stop)

    contextvars.Context().run(schedule)
    loop.run_forever()
    assert sorted(seen) == [
        ("a", "unset"), ("b", "unset"), ("c", "unset"), ("d", "preset"), ("e", "unset"),
    ]
    assert var.get() == "unset"


def test_a_reader_from_an_empty_context_keeps_one_context_across_runs(loop):
    # asyncio copies the context once for add_reader: what one run sets, the next sees,
    # and a ContextVar token from one run resets in the next.
    var = contextvars.ContextVar("var", default=0)
    rsock, wsock = socket.socketpair()
    runs = []
    tokens = []

    def on_readable():
        rsock.recv(1)
        runs.append(var.get())
        if len(runs) == 2:
            var.reset(tokens.pop())
        else:
            tokens.append(var.set(var.get() + 1))
        if len(runs) < 4:
            wsock.send(b"x")
        else:
            loop.remove_reader(rsock)
            loop.stop()

    try:
        contextvars.Context().run(loop.add_reader, rsock, on_readable)
        wsock.send(b"x")
        loop.run_forever()
    finally:
        rsock.close()
        wsock.close()
    assert runs == [0, 1, 0, 1]


def test_callback_exception_goes_to_handler_and_loop_goes_on(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    after = []

    def boom():
        raise ZeroDivisionError("x")

    handle = loop.call_soon(boom)
    loop.call_soon(after.append, "ran")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert after == ["ran"]
    (ctx,) = contexts
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["handle"] is handle
    assert ctx["message"].startswith("Exception in callback")


def test_keyboard_interrupt_in_callback_propagates_and_rest_stays_queued(loop):
    ran = []

    def interrupt():
        raise KeyboardInterrupt

    loop.call_soon(interrupt)
    loop.call_soon(ran.append, "later")
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    assert ran == []
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert ran == ["later"]


def test_run_until_complete_result_and_stop_before_done(loop):
    async def value():
        await asyncio.sleep(0)
        return 7

    assert loop.run_until_complete(value()) == 7
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError, match="Event loop stopped before Future completed."):
        loop.run_until_complete(fut)


def test_running_loop_bookkeeping(loop):
    async def inner():
        assert asyncio.get_running_loop() is loop
        assert loop.is_running()
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            loop.run_until_complete(coro)
        coro.close()
        with pytest.raises(RuntimeError):
            loop.close()
        return True

    assert loop.run_until_complete(inner())
    assert not loop.is_running()


def test_closed_loop_raises_runtime_error(loop):
    loop.close()
    assert loop.is_closed()
    loop.close()  # idempotent
    for call in (
        lambda: loop.call_soon(print),
        lambda: loop.call_later(1, print),
        lambda: loop.call_at(1, print),
        lambda: loop.call_soon_threadsafe(print),
        lambda: loop.run_forever(),
    ):
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            call()


def test_call_soon_threadsafe_wakes_a_blocked_loop(loop):
    got = []

    def worker():
        time.sleep(0.05)
        loop.call_soon_threadsafe(lambda: (got.append(threading.get_ident()), loop.stop()))

    t = threading.Thread(target=worker)
    t.start()
    started = time.monotonic()
    loop.run_forever()  # nothing else scheduled: only the wake-up ends this
    t.join()
    assert got == [threading.get_ident()]
    assert time.monotonic() - started < 5


def test_no_wake_up_is_lost_when_many_threads_post_to_a_sleeping_loop(loop):
    # Each thread posts one callback and waits until it has run before the next, so the
    # loop falls asleep between posts and wake-ups from eight threads race its waking.
    # A lost one leaves its thread waiting: after a generous wait the thread counts the
    # loss, wakes the loop itself and stops, so that the test fails instead of hanging.
    threads, rounds = 8, 500
    ran = [0] * threads
    lost = []
    finished = []

    def producer(index):
        done = threading.Event()

        def post(callback):
            done.clear()
            loop.call_soon_threadsafe(lambda: (callback(), done.set()))
            if done.wait(30):
                return True
            lost.append(index)
            loop._write_to_self()
            done.wait()
            return False

        for i in range(rounds):
            if i % 25 == 0:
                # Posts that usually find the loop asleep in its wait, not between turns.
                time.sleep(0.002)
            if not post(lambda: ran.__setitem__(index, ran[index] + 1)):
                break
        post(lambda: (finished.append(index), len(finished) == threads and loop.stop()))

    workers = [threading.Thread(target=producer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    loop.run_forever()
    for worker in workers:
        worker.join()
    assert lost == []
    assert ran == [rounds] * threads


def test_tasks_futures_and_gather(loop):
    async def child(i):
        await asyncio.sleep(0.001 * i)
        return i * i

    async def main():
        tasks = [loop.create_task(child(i), name=f"c{i}") for i in range(5)]
        assert tasks[2].get_name() == "c2"
        return await asyncio.gather(*tasks)

    assert loop.run_until_complete(main()) == [0, 1, 4, 9, 16]


def test_task_factory(loop):
    made = []

    def factory(lp, coro, **kwargs):
        task = asyncio.Task(coro, loop=lp, **kwargs)
        made.append(task)
        return task

    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory
    loop.run_until_complete(loop.create_task(asyncio.sleep(0)))
    assert len(made) == 1


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are new in 3.12")
def test_eager_task_factory_runs_tasks_to_their_first_wait_at_creation(loop):
    steps = []

    async def finishes_at_once():
        steps.append("at once")
        return 1

    async def waits():
        steps.append("to the wait")
        await asyncio.sleep(0)
        steps.append("after the wait")
        return 2

    async def main():
        loop.set_task_factory(asyncio.eager_task_factory)
        done = loop.create_task(finishes_at_once(), name="eager")
        pending = asyncio.create_task(waits())
        assert steps == ["at once", "to the wait"]
        assert done.done() and done.result() == 1 and done.get_name() == "eager"
        assert not pending.done()
        return await pending

    assert loop.run_until_complete(main()) == 2
    assert steps == ["at once", "to the wait", "after the wait"]


def test_run_in_executor_and_shutdown_default_executor(loop):
    async def main():
        ident = await loop.run_in_executor(None, threading.get_ident)
        assert ident != threading.get_ident()
        await loop.shutdown_default_executor()

    loop.run_until_complete(main())


def test_async_generators_are_finalised_by_shutdown_asyncgens(loop):
    closed = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def main():
        gen = agen()
        assert await gen.__anext__() == 1
        return gen

    gen = loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert closed == [True]
    del gen



def test_started_async_generators_are_tracked_weakly_until_they_end(loop):
    async def agen():
        yield 1

    async def main():
        first, second = agen(), agen()
        assert len(loop._asyncgens) == 0  # not yet iterated
        assert await first.__anext__() == 1
        assert await second.__anext__() == 1
        assert set(loop._asyncgens) == {first, second}
        # Closed ones stay tracked until they are gone (closed, none is finalised later).
        await first.aclose()
        await second.aclose()
        # While the weak set is iterated, a generator that dies is removed only once
        # the iteration ends; one started meanwhile is added after that removal.
        for held in loop._asyncgens:
            if held is not second:
                continue  # the set's iterator keeps what it yielded last alive
            del held, first
            assert loop._asyncgens._pending_removals  # `first` died mid-iteration
            third = agen()
            assert await third.__anext__() == 1
            await third.aclose()
            break
        assert set(loop._asyncgens) == {second, third}
        del second, third
        return len(loop._asyncgens)

    assert loop.run_until_complete(main()) == 0


def test_async_generator_started_after_shutdown_asyncgens_warns(loop):
    async def agen():
        yield 1

    async def main():
        gen = agen()
        with pytest.warns(ResourceWarning, match="was scheduled after loop.shutdown_asyncgens") as caught:
            assert await gen.__anext__() == 1
        # Still tracked, so that a second shutdown_asyncgens would close it.
        tracked = set(loop._asyncgens) == {gen}
        await gen.aclose()
        return [w.source for w in caught], tracked

    loop.run_until_complete(loop.shutdown_asyncgens())
    assert loop.run_until_complete(main()) == ([loop], True)


def test_asyncgens_replaced_by_another_set_gets_its_add_called(loop):
    added = []

    class Recording(set):
        def add(self, item):
            added.append(item)
            super().add(item)

    async def agen():
        yield 1

    async def main():
        gen = agen()
        assert await gen.__anext__() == 1
        await gen.aclose()
        return gen

    loop._asyncgens = Recording()
    gen = loop.run_until_complete(main())
    assert added == [gen] and loop._asyncgens == {gen}

def test_debug_mode_logs_slow_callbacks(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01
    loop.call_soon(time.sleep, 0.03)
    loop.call_soon(loop.stop)
    with caplog.at_level("WARNING", logger="asyncio"):
        loop.run_forever()
    assert any("Executing" in r.getMessage() and "took" in r.getMessage() for r in caplog.records)


def test_debug_mode_rejects_calls_from_other_threads(loop):
    loop.set_debug(True)
    errors = []

    def other_thread():
        try:
            loop.call_soon(print)
        except RuntimeError as exc:
            errors.append(exc)
        loop.call_soon_threadsafe(loop.stop)

    loop.call_soon(lambda: threading.Thread(target=other_thread).start())
    loop.run_forever()
    assert len(errors) == 1 and "thread" in str(errors[0])


def test_debug_mode_handles_carry_source_traceback(loop):
    loop.set_debug(True)
    handle = loop.call_soon(print)
    assert handle._source_traceback
    assert "created at" in repr(handle)
    handle.cancel()


def test_pythonasynciodebug_enables_debug(monkeypatch, loop_name):
    from tests.conftest import LOOPS

    monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")
    lp = LOOPS[loop_name]()
    try:
        assert lp.get_debug()
    finally:
        lp.close()


def test_ferroloop_run_and_policy():
    async def main():
        return type(asyncio.get_running_loop())

    assert ferroloop.run(main()) is ferroloop.Loop
    with pytest.raises(ValueError):
        ferroloop.run(42)
    old = asyncio.get_event_loop_policy()
    try:
        ferroloop.install()
        assert asyncio.run(main()) is ferroloop.Loop
    finally:
        asyncio.set_event_loop_policy(old)


def test_handles_and_contexts_kept_in_cycles_are_still_collected(loop):
    # The loop keeps its queued handles (and the contexts they copied) away from the
    # cyclic GC while it owns them; whatever is still referenced after the loop lets go
    # must be collectable again, and a full collection in the middle of a turn must not
    # trip over any of them.
    import gc
    import weakref

    class Owner:
        def __init__(self):
            self.handle = None
            self.context = None

        def fire(self):
            gc.collect()

    refs = []
    for i in range(300):
        owner = Owner()
        if i % 3 == 0:
            owner.handle = loop.call_soon(owner.fire)
        elif i % 3 == 1:
            owner.handle = loop.call_later(0, owner.fire)
            owner.context = owner.handle._context
        else:
            owner.handle = loop.call_later(3600, owner.fire)
            owner.handle.cancel()
        refs.append(weakref.ref(owner))
        del owner
    kept_context = loop.call_soon(int)._context
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert kept_context.run(lambda: 42) == 42


def test_dropping_a_loop_with_queued_handles_is_safe():
    # Queued handles (and the contexts they copied) are kept off the cyclic GC while
    # the loop owns them; a loop dropped unclosed with work queued must still be
    # collected without crashing. Run in a subprocess: a crash is an exit code.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import gc, threading, warnings
        import ferroloop
        warnings.simplefilter("ignore")
        for i in range(200):
            loop = ferroloop.new_event_loop()
            loop.call_soon(print, "never")
            loop.call_later(60, print, "never")
            loop.call_later(0, print, "never").cancel()
            t = threading.Thread(target=loop.call_soon_threadsafe, args=(print,))
            t.start(); t.join()
            kept = loop.call_soon(int)
            ctx = kept._context
            del loop, kept
            if i % 10 == 0:
                gc.collect()
            del ctx
        gc.collect()
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_future_done_callbacks_fail_run_in_their_context_and_show_in_ready(loop):
    # Done callbacks of asyncio's C futures are queued by the C module, which drops the
    # handle call_soon returns: ferroloop queues them without one. Everything a handle
    # would show must still be there.
    var = contextvars.ContextVar("var", default="unset")
    contexts, seen = [], []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def failing(fut):
        raise ZeroDivisionError(fut.result())

    fut = loop.create_future()
    var.set("registered")
    fut.add_done_callback(failing)
    fut.add_done_callback(lambda f: seen.append((var.get(), f.result())))
    var.set("later")
    fut.set_result(7)
    queued = list(loop._ready)
    assert len(queued) == 2
    assert all(type(h).__name__ == "Handle" and not h.cancelled() for h in queued)
    assert "failing" in repr(queued[0])
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [("registered", 7)]
    (ctx,) = contexts
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["message"].startswith("Exception in callback")
    assert "failing" in ctx["message"]
    assert type(ctx["handle"]).__name__ == "Handle"
    assert "failing" in repr(ctx["handle"])


def test_keyboard_interrupt_from_a_done_callback_leaves_the_loop(loop):
    def interrupt(_fut):
        raise KeyboardInterrupt

    after = []
    fut = loop.create_future()
    fut.add_done_callback(interrupt)
    fut.set_result(None)
    loop.call_soon(after.append, "next turn")
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    # The rest of the queue is still there, as with asyncio.
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert after == ["next turn"]


@pytest.mark.parametrize("debug", [False, True])
def test_dropped_failed_task_is_reported_without_a_gc_pass(loop, debug):
    # Nothing the loop keeps after a task's step may hold the finished task: its
    # "exception was never retrieved" comes as soon as the last reference goes, not at
    # the next collection. From 3.12 the handler runs in the task's context.
    name = contextvars.ContextVar("name", default="outside")
    seen = []
    loop.set_debug(debug)
    loop.set_exception_handler(lambda lp, ctx: seen.append((ctx, name.get())))

    async def fails():
        name.set("inside")
        raise ZeroDivisionError("dropped")

    async def main():
        asyncio.Task(fails())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return list(seen)

    gc.disable()
    try:
        reported = loop.run_until_complete(main())
    finally:
        gc.enable()
    assert len(reported) == 1
    ctx, value = reported[0]
    assert ctx["message"] == "Task exception was never retrieved"
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert value == ("inside" if sys.version_info >= (3, 12) else "outside")


@pytest.mark.parametrize("debug_from", ["scheduling", "running"])
def test_debug_mode_times_done_callbacks_too(loop, caplog, debug_from):
    def slow(_fut):
        time.sleep(0.03)

    loop.slow_callback_duration = 0.01
    fut = loop.create_future()
    fut.add_done_callback(slow)
    with caplog.at_level("WARNING", logger="asyncio"):
        if debug_from == "scheduling":
            loop.set_debug(True)
        fut.set_result(None)
        # Switched on with the callback already queued: it is timed all the same.
        loop.set_debug(True)
        loop.call_soon(loop.stop)
        loop.run_forever()
    assert any("slow" in r.getMessage() and "took" in r.getMessage() for r in caplog.records)


def test_loop_methods_bound_to_loop_and_subclasses_still_work():
    # Loop gets its own descriptors of LoopCore's methods (for CPython's fast call of an
    # exact type); subclasses, overrides and super() calls must behave as before.
    from ferroloop import _ferroloop

    assert ferroloop.Loop.__dict__["call_soon"].__objclass__ is ferroloop.Loop
    # What Loop defines in Python itself is kept.
    assert isinstance(ferroloop.Loop.__dict__["close"], types.FunctionType)
    with pytest.raises(TypeError):
        _ferroloop.bind_methods_to(int)
    with pytest.raises(TypeError):
        _ferroloop.bind_methods_to(_ferroloop.LoopCore)

    calls = []

    class MyLoop(ferroloop.Loop):
        def call_soon(self, callback, *args, context=None):
            calls.append(callback)
            return super().call_soon(callback, *args, context=context)

    loop = MyLoop()
    try:
        seen = []
        loop.call_soon(seen.append, 1)
        loop.call_later(0, seen.append, 2)
        assert loop.run_until_complete(asyncio.sleep(0.01, "done")) == "done"
        assert seen == [1, 2]
        assert calls[0] == seen.append
        # A method called through LoopCore's own descriptor on a Loop still works.
        assert _ferroloop.LoopCore.time(loop) <= loop.time()
    finally:
        loop.close()


def test_callbacks_from_an_empty_context_errors_and_neighbours(loop):
    # Callbacks whose caller's context was empty: an exception handler runs in the
    # runner's own context before 3.12 (asyncio called it outside the handle's context)
    # and from 3.12 in the failing handle's context, with what the callback set; a
    # variable one callback sets is seen neither by the next such callback nor by a
    # callback with an explicit context, and a handle someone kept keeps what its
    # callback set.
    var = contextvars.ContextVar("var", default="unset")
    seen = []

    def fail():
        seen.append(("fail", var.get()))
        var.set("fail")
        raise ValueError("boom")

    def handler(lp, context):
        seen.append(("handler", var.get(), type(context["exception"]).__name__))

    def setter(tag):
        seen.append((tag, var.get()))
        var.set(tag)

    explicit = contextvars.Context()
    kept = []

    def schedule():
        loop.call_soon(setter, "a")
        loop.call_soon(fail)
        loop.call_soon(setter, "b")
        loop.call_soon(setter, "c", context=explicit)
        loop.call_soon(setter, "d")
        kept.append(loop.call_soon(setter, "e"))
        loop.call_soon(setter, "f")
        loop.call_soon(loop.stop)

    loop.set_exception_handler(handler)
    handler_sees = "fail" if sys.version_info >= (3, 12) else "outer"
    token = var.set("outer")
    try:
        contextvars.Context().run(schedule)
        loop.run_forever()
        assert var.get() == "outer"
    finally:
        var.reset(token)
    assert seen == [
        ("a", "unset"), ("fail", "unset"), ("handler", handler_sees, "ValueError"), ("b", "unset"),
        ("c", "unset"), ("d", "unset"), ("e", "unset"), ("f", "unset"),
    ]
    assert explicit[var] == "c"
    assert kept[0]._context[var] == "e"


def test_a_timer_runs_in_the_first_turn_its_deadline_has_passed(loop):
    # asyncio's turn takes every timer with when < time() + clock resolution after its
    # poll, behind the callbacks already queued: a timer at loop.time() exactly runs in
    # the next turn, before anything that turn queues.
    order = []

    def schedule():
        loop.call_at(loop.time(), order.append, "timer")
        loop.call_soon(order.append, "queued with it")
        loop.call_soon(loop.call_soon, order.append, "queued by the next turn")

    loop.call_soon(schedule)
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert order == ["queued with it", "timer", "queued by the next turn"]


def test_a_timer_seen_due_by_loop_time_runs_by_the_following_turn(loop):
    # A callback that finds loop.time() >= handle.when() is at most one turn ahead of
    # the timer: the turn after it collects the timer (time() only grows), so the timer
    # runs before a callback queued from that turn.
    order = []
    handle = loop.call_later(0.002, order.append, "timer")

    def spin():
        if loop.time() >= handle.when():
            order.append("seen due")
            loop.call_soon(loop.call_soon, order.append, "two turns later")
        else:
            loop.call_soon(spin)

    loop.call_soon(spin)
    loop.call_later(0.1, loop.stop)
    loop.run_forever()
    assert order.index("seen due") < order.index("two turns later")
    assert order.index("timer") < order.index("two turns later")


def test_timers_follow_a_patched_loop_time(loop):
    """Test suites move the clock by patching `loop.time`: asyncio's turn and call_later
    read `self.time()`, so a timer due by the patched clock runs in the next turns."""
    fired = []
    loop.call_later(500, fired.append, "due once the clock moved")
    real_time = loop.time
    with mock.patch.object(loop, "time", lambda: real_time() + 1000):
        # call_later counts from the patched clock too: 1000 + 600 is still ahead.
        loop.call_later(600, fired.append, "not due")
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        assert fired == ["due once the clock moved"]
    # Unpatched, the timer 1600 s ahead of the real clock stays pending.
    loop.run_until_complete(asyncio.sleep(0))
    assert fired == ["due once the clock moved"]


def test_timers_follow_a_subclass_time(loop):
    class Ahead(type(loop)):
        def time(self):
            return super().time() + 1000

    ahead = Ahead()
    try:
        fired = []
        # Due by the subclass's clock, 990 s ahead by the real one.
        ahead.call_at(time.monotonic() + 10, fired.append, "at")
        ahead.call_later(10, fired.append, "later")  # counted from the subclass's clock
        for _ in range(3):
            ahead.run_until_complete(asyncio.sleep(0))
        assert fired == ["at"]
    finally:
        ahead.close()
