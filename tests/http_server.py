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
    """Serves `files` (URL name -> path), with faults on demand.

    `cut_at[name] = (offset, n_times)`: the first n_times responses for that file that would send the byte at
    `offset` close the connection just before it. `ignore_range`: answer 200 with the whole file.
    `bytes_per_second`: slow every body down.
    """

    files: dict[str, Path]
    cut_at: dict[str, tuple[int, int]] = field(default_factory=dict)
    ignore_range: bool = False
    bytes_per_second: int | None = None
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
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
                    offset, times = server.cut_at.get(name, (0, 0))
                    cut = body and times > 0 and start <= offset < end
                    if cut:
                        server.cut_at[name] = (offset, times - 1)
                self.send_response(status)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                payload = data[start:offset] if cut else data[start:end]
                piece = server.bytes_per_second // 10 if server.bytes_per_second else len(payload) or 1
                try:
                    for at in range(0, len(payload), piece):
                        self.wfile.write(payload[at : at + piece])
                        record.sent += len(payload[at : at + piece])
                        if server.bytes_per_second:
                            time.sleep(0.1)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if cut:
                    self.close_connection = True

        return Handler
