"""QEMU's JSON dialect, both directions, in QEMU's own division of the work.

Input: :mod:`.lexer` (bytes -> tokens) -> :mod:`.streamer` (tokens -> messages: framing,
limits, recovery after errors; :class:`~.streamer.JsonStreamParser` is the entry point) ->
:mod:`.parser` (a message's tokens -> a value, QEMU's error texts); :mod:`.fastpath` is the
streamer's shortcut through the stdlib scanner where it provably agrees. Output:
:mod:`.writer` (values -> QEMU's compact text). :mod:`.unicode` holds QEMU's modified UTF-8
rules both directions share. Written from the behaviour of QEMU 7.2's
``qobject/json-{lexer,streamer,parser,writer}.c`` and ``util/unicode.c`` (checked against a
live QEMU 7.2), not from its code. Every module here is pure (stdlib only); the package
imports nothing but :mod:`statsd_qmp.hash_order` (QDict order, for the writer).
"""
