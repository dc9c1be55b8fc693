""":class:`XLAProfiler`: torch_xla's profiler server and named traces of the steps (``profiler="xla"``)."""

from __future__ import annotations

import importlib.util
from typing import Any

from typing_extensions import override

from ember._registry import Registry
from ember._validation import check_int
from ember.trainer.profilers.base import Profiler

__all__ = ["XLAProfiler"]


class XLAProfiler(Profiler):
    """Lightning's XLA profiler: the first step starts torch_xla's profiler server on ``port`` (once
    per process), and each ``training_step``, ``backward``, ``validation_step``, ``test_step`` and
    ``predict_step`` runs inside a named ``torch_xla.debug.profiler`` trace (the evaluation steps as
    a ``StepTrace`` numbered per action, which also ends the step's lazy graph, as in Lightning).
    Capture a trace while it runs with TensorBoard's profile plugin or
    ``torch_xla.debug.profiler.trace("localhost:<port>", logdir)``; this profiler prints no report.

    Example::

        Trainer(accelerator="xla", profiler=XLAProfiler(port=9012))

    Args:
        port: the profiler server's TCP port (an int in 1-65535).

    Raises:
        ModuleNotFoundError: without torch_xla (``pip install torch_xla``), when it is made.
    """

    RECORD_FUNCTIONS = ("training_step", "backward", "validation_step", "test_step", "predict_step")
    STEP_FUNCTIONS = ("validation_step", "test_step", "predict_step")

    def __init__(self, port: int = 9012) -> None:
        super().__init__()
        check_int("port", port, minimum=1, maximum=65535, owner="XLAProfiler")
        if importlib.util.find_spec("torch_xla") is None:  # (not imported here: that takes seconds)
            raise ModuleNotFoundError(
                "XLAProfiler needs torch_xla, which is not installed: pip install torch_xla (with the torch "
                "version it names)"
            )
        self.port = port
        self.server: Any = None  # torch_xla's server, once started (it lives as long as the process)
        self.recorded: dict[str, int] = {}  # action -> how many times it ran inside a trace
        self._open: dict[str, list[Any]] = {}  # running action -> its entered trace(s)

    @classmethod
    @override
    def register_profilers(cls, registry: Registry[Profiler]) -> None:
        registry.register("xla", cls, "torch_xla's profiler server and traces of the steps")

    @override
    def start(self, action_name: str) -> None:
        step = action_name.rsplit(".", 1)[-1]
        if step not in self.RECORD_FUNCTIONS:
            return
        import torch_xla.debug.profiler as xp

        if self.server is None:
            self.server = _server(xp, self.port)
        count = self.recorded.get(action_name, 0)
        trace = (
            xp.StepTrace(action_name, step_num=count)
            if step in self.STEP_FUNCTIONS
            else xp.Trace(action_name)
        )
        trace.__enter__()
        self._open.setdefault(action_name, []).append(trace)
        self.recorded[action_name] = count + 1

    @override
    def stop(self, action_name: str) -> None:
        traces = self._open.get(action_name)
        if traces:
            traces.pop().__exit__(None, None, None)

    @override
    def teardown(self, stage: str | None) -> None:
        for traces in self._open.values():  # after an error inside a step: close what it left open
            while traces:
                traces.pop().__exit__(None, None, None)


_SERVERS: dict[int, Any] = {}  # torch_xla starts one server per port and process: keep it


def _server(xp: Any, port: int) -> Any:
    if port not in _SERVERS:
        _SERVERS[port] = xp.start_server(port)
    return _SERVERS[port]
