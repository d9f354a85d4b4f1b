"""Triton's interpreter with every program of a launch in a thread of its own.

The interpreter runs a launch's programs one after another, so programs that meet at a barrier (the
persistent path of rnnkernels/triton) could never wait for each other there. Inside `concurrent_programs()`
each program runs in its own thread, all at once as on a GPU whose grid is resident, switching every few
microseconds (the GIL's switch interval, shortened), so the barriers are met for real and a phase that
reads what another program has not written yet shows in the results.

This reaches into the interpreter (GridExecutor, which calls each program as `self.fn`, and the builder,
whose `grid_idx` says which program is running); UNSUPPORTED says why not where those are not as expected.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading

try:
    from triton.runtime import interpreter
except ImportError:
    interpreter = None

if interpreter is None:
    UNSUPPORTED = "triton is not installed"
elif not (hasattr(interpreter, "GridExecutor") and hasattr(interpreter, "interpreter_builder")
          and hasattr(interpreter.interpreter_builder, "set_grid_idx")):
    UNSUPPORTED = "this triton's interpreter has no GridExecutor or interpreter_builder.set_grid_idx"
else:
    UNSUPPORTED = None


@contextlib.contextmanager
def concurrent_programs(switch_interval_s: float = 2e-6):
    """Within: every launch of an interpreted kernel runs its programs in threads; yields a list that
    collects each launch's number of programs."""
    if UNSUPPORTED:
        raise RuntimeError(UNSUPPORTED)
    builder = interpreter.interpreter_builder
    local = threading.local()
    original_class, original_call = type(builder), interpreter.GridExecutor.__call__
    # Which program runs: per thread (the interpreter keeps one for the process).
    builder.__class__ = type("ThreadedInterpreterBuilder", (original_class,), {
        "grid_idx": property(lambda self: getattr(local, "grid_idx", None),
                             lambda self, value: setattr(local, "grid_idx", value))})
    launches = []

    def threaded_call(self, *args, **kwargs):
        program = self.fn
        self.fn = _Starter(program, builder, launches).as_program()
        try:
            return original_call(self, *args, **kwargs)
        finally:
            self.fn = program

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval_s)
    interpreter.GridExecutor.__call__ = threaded_call
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = original_call
        builder.__class__ = original_class
        sys.setswitchinterval(switch_interval)


class _Starter:
    """Stands in for a launch's program in the executor's loop: starts it in a thread for the program the
    loop has just set, and after the last waits for all of them (results are copied back after the loop)."""

    def __init__(self, program, builder, launches: list):
        self.program, self.builder, self.launches = program, builder, launches
        self.threads, self.errors = [], []

    def as_program(self):
        """A function with the program's parameters (the executor binds the launch's arguments to them)
        and globals (where it finds the triton.language it patches), which calls start()."""
        names = list(inspect.signature(self.program).parameters)
        namespace = dict(self.program.__globals__, _start=self.start)
        exec(f"def program({', '.join(names)}):\n    _start({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n",
             namespace)
        return namespace["program"]

    def start(self, program_args: dict):
        index = self.builder.grid_idx

        def run():
            self.builder.grid_idx = index
            try:
                self.program(**program_args)
            except BaseException as error:  # noqa: BLE001 (raised again in the launching thread)
                self.errors.append(error)

        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()
        if len(self.threads) == math.prod(self.builder.grid_dim):
            for thread in self.threads:
                thread.join()
            self.launches.append(len(self.threads))
            if self.errors:
                raise self.errors[0]
