"""The local Hub's storage: repos as git holds them (blobs, commits, branches) and the LFS
objects beside them. In memory; everything here runs under the server's lock.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

# What the Hub writes into every new repo's initial commit (abridged to the patterns that
# matter here): these paths go through LFS whatever their size.
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*"))
LFS_SIZE = 10 * 1024 * 1024  # larger files go through LFS even without a pattern
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Blob:
    size: int
    oid: str  # git oid: of the content, or of the LFS pointer
    sha256: str | None = None  # LFS files only; their bytes live in Repo.lfs
    data: bytes | None = None  # regular files only

    def entry(self, path: str) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.sha256:
            d["lfs"] = {"oid": self.sha256, "size": self.size,
                        "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return d


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    tree: dict[str, Blob]
    title: str
    message: str = ""
    author: str = "system"
    date: str = field(default_factory=now)


@dataclass
class Repo:
    type: str  # "model" | "dataset"
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/convert/...) -> commit
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content

    def resolve(self, rev: str) -> Commit | None:
        cid = self.branches.get(rev) or (rev if rev in self.commits else None)
        if cid is None and len(rev) >= 7:
            cid = next((c for c in self.commits if c.startswith(rev)), None)
        return self.commits.get(cid) if cid else None

    def history(self, commit: Commit) -> Iterator[Commit]:
        c: Commit | None = commit
        while c is not None:
            yield c
            c = self.commits.get(c.parent) if c.parent else None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # without the query
    status: int  # 0: the connection was dropped without an answer
    bytes_in: int  # request body
    bytes_out: int  # response body
    seconds: float


class HubError(Exception):
    """An error answer: status, message, the Hub's X-Error-Code, JSON body and headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 body: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body = body or {"error": message}
        self.headers = headers or {}


def apply_ops(repo: Repo, tree: dict[str, Blob], ops: list[dict[str, Any]]) -> dict[str, Blob]:
    """A commit's NDJSON operations applied to `tree`; LFS files must have been uploaded first."""
    for op in ops:
        key, v = op.get("key"), op.get("value", {})
        if key == "file":
            data = base64.b64decode(v["content"])
            tree[v["path"]] = Blob(len(data), git_blob_oid(data), data=data)
        elif key == "lfsFile":
            sha, size = v["oid"], v.get("size")
            if sha not in repo.lfs or (size is not None and len(repo.lfs[sha]) != size):
                raise HubError(422, f"LFS object {sha} for {v['path']} was never uploaded")
            tree[v["path"]] = Blob(len(repo.lfs[sha]), git_blob_oid(lfs_pointer(sha, len(repo.lfs[sha]))), sha256=sha)
        elif key == "deletedFile":
            if tree.pop(v["path"], None) is None:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        elif key == "deletedFolder":
            for p in [p for p in tree if p.startswith(v["path"].rstrip("/") + "/")]:
                del tree[p]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")
    return tree


def listing(tree: dict[str, Blob], path: str, recursive: bool) -> list[dict[str, Any]]:
    """The tree API's entries under `path`: files and the folders on their way, sorted."""
    prefix = f"{path}/" if path else ""
    out: dict[str, dict[str, Any]] = {}
    for p, blob in tree.items():
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix):].split("/")
        for i in range(1, len(rest)):  # folders on the way
            d = prefix + "/".join(rest[:i])
            if recursive or i == 1:
                out.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                   "size": 0, "path": d})
        if recursive or len(rest) == 1:
            out[p] = blob.entry(p)
    return [out[k] for k in sorted(out)]
