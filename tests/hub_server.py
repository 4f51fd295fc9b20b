"""A stand-in for the Hugging Face Hub HTTP API: just the calls `finetune push` makes, served on 127.0.0.1.

The real `huggingface_hub` client talks to it (HF_ENDPOINT or `HfApi(endpoint=...)`). It implements, as
huggingface_hub 2.x calls them: POST /api/repos/create, POST /api/models/{repo}/branch/{branch},
POST /api/validate-yaml (the client checks README.md front-matter before committing),
POST /api/models/{repo}/preupload/{rev} (answers "regular" for every file, so contents are inlined base64 in the
commit rather than sent through LFS/xet) and POST /api/models/{repo}/commit/{rev} (NDJSON). Everything received
is recorded; the Authorization header is kept apart from the rest so tests can scan what was stored for secrets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO_OP = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/?]+)$")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # without Authorization
    authorization: str | None
    body: bytes


@dataclass
class FakeHub:
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)  # repo id -> {"private": bool, "branches": [...]}
    commits: list[dict] = field(default_factory=list)  # {"repo", "revision", "summary", "files": {path: bytes}}
    fail_commits: int = 0  # answer the next N commit calls with 503
    failed_commits: int = 0

    def stored_text(self) -> str:
        """Everything the server kept, except Authorization headers, as one string to scan."""
        parts = []
        for r in self.requests:
            parts += [r.method, r.path, json.dumps(r.headers), r.body.decode("utf-8", "replace")]
        for c in self.commits:
            parts += [c["summary"]] + [f"{p}\n{b.decode('utf-8', 'replace')}" for p, b in c["files"].items()]
        return "\n".join(parts)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._record(b"")
            self._reply(404, {"error": f"not implemented: GET {self.path}"})

        def do_POST(self):
            body = self._body()
            self._record(body)
            path = urlsplit(self.path).path
            if path == "/api/repos/create":
                spec = json.loads(body)
                repo = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                if repo in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo"})
                hub.repos[repo] = {"private": spec.get("visibility") == "private" or spec.get("private") is True,
                                   "branches": ["main"]}
                return self._reply(200, {"url": f"{hub.url}/{repo}"})
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            m = _REPO_OP.match(path)
            if not m or m["repo"] not in hub.repos:
                return self._reply(404, {"error": f"not found: {path}"})
            repo, op, rev = m["repo"], m["op"], unquote(m["rev"])
            if op == "branch":
                hub.repos[repo]["branches"].append(rev)
                return self._reply(200, {})
            if rev not in hub.repos[repo]["branches"]:
                return self._reply(404, {"error": f"Revision Not Found: {rev}"})
            if op == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if hub.fail_commits:  # op == "commit"
                hub.fail_commits -= 1
                hub.failed_commits += 1
                return self._reply(503, {"error": "Service Unavailable (simulated)"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            unexpected = [item["key"] for item in lines if item["key"] not in ("header", "file")]
            if unexpected:
                return self._reply(400, {"error": f"unsupported commit operations {unexpected}"})
            oid = hashlib.sha1(body).hexdigest()
            hub.commits.append({"repo": repo, "revision": rev, "summary": header["summary"], "files": files,
                                "oid": oid})
            return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

        def _record(self, body: bytes) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            hub.requests.append(Request(self.command, self.path, headers, self.headers.get("Authorization"), body))

    return Handler


class serve:
    """`with serve() as hub:` a FakeHub listening on a free port of 127.0.0.1, stopped on exit."""

    def __enter__(self) -> FakeHub:
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.server.timeout = 5
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
