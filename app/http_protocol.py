"""uvicorn's httptools protocol with a bound on request headers: a connection whose headers do
not complete within `header_timeout_s` of its first byte (or of opening) is closed, so clients
that trickle headers (slowloris) or open connections and say nothing cannot hold them. Bodies
are bounded by the app (server.BodyGuard), idle keep-alive connections by uvicorn itself."""

from __future__ import annotations

import logging

log = logging.getLogger("offramp.server")


def bounded_protocol(header_timeout_s: float):
    """The protocol class for uvicorn.Config(http=...), or "auto" where httptools is absent."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer = None

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.warning("request headers not received within %g s: connection closed", header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return BoundedHttpToolsProtocol
