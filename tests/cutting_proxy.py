"""A TCP proxy on 127.0.0.1 in front of a real coordinator's HTTP port that breaks
downloads: the first answers to file requests are cut after a given number of bytes,
as a flaky link would. One request per connection (it asks for ``Connection: close``)."""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Exchange:
    """One request through the proxy: its head as sent, and the answer's status line."""

    request: str
    status: str = ""
    cut: bool = False


@dataclass
class CuttingProxy:
    """``cuts``: for each file request in turn, how many bytes of its answer (headers
    included) pass before both connections are closed."""

    upstream: tuple[str, int]
    cuts: list[int] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            text = head.decode("latin-1")
            text = re.sub(r"(?im)^connection:.*\r\n", "", text)
            text = text.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1)
            exchange = Exchange(request=text)
            with self._lock:
                self.exchanges.append(exchange)
                is_file = text.split(" ", 2)[1].endswith("/file")
                limit = self.cuts.pop(0) if is_file and self.cuts else None
            upstream.sendall(text.encode("latin-1"))
            sent = 0
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if not exchange.status:
                    exchange.status = data.split(b"\r\n", 1)[0].decode("latin-1")
                if limit is not None and sent + len(data) >= limit:
                    client.sendall(data[: limit - sent])
                    exchange.cut = True
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)
                sent += len(data)
