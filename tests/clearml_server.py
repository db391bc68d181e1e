"""A stand-in ClearML API server on 127.0.0.1 that misbehaves on demand, for the reachability tests.

`mode`:
- "working": `auth.login` with the right key and secret answers a token, as clearml-server does; wrong
  credentials get 401; every other call gets 500 (nothing past the login is served).
- "hang": `/debug.ping` answers, every other call waits until the server stops (an API behind a stuck proxy).
- an HTTP status such as 502 or 500: every call gets it, with an HTML body as a proxy would send.
"""

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY, SECRET_KEY = "test-key", "test-secret"


@dataclass
class ClearMLServer:
    mode: str | int
    paths: list[str] = field(default_factory=list)  # every request's path, in order
    times: list[float] = field(default_factory=list)  # and when it came (time.monotonic)

    def __post_init__(self):
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.httpd.daemon_threads = True  # a hung request must not hold up the end of the test
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def env(self) -> dict[str, str]:
        """The environment that points ClearML at this server."""
        return dict(
            CLEARML_API_HOST=self.url,
            CLEARML_WEB_HOST=self.url,
            CLEARML_FILES_HOST=self.url,
            CLEARML_API_ACCESS_KEY=ACCESS_KEY,
            CLEARML_API_SECRET_KEY=SECRET_KEY,
        )

    def __enter__(self) -> "ClearMLServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.answer()

            def answer(self):
                server.paths.append(self.path)
                server.times.append(time.monotonic())
                call = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
                if server.mode == "hang":
                    if call == "debug.ping":
                        self.send_json(200, {"meta": {"result_code": 200}, "data": {}})
                    else:
                        server.stopping.wait()
                elif server.mode == "working":
                    if call != "auth.login":
                        self.send_json(500, {"meta": {"result_code": 500, "result_msg": "not served here"}})
                    elif self.headers.get("Authorization") == basic_auth(ACCESS_KEY, SECRET_KEY):
                        self.send_json(200, {"meta": {"result_code": 200}, "data": {"token": "a-token"}})
                    else:
                        self.send_json(401, {"meta": {"result_code": 401, "result_msg": "Invalid credentials"}})
                else:
                    body = f"<html><body><h1>{server.mode}</h1></body></html>".encode()
                    self.send_response(int(server.mode))
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def send_json(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
