"""A loopback, in-memory stand-in for the Hugging Face Hub's HTTP API, for end-to-end tests without a network.

It serves the endpoints the real `huggingface_hub` client calls (observed with huggingface_hub 2.4, transformers
5.24 and peft 0.21, see reference/hf-integration.md Appendix A): repository and branch creation, `create_commit`
with regular and LFS files (the legacy LFS protocol, so clients must run with `HF_HUB_DISABLE_XET=1`), model info,
file listings and downloads. It binds 127.0.0.1 only, keeps everything in memory and accepts any token. Model
repositories only.

    with FakeHub() as hub:
        env = hub.client_env(tmp_path / "hf_home", os.environ)   # for a subprocess: HF_ENDPOINT is read at import
        ...
        hub.files("tester/tiny")["config.json"]
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


# Binary weights go through LFS, as the real Hub decides for large files and these extensions.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
REPO_ID = r"(?P<repo>[^/]+/[^/]+)"


EMPTY_COMMIT = "0" * 40


@dataclass
class Repo:
    """One model repository: every commit's files by commit id, and the head commit of each branch."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=lambda: {EMPTY_COMMIT: {}})
    branches: dict[str, str] = field(default_factory=lambda: {"main": EMPTY_COMMIT})

    def sha(self, revision: str) -> str:
        """The commit id of a branch name or commit id."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.commits[self.sha(revision)]


class HubError(Exception):
    """An error answer: HTTP status, message and the `X-Error-Code` header the client maps to an exception."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


class FakeHub:
    """The fake Hub server. Start it with `start()` or a `with` block; `repos` holds the pushed repositories."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD /path", for debugging failed tests
        self._lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("The fake Hub is not running: call start() first.")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client_env(self, hf_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client process: this endpoint, no Xet, a dummy token and a private cache."""
        env = dict(base or {})
        env.pop("HF_HUB_OFFLINE", None)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_TOKEN="hf_fake_token_for_tests",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_OFFLINE="0",
        )
        return env

    # --- API -------------------------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repository at a branch or commit (for assertions)."""
        return self._repo(repo_id).files(revision)

    def create_repo(self, payload: dict) -> tuple[int, dict]:
        if payload.get("type", "model") != "model":
            raise HubError(400, "The fake Hub serves model repositories only")
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = Repo()
        return 200, {"url": url, "name": repo_id}

    def preupload(self, repo_id: str, payload: dict) -> dict:
        self._repo(repo_id)
        files = [
            {
                "path": item["path"],
                "uploadMode": "lfs" if item["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for item in payload["files"]
        ]
        return {"files": files}

    def lfs_batch(self, repo_id: str, payload: dict) -> dict:
        self._repo(repo_id)
        objects = [
            {
                "oid": item["oid"],
                "size": item["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{item['oid']}"}},
            }
            for item in payload["objects"]
        ]
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"LFS object {oid} does not match its sha256 (truncated upload?)")
        with self._lock:
            self._lfs_objects[oid] = body

    def create_branch(self, repo_id: str, branch: str, payload: dict) -> tuple[int, dict]:
        repo = self._repo(repo_id)
        with self._lock:
            if branch in repo.branches:
                return 409, {"error": f"Branch {branch} already exists"}
            repo.branches[branch] = repo.sha(payload.get("startingPoint") or "main")
        return 200, {}

    def commit(self, repo_id: str, revision: str, body: bytes) -> dict:
        repo = self._repo(repo_id)
        if revision not in repo.branches:
            raise HubError(404, f"Branch {revision} not found: create it first", "RevisionNotFound")
        files = dict(repo.files(revision))
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self._lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self._lfs_objects[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key != "header":
                raise HubError(400, f"The fake Hub does not support {key!r} commit operations")
        with self._lock:
            sha = hashlib.sha1(f"{repo_id}@{len(repo.commits)}".encode()).hexdigest()
            repo.commits[sha] = files
            repo.branches[revision] = sha
        return {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def model_info(self, repo_id: str, revision: str = "main") -> dict:
        repo = self._repo(repo_id)
        sha = repo.sha(revision)
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(repo.commits[sha].items())]
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "tags": [], "siblings": siblings}

    def tree(self, repo_id: str, revision: str) -> list[dict]:
        """The whole file listing at once (the client asks recursively; no pagination)."""
        files = self._repo(repo_id).files(revision)
        return [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in sorted(files.items())
        ]

    def resolve(self, repo_id: str, revision: str, path: str) -> tuple[bytes, dict[str, str]]:
        repo = self._repo(repo_id)
        sha = repo.sha(revision)
        headers = {"X-Repo-Commit": sha}
        if path not in repo.commits[sha]:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound", headers)
        data = repo.commits[sha][path]
        digest = hashlib.sha256(data).hexdigest()
        return data, {**headers, "ETag": f'"{digest}"', "X-Linked-Size": str(len(data))}


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to a `FakeHub` method; the class attribute `hub` is set by `FakeHub.start`."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    ROUTES = (
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
        ("POST", re.compile(rf"^/api/models/{REPO_ID}/preupload/(?P<revision>[^/]+)$"), "preupload"),
        ("POST", re.compile(rf"^/{REPO_ID}\.git/info/lfs/objects/batch$"), "lfs_batch"),
        ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
        ("POST", re.compile(rf"^/api/models/{REPO_ID}/commit/(?P<revision>[^/]+)$"), "commit"),
        ("POST", re.compile(rf"^/api/models/{REPO_ID}/branch/(?P<branch>[^/]+)$"), "create_branch"),
        ("GET", re.compile(rf"^/api/models/{REPO_ID}(?:/revision/(?P<revision>[^/]+))?$"), "model_info"),
        ("GET", re.compile(rf"^/api/models/{REPO_ID}/tree/(?P<revision>[^/]+)/?$"), "tree"),
        ("GET", re.compile(rf"^/{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "resolve"),
        ("HEAD", re.compile(rf"^/{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "resolve"),
    )

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(
        self,
        status: int,
        body: bytes | dict | list = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.hub.requests.append(f"{self.command} {path}")
        try:
            for method, pattern, name in self.ROUTES:
                match = pattern.match(path)
                if match and method == self.command:
                    return self._answer(name, match.groupdict(), body)
            raise HubError(404, f"fake Hub: no route for {self.command} {path}")
        except HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            self._send(error.status, {"error": error.message}, headers)

    def _answer(self, name: str, params: dict, body: bytes) -> None:
        hub = self.hub
        if name == "validate_yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if name == "create_repo":
            status, answer = hub.create_repo(json.loads(body))
            return self._send(status, answer)
        if name == "preupload":
            return self._send(200, hub.preupload(params["repo"], json.loads(body)))
        if name == "lfs_batch":
            answer = hub.lfs_batch(params["repo"], json.loads(body))
            return self._send(200, answer, content_type="application/vnd.git-lfs+json")
        if name == "lfs_upload":
            hub.lfs_upload(params["oid"], body)
            return self._send(200)
        if name == "create_branch":
            status, answer = hub.create_branch(params["repo"], params["branch"], json.loads(body or b"{}"))
            return self._send(status, answer)
        if name == "commit":
            return self._send(200, hub.commit(params["repo"], params["revision"], body))
        if name == "tree":
            return self._send(200, hub.tree(params["repo"], params["revision"]))
        if name == "model_info":
            return self._send(200, hub.model_info(params["repo"], params["revision"] or "main"))
        data, headers = hub.resolve(params["repo"], params["revision"], params["path"])
        return self._send(200, data, headers, content_type="application/octet-stream")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch
