"""The lifecycle shared by the fake servers: http.server on loopback, in a thread."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POLL_INTERVAL = 0.05  # stop() waits up to this long for serve_forever to notice


class LoopbackServer:
    """Serves `handler` on host:port (port 0: any free one); handlers see `self.server.fake`."""

    handler: type[BaseHTTPRequestHandler]
    host = "127.0.0.1"
    port = 0
    url = ""
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self):
        self._server = ThreadingHTTPServer((self.host, self.port), self.handler)
        self._server.daemon_threads = True
        self._server.fake = self
        self.port = self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL_INTERVAL,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
