"""An in-memory, Hugging Face Hub-compatible HTTP server for tests.

The real ``huggingface_hub`` client talks to it over HTTP on 127.0.0.1; nothing in the client is
patched. Point the client at it *before* importing ``huggingface_hub`` (it reads the endpoint at
import time): ``HF_ENDPOINT=server.url``, ``HF_TOKEN=server.token``, ``HF_HUB_DISABLE_XET=1``.

    with HubServer(token="hf_test") as hub:
        ...  # create_repo / upload_folder / hf_hub_download through the client
        assert hub.repo("test-user/my-model").files()["config.json"] == b"{}"

Covered: whoami, create/delete repo, repo info (model, dataset, space), tree and paths-info, refs,
commits, branches, preupload + NDJSON commit, LFS batch (basic transfer), resolve (HEAD/GET, byte
ranges), README metadata validation, Space variables, secrets, hardware, sleep time and runtime,
and the client's agent-harness registry (empty). Any other endpoint answers 501, so a missing
feature fails loudly instead of silently.
Not covered: pull requests, tags, gated repos, Xet storage, multipart LFS.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import re
import secrets
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
REPO_TYPES = ("model", "dataset", "space")
SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
# Flavors the Hub accepts for Spaces (huggingface_hub.SpaceHardware, v2.4).
SPACE_HARDWARE = (
    "cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1",
    "l40sx4", "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large",
    "a100x4", "a100x8", "rtx-pro-6000", "rtx-pro-6000x2", "rtx-pro-6000x4", "rtx-pro-6000x8",
)  # fmt: skip
_DEFAULT_APP_FILE = {"gradio": "app.py", "streamlit": "app.py", "docker": "Dockerfile", "static": "index.html"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
# The client tells a bad token apart from a hidden repo by this exact text.
_INVALID_TOKEN = "Invalid credentials in Authorization header"
_INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# Same YAML block pattern as huggingface_hub.repocard.
_YAML_BLOCK_RE = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_COMMIT_COUNTER = itertools.count()


def _now() -> str:
    """Current UTC time in the Hub's ISO format (millisecond precision, ``Z`` suffix)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(content: bytes) -> str:
    """Git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """Return the YAML metadata block at the top of a README, or None when there is none.

    Raises ValueError when the block is not valid YAML or not a mapping.
    """
    match = _YAML_BLOCK_RE.match(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as e:
        raise ValueError(f"README metadata is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README metadata must be a YAML mapping (key: value lines).")
    return data


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Blob:
    """A file's content; ``lfs`` when it arrived through the LFS batch API instead of inline."""

    content: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The git-lfs pointer file git stores in place of an LFS file."""
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            self.sha256.encode(),
            len(self.content),
        )

    @cached_property
    def oid(self) -> str:
        """Git blob id: of the content for regular files, of the pointer for LFS files."""
        return git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag, and as ``oid`` in preupload: sha256 for LFS, git oid otherwise."""
        return self.sha256 if self.lfs else self.oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": len(self.content), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    """One commit: a full snapshot of the repo's files (path -> Blob)."""

    oid: str
    title: str
    message: str
    files: dict[str, Blob]
    parents: list[str]
    author: str
    date: str = field(default_factory=_now)


@dataclass
class Variable:
    """A Space variable or secret, as set through the API."""

    value: str
    description: str | None = None
    updated_at: str = field(default_factory=_now)

    def to_json(self, *, with_value: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"description": self.description, "updatedAt": self.updated_at}
        if with_value:
            data["value"] = self.value
        return data


@dataclass
class Repo:
    """A repository on the test Hub. Tests read it through ``HubServer.repo()``."""

    repo_id: str
    repo_type: str
    private: bool = False
    sdk: str | None = None  # Spaces only: the SDK given at creation
    hardware: str | None = None  # Spaces only: the last requested flavor ("cpu-basic" at creation)
    sleep_time: int | None = None  # Spaces only: seconds of inactivity before sleeping
    variables: dict[str, Variable] = field(default_factory=dict)
    secrets: dict[str, Variable] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit
    created_at: str = field(default_factory=_now)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a full commit sha points to, None if unknown."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """File contents at a revision (branch or commit sha). KeyError if the revision is unknown."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"{self.repo_type} {self.repo_id!r} has no revision {revision!r}")
        return {path: blob.content for path, blob in commit.files.items()}

    def head(self, branch: str = "main") -> Commit:
        """The latest commit on a branch."""
        return self.commits[self.branches[branch]]

    def add_commit(self, branch: str, files: dict[str, Blob], *, title: str, message: str, author: str) -> Commit:
        """Record a new snapshot on ``branch`` (created if absent) and move the branch to it."""
        parent = self.branches.get(branch)
        seed = f"{self.repo_type}/{self.repo_id}\0{branch}\0{parent}\0{title}\0{next(_COMMIT_COUNTER)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, title, message, files, [parent] if parent else [], author)
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit

    def card(self, commit: Commit) -> dict[str, Any] | None:
        """README metadata at a commit, None when missing or invalid."""
        readme = commit.files.get("README.md")
        if readme is None:
            return None
        try:
            return parse_front_matter(readme.content.decode("utf-8", errors="replace"))
        except ValueError:
            return None


# ------------------------------------------------------------------------------------------------
# HTTP plumbing types
# ------------------------------------------------------------------------------------------------


class HubError(Exception):
    """An error answer, shaped like the Hub's: JSON ``{"error": ...}`` plus X-Error-* headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # more JSON fields next to "error"

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _json_response({"error": self.message, **self.extra}, status=self.status, headers=headers)


def _repo_not_found(authenticated: bool) -> HubError:
    # Like the Hub: 401 to anonymous callers, 404 otherwise; private and missing look the same.
    return HubError(401 if not authenticated else 404, "Repository not found", code="RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


@dataclass
class Request:
    method: str
    path: str  # still percent-encoded
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise HubError(400, f"Request body is not valid JSON: {e}") from e

    def flag(self, name: str) -> bool:
        """A boolean query parameter (the client sends ``true``/``false`` or ``1``)."""
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, default=str).encode()  # default=str: YAML card dates
    return Response(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


Handler = Callable[..., Response]

# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------

_TYPES = r"(?P<types>models|datasets|spaces)"
_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"
_REV = r"(?P<rev>[^/]+)"


class HubServer:
    """In-memory Hub on 127.0.0.1, served from a background thread.

    ``token`` is the only valid token; it belongs to ``user``, who may write to its own namespace
    and to ``orgs``. ``lfs_threshold``: files of at least this many bytes go through the LFS batch
    API; None (default) sends every file inline as a "regular" file. State is public for tests:
    ``repos`` ((repo_type, repo_id) -> Repo, or use ``repo()``), ``lfs_objects`` (sha256 -> bytes),
    ``requests`` ((method, path, status) for every request) and ``errors`` (server bugs, answered 500).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        token: str | None = None,
        user: str = "test-user",
        orgs: Iterable[str] = ("test-org",),
        lfs_threshold: int | None = None,
    ) -> None:
        self.port = port
        self.token = token if token is not None else "hf_test_" + secrets.token_hex(16)
        self.user = user
        self.orgs = tuple(orgs)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes = self._build_routes()

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:51234``; the value for ``HF_ENDPOINT``."""
        if self.port == 0:
            raise RuntimeError("The port is chosen when the server starts: call start() first, or pass port=.")
        return f"http://{HOST}:{self.port}"

    def start(self) -> HubServer:
        """Bind 127.0.0.1:port and serve in a daemon thread. Returns self."""
        if self._httpd is not None:
            raise RuntimeError("The test Hub server is already running.")
        try:
            self._httpd = _HTTPServer((HOST, self.port), self)
        except OSError as e:
            raise OSError(f"Cannot start the test Hub server on {HOST}:{self.port}: {e}") from e
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open connections. Safe to call twice."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- inspection ---------------------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo; KeyError (listing what exists) if there is none."""
        with self._lock:
            try:
                return self.repos[(repo_type, repo_id)]
            except KeyError:
                known = ", ".join(f"{t}:{r}" for t, r in self.repos) or "none"
                raise KeyError(f"No {repo_type} repo {repo_id!r} on the test Hub (repos: {known})") from None

    def reset(self) -> None:
        """Forget all repos, LFS objects, logged requests and errors."""
        with self._lock:
            self.repos.clear()
            self.lfs_objects.clear()
            self.requests.clear()
            self.errors.clear()

    # -- dispatch -----------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request (called from the HTTP threads)."""
        try:
            handler, params = self._route(request)
            with self._lock:
                response = handler(request, **params)
        except HubError as e:
            response = e.response()
        except Exception as e:  # a bug in this server: make it visible to the test run
            logger.exception("Test Hub server failed on %s %s", request.method, request.path)
            with self._lock:
                self.errors.append(f"{request.method} {request.path}: {e!r}")
            response = _json_response({"error": f"Test Hub server bug: {e!r}"}, status=500)
        with self._lock:
            self.requests.append((request.method, request.path, response.status))
        return response

    def _build_routes(self) -> list[tuple[tuple[str, ...], re.Pattern[str], Handler]]:
        routes: list[tuple[tuple[str, ...], str, Handler]] = [
            (("GET",), r"/api/whoami-v2", self._whoami),
            (("GET",), r"/api/agent-harnesses", self._agent_harnesses),
            (("POST",), r"/api/repos/create", self._create_repo),
            (("DELETE",), r"/api/repos/delete", self._delete_repo),
            (("POST",), r"/api/validate-yaml", self._validate_yaml),
            (("GET",), rf"/api/{_TYPES}/{_REPO}(?:/revision/{_REV})?", self._repo_info),
            (("GET",), rf"/api/{_TYPES}/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", self._tree),
            (("POST",), rf"/api/{_TYPES}/{_REPO}/paths-info/{_REV}", self._paths_info),
            (("GET",), rf"/api/{_TYPES}/{_REPO}/refs", self._refs),
            (("GET",), rf"/api/{_TYPES}/{_REPO}/commits/{_REV}", self._commits),
            (("POST",), rf"/api/{_TYPES}/{_REPO}/preupload/{_REV}", self._preupload),
            (("POST",), rf"/api/{_TYPES}/{_REPO}/commit/{_REV}", self._commit),
            (("POST",), rf"/api/{_TYPES}/{_REPO}/branch/(?P<branch>[^/]+)", self._create_branch),
            (("DELETE",), rf"/api/{_TYPES}/{_REPO}/branch/(?P<branch>[^/]+)", self._delete_branch),
            (("PUT",), rf"/api/{_TYPES}/{_REPO}/settings", self._settings),
            (("GET", "POST", "DELETE"), rf"/api/spaces/{_REPO}/variables", self._space_variables),
            (("GET", "POST", "DELETE"), rf"/api/spaces/{_REPO}/secrets", self._space_secrets),
            (("GET",), rf"/api/spaces/{_REPO}/runtime", self._space_runtime),
            (("POST",), rf"/api/spaces/{_REPO}/hardware", self._space_hardware),
            (("POST",), rf"/api/spaces/{_REPO}/sleeptime", self._space_sleeptime),
            (("POST",), rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            (("PUT",), r"/__lfs__/(?P<oid>[0-9a-f]{64})", self._lfs_upload),
            (("GET", "HEAD"), rf"/{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
        ]
        return [(methods, re.compile(pattern), handler) for methods, pattern, handler in routes]

    def _route(self, request: Request) -> tuple[Handler, dict[str, str | None]]:
        for methods, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None or request.method not in methods:
                continue
            params: dict[str, str | None] = {
                k: unquote(v) if v is not None else None for k, v in match.groupdict().items()
            }
            if "types" in params:
                params["repo_type"] = _PLURAL_TO_TYPE[params.pop("types") or ""]
            if "prefix" in params:
                params["repo_type"] = _PLURAL_TO_TYPE.get(params.pop("prefix") or "", "model")
            return handler, params
        raise HubError(501, f"The test Hub server does not implement {request.method} {request.path}")

    # -- auth and lookups ---------------------------------------------------------------------------

    def _caller(self, request: Request) -> str | None:
        """The authenticated user, None for anonymous; 401 for a token that is not ours."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise HubError(401, _INVALID_TOKEN)
        return self.user

    def _authenticated(self, request: Request) -> str:
        user = self._caller(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and namespace in (user, *self.orgs)

    def _get_repo(self, request: Request, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        user = self._caller(request)
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._can_write(user, repo.namespace)):
            raise _repo_not_found(authenticated=user is not None)
        if write:
            if user is None:
                raise HubError(401, "Invalid username or password.")
            if not self._can_write(user, repo.namespace):
                raise HubError(403, f"You don't have write access to {repo_type} {repo_id}.")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _revision_not_found(revision)
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- account and repos --------------------------------------------------------------------------

    def _whoami(self, request: Request) -> Response:
        user = self._authenticated(request)
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": "Test User",
                "orgs": [{"type": "org", "name": org, "roleInOrg": "admin"} for org in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test-token", "role": "write"}},
            }
        )

    def _agent_harnesses(self, request: Request) -> Response:
        # The client fetches this registry once, for its user-agent string; empty = no agent detected.
        return _json_response({"standardEnvVars": [], "harnesses": {}})

    def _create_repo(self, request: Request) -> Response:
        user = self._authenticated(request)
        body = request.json()
        repo_type = body.get("type") or "model"
        name = body.get("name") or ""
        namespace = body.get("organization") or user
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}; expected one of {REPO_TYPES}.")
        if not _NAME_RE.fullmatch(name):
            raise HubError(400, f"Invalid repo name {name!r}.")
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}.")
        repo_id = f"{namespace}/{name}"
        if (repo_type, repo_id) in self.repos:
            # create_repo(exist_ok=True) reads the url from this answer.
            url = self._repo_url(self.repos[(repo_type, repo_id)])
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        visibility = body.get("visibility") or ("private" if body.get("private") else "public")
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=visibility in ("private", "protected"))
        if repo_type == "space":
            self._init_space(repo, body)
        repo.add_commit(
            "main", {".gitattributes": Blob(_INITIAL_GITATTRIBUTES)}, title="initial commit", message="", author=user
        )
        self.repos[(repo_type, repo_id)] = repo
        return _json_response({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _init_space(self, repo: Repo, body: dict[str, Any]) -> None:
        sdk = body.get("sdk")
        if sdk not in SPACE_SDKS:
            raise HubError(400, f"Invalid Space SDK {sdk!r}; expected one of {SPACE_SDKS}.")
        hardware = body.get("hardware") or "cpu-basic"
        if hardware not in SPACE_HARDWARE:
            raise HubError(400, f"Invalid hardware flavor {hardware!r}.")
        repo.sdk, repo.hardware, repo.sleep_time = sdk, hardware, body.get("sleepTimeSeconds")
        for item in body.get("variables") or []:
            repo.variables[item["key"]] = Variable(item["value"], item.get("description"))
        for item in body.get("secrets") or []:
            repo.secrets[item["key"]] = Variable(item["value"], item.get("description"))

    def _delete_repo(self, request: Request) -> Response:
        body = request.json()
        namespace = body.get("organization") or self._authenticated(request)
        repo = self._get_repo(request, body.get("type") or "model", f"{namespace}/{body.get('name')}", write=True)
        del self.repos[(repo.repo_type, repo.repo_id)]
        return _json_response({})

    def _settings(self, request: Request, repo_type: str, repo_id: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id, write=True)
        body = request.json()
        if "visibility" in body:
            repo.private = body["visibility"] in ("private", "protected")
        elif "private" in body:
            repo.private = bool(body["private"])
        return _json_response({})

    def _validate_yaml(self, request: Request) -> Response:
        self._caller(request)
        content = request.json().get("content") or ""
        try:
            metadata = parse_front_matter(content)
        except ValueError as e:
            return _json_response({"errors": [{"message": str(e)}], "warnings": []}, status=400)
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
        return _json_response({"errors": [], "warnings": warnings})

    def _repo_info(self, request: Request, repo_type: str, repo_id: str, rev: str | None = None) -> Response:
        repo = self._get_repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, rev or "main")
        card = repo.card(commit)
        with_blobs = request.flag("blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(blob.content), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {
                        "size": len(blob.content),
                        "sha256": blob.sha256,
                        "pointerSize": len(blob.pointer),
                    }
            siblings.append(sibling)
        tags = card.get("tags") if card else None
        data: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "likes": 0,
            "tags": tags if isinstance(tags, list) else [],
            "siblings": siblings,
        }
        if card is not None:
            data["cardData"] = card
        if repo_type == "model":
            data.update(
                downloads=0,
                library_name=(card or {}).get("library_name"),
                pipeline_tag=(card or {}).get("pipeline_tag"),
            )
        if repo_type == "space":
            data.update(sdk=(card or {}).get("sdk") or repo.sdk, runtime=self._runtime(repo))
        return _json_response(data)

    # -- trees, refs, commits -----------------------------------------------------------------------

    def _tree(self, request: Request, repo_type: str, repo_id: str, rev: str, path: str | None = None) -> Response:
        repo = self._get_repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, rev)
        folder = (path or "").strip("/")
        if folder and not _is_dir(commit.files, folder):
            raise HubError(404, f"{folder} does not exist on {rev}", code="EntryNotFound")
        return _json_response(_list_tree(commit.files, folder, recursive=request.flag("recursive")))

    def _paths_info(self, request: Request, repo_type: str, repo_id: str, rev: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, rev)
        form = parse_qs(request.body.decode(), keep_blank_values=True)
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(commit.files[path].tree_entry(path))
            elif _is_dir(commit.files, path):
                entries.append(_dir_entry(commit.files, path))
        return _json_response(entries)

    def _refs(self, request: Request, repo_type: str, repo_id: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(repo.branches.items())
        ]
        return _json_response({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, request: Request, repo_type: str, repo_id: str, rev: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id)
        commit: Commit | None = self._commit_at(repo, rev)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author, "avatar": None}],
                    "date": commit.date,
                }
            )
            commit = repo.commits.get(commit.parents[0]) if commit.parents else None
        return _json_response(history)

    def _create_branch(self, request: Request, repo_type: str, repo_id: str, branch: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id, write=True)
        if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
            raise HubError(400, f"Invalid branch name {branch!r}.")
        starting_point = request.json().get("startingPoint")
        commit = self._commit_at(repo, starting_point) if starting_point else repo.head()
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        repo.branches[branch] = commit.oid
        return _json_response({})

    def _delete_branch(self, request: Request, repo_type: str, repo_id: str, branch: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id, write=True)
        if branch not in repo.branches:
            raise _revision_not_found(branch)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.branches[branch]
        return _json_response({})

    # -- uploads --------------------------------------------------------------------------------------

    def _preupload(self, request: Request, repo_type: str, repo_id: str, rev: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id, write=True)
        _reject_pull_requests(request)
        commit = self._commit_at(repo, rev)
        answers = []
        for item in request.json().get("files", []):
            existing = commit.files.get(item["path"])
            large = self.lfs_threshold is not None and item["size"] >= self.lfs_threshold
            answers.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if large else "regular",
                    "shouldIgnore": False,
                    # Lets the client skip files whose content did not change.
                    "oid": existing.etag if existing is not None else None,
                }
            )
        return _json_response({"files": answers, "commitOid": commit.oid})

    def _commit(self, request: Request, repo_type: str, repo_id: str, rev: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id, write=True)
        _reject_pull_requests(request)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to an existing branch)", code="RevisionNotFound")
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Commit payload is not valid NDJSON: {e}") from e
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if not header or not header.get("summary"):
            raise HubError(400, "A commit needs a header line with a non-empty summary.")
        head_oid = repo.branches[rev]
        parent = header.get("parentCommit")
        if parent and not head_oid.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head_oid].files)
        for line in lines:
            self._apply_operation(files, line.get("key"), line.get("value") or {})
        commit = repo.add_commit(
            rev, files, title=header["summary"], message=header.get("description") or "", author=self.user
        )
        return _json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _apply_operation(self, files: dict[str, Blob], key: str | None, value: dict[str, Any]) -> None:
        if key == "header":
            return
        path = _checked_path(value.get("path"))
        if key == "file":
            content = value.get("content", "")
            files[path] = Blob(base64.b64decode(content) if value.get("encoding") == "base64" else content.encode())
        elif key == "lfsFile":
            data = self.lfs_objects.get(value.get("oid", ""))
            if data is None:
                raise HubError(400, f"LFS object {value.get('oid')} for {path} was never uploaded.")
            files[path] = Blob(data, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        elif key == "deletedFolder":
            inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
            for p in inside:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}.")

    def _lfs_batch(self, request: Request, repo_type: str, repo_id: str) -> Response:
        self._get_repo(request, repo_type, repo_id, write=True)
        body = request.json()
        if body.get("operation") != "upload":
            raise HubError(400, "The test Hub server only supports LFS uploads (downloads go through /resolve).")
        objects = []
        for item in body.get("objects", []):
            entry: dict[str, Any] = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs_objects:  # no actions = already stored, nothing to send
                entry["authenticated"] = True
                entry["actions"] = {"upload": {"href": f"{self.url}/__lfs__/{item['oid']}"}}
            objects.append(entry)
        response = _json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        response.headers["Content-Type"] = "application/vnd.git-lfs+json"
        return response

    def _lfs_upload(self, request: Request, oid: str) -> Response:
        # Stands in for a pre-signed storage URL: no token, the content must match its sha256.
        if hashlib.sha256(request.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 {oid}.")
        self.lfs_objects[oid] = request.body
        return Response(200)

    # -- downloads -------------------------------------------------------------------------------------

    def _resolve(self, request: Request, repo_type: str, repo_id: str, rev: str, path: str) -> Response:
        repo = self._get_repo(request, repo_type, repo_id)
        commit = self._commit_at(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.oid,
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.content))
        byte_range = _parse_range(request.headers.get("Range"), len(blob.content))
        if byte_range is None:
            return Response(200, blob.content, headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{len(blob.content)}"
        return Response(206, blob.content[start : end + 1], headers)

    # -- Spaces ----------------------------------------------------------------------------------------

    def _runtime(self, repo: Repo) -> dict[str, Any]:
        head = repo.head()
        app_file = (repo.card(head) or {}).get("app_file") or _DEFAULT_APP_FILE.get(repo.sdk or "", "app.py")
        return {
            "stage": "RUNNING" if app_file in head.files else "NO_APP_FILE",
            "hardware": {"current": repo.hardware, "requested": repo.hardware},
            "gcTimeout": repo.sleep_time,
            "storage": None,
            "replicas": {"current": 1, "requested": 1},
            "devMode": False,
            "domains": [],
        }

    def _space_variables(self, request: Request, repo_id: str) -> Response:
        repo = self._get_repo(request, "space", repo_id, write=True)
        _update_variables(repo.variables, request)
        return _json_response({key: var.to_json() for key, var in repo.variables.items()})

    def _space_secrets(self, request: Request, repo_id: str) -> Response:
        repo = self._get_repo(request, "space", repo_id, write=True)
        _update_variables(repo.secrets, request)
        return _json_response({key: var.to_json(with_value=False) for key, var in repo.secrets.items()})

    def _space_runtime(self, request: Request, repo_id: str) -> Response:
        return _json_response(self._runtime(self._get_repo(request, "space", repo_id)))

    def _space_hardware(self, request: Request, repo_id: str) -> Response:
        repo = self._get_repo(request, "space", repo_id, write=True)
        body = request.json()
        if body.get("flavor") not in SPACE_HARDWARE:
            raise HubError(400, f"Invalid hardware flavor {body.get('flavor')!r}.")
        repo.hardware = body["flavor"]
        if "sleepTimeSeconds" in body:
            repo.sleep_time = body["sleepTimeSeconds"]
        return _json_response(self._runtime(repo))

    def _space_sleeptime(self, request: Request, repo_id: str) -> Response:
        repo = self._get_repo(request, "space", repo_id, write=True)
        repo.sleep_time = request.json().get("seconds")
        return _json_response(self._runtime(repo))


# ------------------------------------------------------------------------------------------------
# Helpers for the handlers
# ------------------------------------------------------------------------------------------------


def _reject_pull_requests(request: Request) -> None:
    if request.flag("create_pr"):
        raise HubError(400, "The test Hub server does not support pull requests (create_pr=True).")


def _checked_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or any(p in ("", "..") for p in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}.")
    return path


def _update_variables(store: dict[str, Variable], request: Request) -> None:
    """Apply a POST (add/update) or DELETE on Space variables or secrets."""
    if request.method == "GET":
        return
    body = request.json()
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise HubError(400, "A 'key' is required.")
    if request.method == "DELETE":
        store.pop(key, None)
    else:
        store[key] = Variable(str(body.get("value", "")), body.get("description"))


def _is_dir(files: dict[str, Blob], folder: str) -> bool:
    return any(path.startswith(folder + "/") for path in files)


def _dir_entry(files: dict[str, Blob], folder: str) -> dict[str, Any]:
    digest = hashlib.sha1()
    for path, blob in sorted(files.items()):
        if path.startswith(folder + "/"):
            digest.update(f"{path}\0{blob.oid}\0".encode())
    return {"type": "directory", "oid": digest.hexdigest(), "size": 0, "path": folder}


def _list_tree(files: dict[str, Blob], folder: str, *, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries under ``folder`` ("" = root): direct children, or everything if recursive."""
    base = f"{folder}/" if folder else ""
    folders: set[str] = set()
    entries = []
    for path, blob in sorted(files.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        if recursive:
            folders.update(base + "/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append(blob.tree_entry(path))
        elif len(parts) == 1:
            entries.append(blob.tree_entry(path))
        else:
            folders.add(base + parts[0])
    return [_dir_entry(files, f) for f in sorted(folders)] + entries


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range: bytes=...`` header, None to send everything."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


# ------------------------------------------------------------------------------------------------
# stdlib HTTP server
# ------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server that tracks open connections so stop() can close them."""

    daemon_threads = True
    block_on_close = False  # keep-alive connections from the client's pool would block shutdown

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        super().__init__(address, _RequestHandler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out as two writes: avoid a 40 ms delayed-ACK stall
    server: _HTTPServer

    def do_GET(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "Malformed request body")
            return
        url = urlsplit(self.path)
        request = Request(self.command, url.path, parse_qs(url.query, keep_blank_values=True), self.headers, body)
        response = self.server.hub.handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines only (no headers, so never a token); debug level keeps test output clean.
        logger.debug("%s %s", self.address_string(), format % args)
