"""
Stage 5, forward and stream back: an admitted request goes to its model's
upstream through an ``IAgent`` (:mod:`jano.forward.agent`), with the
end-to-end headers only (:mod:`jano.forward.headers`); the answer streams back
chunk by chunk through a tee that keeps the body's tail for token counting
(:mod:`jano.forward.tee`).  :mod:`jano.forward.exchange` runs one request
from admission to its last byte.
"""

from jano.forward.exchange import BytesProducer, Exchange
from jano.forward.forwarder import Forwarder, abort_client, cut_client, write_error

__all__ = ["BytesProducer", "Exchange", "Forwarder", "abort_client", "cut_client", "write_error"]
