# cython: language_level=3
"""gridgate's compiled hot path, built as the extension ``gridgate._fastparse``.

Why compiled: every byte a device sends goes through these functions, and in
CPython the per-byte and per-field loops of a protocol decoder and a payload
validator cost 10-50x what they cost in C. Everything here has a pure-Python
twin (gridgate.protocols.mqtt.codec_py, codec5_py, gridgate.ingest.validator_py,
gridgate.protocols.http.parser_py, gridgate.protocols.wsmask_py,
gridgate.sinks.nats_acks_py, gridgate.sinks.nats_frames_py; the spool
writer's rows are storage.spool.record_rows') that is the reference; the
test suite runs against both and checks they agree on arbitrary input.

The parts live in include files so they can be read (and written) separately
while staying one extension module.
"""

include "_fastparse_mqtt.pxi"
include "_fastparse_mqtt5.pxi"
include "_fastparse_payload.pxi"
include "_fastparse_http.pxi"
include "_fastparse_spool.pxi"
include "_fastparse_ws.pxi"
include "_fastparse_nats.pxi"
