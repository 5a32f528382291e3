"""A small stand-in for the Hugging Face Hub, for tests: the HTTP endpoints the real `huggingface_hub` client calls
to create a repo, commit files, and download them (`snapshot_download`, `hf_hub_download`).

Everything is kept in memory. Every file is committed as a "regular" (non-LFS) file: the `preupload` endpoint says
so, and the client then sends the content base64-encoded inside the NDJSON commit, so no LFS/Xet transfer API is
needed. Not implemented: LFS, pull-request merging, tags, authentication (tokens are accepted and ignored).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    """A repo: commits (sha -> files) and refs (branch or `refs/pr/N` -> sha)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], ref: str) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}:{sorted(files)}".encode() + b"".join(files.values())).hexdigest()
        self.commits[sha] = files
        self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        """The commit sha a branch, PR ref or sha names; None if unknown."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """The server's state and its HTTP server. `requests` records (method, path) of every request served,
    `private` whether each repo was created private, `commit_messages` (repo, summary) of every commit."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.private: dict[str, bool] = {}
        self.commit_messages: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        """Creates a repo holding `files` on `main` (a dataset repo with `repo_type="dataset"`); returns the commit."""
        with self.lock:
            repo = self.repos.setdefault(_key(repo_id, repo_type), Repo())
            return repo.commit(dict(files), "main")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (a copy)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    def edit(self, repo_id: str, files: dict[str, bytes | None], ref: str = "main") -> str:
        """Commits changes directly on the server (`None` deletes a file): to damage a repo in tests."""
        with self.lock:
            repo = self.repos[repo_id]
            updated = dict(repo.commits[repo.refs[ref]])
            for path, content in files.items():
                if content is None:
                    updated.pop(path, None)
                else:
                    updated[path] = content
            return repo.commit(updated, ref)


def _key(repo_id: str, repo_type: str) -> str:
    """Model repos are stored under their id, dataset repos under `datasets/<id>`."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def _etag(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # ------------------------------------------------------------------ plumbing

        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head=False) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
            self._reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, head: bool = False) -> None:
            self._reply(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            hub.requests.append((method, url.path))
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            with hub.lock:
                if method == "POST" and url.path == "/api/repos/create":
                    return self._create_repo(json.loads(self._body()))
                if method == "POST" and url.path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 4:  # /api/models/{repo}[/{action}/{revision}...]
                    repo_id, action, rest = "/".join(parts[2:4]), (parts[4:] or ["revision"])[0], "/".join(parts[5:])
                    return self._api(method, repo_id, action, rest, query)
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:  # the same under /api/datasets/
                    repo_id, action, rest = "/".join(parts[2:4]), (parts[4:] or ["revision"])[0], "/".join(parts[5:])
                    return self._api(method, _key(repo_id, "dataset"), action, rest, query)
                if (
                    parts[:1] == ["datasets"]
                    and len(parts) >= 6
                    and parts[3] == "resolve"
                    and method in ("GET", "HEAD")
                ):
                    key, revision, path = "/".join(parts[:3]), unquote(parts[4]), unquote("/".join(parts[5:]))
                    return self._resolve(key, revision, path, method)
                if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                    return self._resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])), method)
            self._error(404, "NotFound")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._route("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        # ------------------------------------------------------------------ endpoints

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            url = f"{hub.endpoint}/{repo_id}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            hub.repos[repo_id] = repo = Repo()
            hub.private[repo_id] = payload.get("visibility") == "private"
            repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "main")
            self._json(200, {"url": url, "name": repo_id})

        def _api(self, method: str, repo_id: str, action: str, rest: str, query: dict[str, str]) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            revision = unquote(rest.split("/")[0]) if rest else "main"
            if method == "POST" and action == "branch":
                if revision in repo.refs:
                    return self._json(409, {"error": "Reference already exists"})
                repo.refs[revision] = repo.refs["main"]
                return self._json(200, {})
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound")
            files = repo.commits[sha]
            if method == "POST" and action == "preupload":
                paths = [entry["path"] for entry in json.loads(self._body())["files"]]
                modes = [{"path": path, "uploadMode": "regular", "shouldIgnore": False} for path in paths]
                return self._json(200, {"files": modes})
            if method == "POST" and action == "commit":
                return self._commit(repo_id, repo, revision, query.get("create_pr") == "1")
            if method == "GET" and action == "revision":
                siblings = [{"rfilename": path} for path in sorted(files)]
                return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings})
            if method == "GET" and action == "tree":
                return self._tree(files, "/".join(rest.split("/")[1:]), query.get("recursive") in ("True", "true"))
            self._error(404, "NotFound")

        def _commit(self, repo_id: str, repo: Repo, revision: str, create_pr: bool) -> None:
            updated = dict(repo.commits[repo.resolve(revision)])
            for line in self._body().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    updated[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    updated.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    updated = {path: data for path, data in updated.items() if not path.startswith(prefix)}
                elif item["key"] == "header":
                    hub.commit_messages.append((repo_id, value["summary"]))
                else:
                    return self._json(400, {"error": f"this test server does not support {item['key']!r}"})
            ref = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo.refs) + 1}" if create_pr else revision
            sha = repo.commit(updated, ref)
            pr_url = f"{hub.endpoint}/{repo_id}/discussions/{ref.rsplit('/', 1)[-1]}" if create_pr else None
            self._json(
                200, {"commitOid": sha, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "pullRequestUrl": pr_url}
            )

        def _tree(self, files: dict[str, bytes], path: str, recursive: bool) -> None:
            prefix = f"{path.rstrip('/')}/" if path else ""
            entries, folders = [], set()
            for name, content in sorted(files.items()):
                if not name.startswith(prefix):
                    continue
                relative = name[len(prefix) :]
                if "/" in relative and not recursive:
                    folders.add(prefix + relative.split("/")[0])
                    continue
                for depth in range(1, relative.count("/") + 1):
                    folders.add(prefix + "/".join(relative.split("/")[:depth]))
                entries.append({"type": "file", "path": name, "size": len(content), "oid": _etag(content)[:40]})
            entries += [{"type": "directory", "path": folder, "oid": "0" * 40} for folder in sorted(folders)]
            self._json(200, entries)

        def _resolve(self, repo_id: str, revision: str, path: str, method: str) -> None:
            head = method == "HEAD"
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", head)
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", head)
            content = repo.commits[sha].get(path)
            if content is None:
                return self._error(404, "EntryNotFound", head)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_etag(content)}"', "Content-Type": "application/octet-stream"}
            self._reply(200, content, headers, head=head)

    return Handler
