"""The local Hub's write path: preupload (which files go through LFS), the LFS batch API
with single and multipart uploads to pre-signed URLs, verification, and NDJSON commits."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from quantkit.testing.hub_http import BaseHandler
from quantkit.testing.hub_repo import HubError, Repo, apply_ops


class UploadEndpoints(BaseHandler):
    """The routes a file takes to a commit: preupload, LFS batch, PUT (parts), verify, commit."""

    def h_preupload(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        c = self._rev(r, rev)
        out = []
        for f in self._json(body).get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.server_state._is_lfs(r, c, f["path"], int(f["size"]), sample)
            old = c.tree.get(f["path"])
            oid = (old.sha256 if lfs else (None if old is None or old.sha256 else old.oid)) if old else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": c.id}, {}

    def h_lfs_batch(self, body: bytes, t: str | None, repo: str) -> tuple[int, Any, dict[str, str]]:
        kind = "datasets" if t else "models"
        r = self._repo(kind, repo, write=True)
        hub, base = self.server_state, self._base()
        objects = []
        for o in self._json(body).get("objects", []):
            oid, size = o["oid"], int(o["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in r.lfs:
                href = f"{base}/_lfs/{kind}/{repo}/{oid}"
                upload: dict[str, Any] = {"href": href, "header": {}}
                if hub.multipart_chunk and size > hub.multipart_chunk:
                    n = -(-size // hub.multipart_chunk)
                    upload = {"href": f"{href}/complete", "header": {
                        "chunk_size": str(hub.multipart_chunk), **{str(i): f"{href}/{i}" for i in range(1, n + 1)}}}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{base}/_lfs/{kind}/{repo}/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _upload_target(self, t: str, repo: str) -> Repo:
        """Upload URLs are pre-signed (like S3's): no Authorization header comes with them."""
        r = self.server_state.repos.get(("dataset" if t == "datasets" else "model", repo))
        if r is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return r

    def h_lfs_put(self, body: bytes, t: str, repo: str, oid: str, part: str | None) -> tuple[int, Any, dict[str, str]]:
        r = self._upload_target(t, repo)
        if part is not None:
            self.server_state._parts[(oid, int(part))] = body
            return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}  # noqa: S324 - an etag
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "content does not match its sha256")
        r.lfs[oid] = body
        return 200, b"", {}

    def h_lfs_complete(self, body: bytes, t: str, repo: str, oid: str) -> tuple[int, Any, dict[str, str]]:
        r = self._upload_target(t, repo)
        parts = self._json(body).get("parts", [])
        data = b"".join(self.server_state._parts.pop((oid, p["partNumber"]), b"") for p in parts)
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "parts do not add up to the announced sha256")
        r.lfs[oid] = data
        return 200, {}, {}

    def h_lfs_verify(self, body: bytes, t: str, repo: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        d = self._json(body)
        if d.get("oid") not in r.lfs or len(r.lfs[d["oid"]]) != d.get("size"):
            raise HubError(404, "object not found")
        return 200, {}, {}

    def h_commit(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line must be the header")
        header = lines[0]["value"]
        head = r.commits[r.branches[rev]]
        parent = header.get("parentCommit")
        if parent and not head.id.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = apply_ops(r, dict(head.tree), lines[1:])
        c = self.server_state._commit(r, rev, head, tree, header.get("summary", ""), header.get("description", ""))
        prefix = "" if r.type == "model" else f"{r.type}s/"
        return 200, {"success": True, "commitOid": c.id, "commitUrl": f"{self._base()}/{prefix}{r.id}/commit/{c.id}",
                     "hookOutput": "", "pullRequestUrl": None}, {}
