"""
Public test helpers: Jano's tests use them, and so can yours.

* :class:`FakeModelServer` speaks llama.cpp, OpenAI and Ollama wire formats
  (streamed and not), with configurable chunk count, pacing and size, and
  records client disconnects.  ``python -m jano.testing`` serves one.
* :class:`SimulatedSwapper` is a swapper whose swap takes a set time on a
  clock (demo mode uses it).
* :class:`FakeProcessReactor` is a strict fake of ``spawnProcess`` for
  testing swap scripts' handling without real processes.
"""

from jano.demo import FakeModelServer, SeenRequest, SimulatedSwapper
from jano.testing._process import ANY, FakeProcess, FakeProcessReactor

__all__ = ["ANY", "FakeModelServer", "FakeProcess", "FakeProcessReactor", "SeenRequest",
           "SimulatedSwapper"]
