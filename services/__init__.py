"""Shared pieces every plane imports: settings, data, the model, the registries."""

import logging

# kafka-python 3 warns from its network selector whenever one step of a coroutine runs
# over 0.1 s ("... is blocking the event loop"). On two busy cores a fetch's decoding or
# a GIL held by the apply thread does that now and then; it is a hint for the library's
# own developers, not a fault here (lag and counts show real stalls). Its errors remain.
logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
