"""A real HTTP file server on 127.0.0.1 for the download tests: Range requests, ETags, and faults on demand."""

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class FileServer:
    """Serves `files` (URL name -> path) as text/plain, with faults on demand.

    `cut_at[name] = (offset, n_times)`: the first n_times responses for that file that would send the byte at
    `offset` close the connection just before it. `stall_at[name] = (offset, n_times)`: the same, but they send
    nothing more and keep the connection open until the server stops. `drop_after`: every response closes the
    connection after sending this many body bytes. `ignore_range`: answer 200 with the whole file.
    `bytes_per_second`: slow every body down. `answer = (status, content type, body)`: answer every request with
    this instead of the file (a proxy's error page, a login wall, a server error). `headers`: sent instead of the
    true ones (a broken or hostile server's `Content-Length`). `stall_after`: every response sends this many body
    bytes, then nothing more (a server that trickles a little on each connection).
    """

    files: dict[str, Path]
    cut_at: dict[str, tuple[int, int]] = field(default_factory=dict)
    stall_at: dict[str, tuple[int, int]] = field(default_factory=dict)
    drop_after: int | None = None
    ignore_range: bool = False
    bytes_per_second: int | None = None
    answer: tuple[int, str, bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stall_after: int | None = None
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # releases stalled responses
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def fetched(self, name: str) -> int:
        """Body bytes sent for file `name`, over all requests (HEAD sends none)."""
        return sum(r.sent for r in self.requests if r.path == f"/{name}")

    def spans(self, name: str) -> list[tuple[int, int]]:
        """(first byte, bytes sent) of each GET of file `name`."""
        return [(int(r.range.removeprefix("bytes=").split("-")[0]) if r.range else 0, r.sent) for r in self.gets(name)]

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.path == f"/{name}" and r.method == "GET"]

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body: bool):
                name = self.path.lstrip("/")
                if server.answer:
                    self.answer_instead(body, *server.answer)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name].read_bytes()
                start, end, status = 0, len(data), 200
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    first, last = ranged.removeprefix("bytes=").split("-")
                    start, end, status = int(first), min(int(last or len(data) - 1) + 1, len(data)), 206
                record = Request(self.command, self.path, ranged, status)
                with server.lock:
                    server.requests.append(record)
                    stop = end
                    for after in (server.drop_after, server.stall_after):
                        if after is not None:
                            stop = min(stop, start + after)
                    cut_at = take_fault(server.cut_at, name, start, end) if body else None
                    stall_at = take_fault(server.stall_at, name, start, end) if body else None
                    stop = min([stop, *(at for at in (cut_at, stall_at) if at is not None)])
                headers = {
                    "Content-Type": "text/plain; charset=utf-8",
                    "Content-Length": str(end - start),
                    "Accept-Ranges": "bytes",
                    "ETag": '"' + hashlib.sha256(data).hexdigest()[:16] + '"',
                }
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                self.send_response(status)
                for header, value in {**headers, **server.headers}.items():
                    self.send_header(header, value)
                self.end_headers()
                if not body:
                    return
                payload = data[start:stop]
                piece = server.bytes_per_second // 10 if server.bytes_per_second else len(payload) or 1
                try:
                    for at in range(0, len(payload), piece):
                        self.wfile.write(payload[at : at + piece])
                        record.sent += len(payload[at : at + piece])
                        if server.bytes_per_second:
                            time.sleep(0.1)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if stall_at is not None or (server.stall_after is not None and stop < end):
                    server.stopping.wait()
                if stop < end:
                    self.close_connection = True

            def answer_instead(self, body: bool, status: int, content_type: str, page: bytes):
                record = Request(self.command, self.path, self.headers.get("Range"), status)
                with server.lock:
                    server.requests.append(record)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                if body:
                    self.wfile.write(page)
                    record.sent = len(page)

        return Handler


def take_fault(faults: dict[str, tuple[int, int]], name: str, start: int, end: int) -> int | None:
    """The offset of a fault on file `name` that a response sending bytes [start, end) meets, counted off."""
    offset, times = faults.get(name, (0, 0))
    if times > 0 and start <= offset < end:
        faults[name] = (offset, times - 1)
        return offset
    return None
