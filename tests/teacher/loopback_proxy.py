"""A TCP proxy on 127.0.0.1 in front of a real server, which a test breaks the way networks break: a connection
reset before any reply, an HTTP 503 (a load balancer without a backend), a connection that never answers, or the
whole port closed. Real sockets, real failures: no mock stands in for the server."""

import socket
import threading

MODES = ("forward", "reset", "503", "hang")
_BODY = b'{"error": {"message": "no backend (test proxy)"}}'
SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class LoopbackProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; `fail_next(n, mode)` breaks the next n connections."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0  # accepted so far
        self._failures: list[str] = []
        self._lock = threading.Lock()
        self._hung: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_next(self, n: int, mode: str) -> None:
        assert mode in MODES[1:], mode
        with self._lock:
            self._failures.extend([mode] * n)

    def close(self) -> None:
        """Stop listening: from now on connections are refused, as by a stopped server."""
        self._closed = True
        # shutdown first: a bare close() leaves the socket listening while the accept thread is blocked in it
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._hung:
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                mode = self._failures.pop(0) if self._failures else "forward"
            if mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # linger 0: the peer sees a reset
            elif mode == "503":
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
            elif mode == "hang":
                self._hung.append(client)
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    @staticmethod
    def _answer_503(client: socket.socket) -> None:
        with client:
            client.recv(65536)
            client.sendall(SERVICE_UNAVAILABLE)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
