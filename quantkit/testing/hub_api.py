"""The local Hub's read and account endpoints: whoami, repos, collections, refs, branches,
commits, trees, file downloads, and the card metadata check."""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from quantkit.testing.hub_cards import validate_card_metadata
from quantkit.testing.hub_http import BaseHandler
from quantkit.testing.hub_repo import REPO_ID, HubError, listing, now


class ApiEndpoints(BaseHandler):
    """One `h_<route name>` method per row of hub_http.ROUTES, uploads aside."""

    # ------------------------------------------------------------ account and repos

    def h_whoami(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        return 200, {"type": "user", "name": self.server_state.user, "fullname": "Test User", "orgs": [],
                     "auth": {"type": "access_token",
                              "accessToken": {"displayName": "tests", "role": "write"}}}, {}

    def h_harnesses(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}

    def h_create_repo(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        d = self._json(body)
        repo_id = f"{d.get('organization') or self.server_state.user}/{d['name']}"
        kind = d.get("type") or "model"
        if not REPO_ID.match(repo_id):
            raise HubError(400, f"invalid repo name {repo_id!r}")
        if (kind, repo_id) in self.server_state.repos:
            raise HubError(409, "You already created this model repo", body={"error": "You already created "
                           "this model repo", "url": f"{self._base()}/{repo_id}"})
        private = d.get("private") or d.get("visibility") == "private"
        self.server_state._create(kind, repo_id, bool(private))
        prefix = "" if kind == "model" else f"{kind}s/"
        return 200, {"url": f"{self._base()}/{prefix}{repo_id}", "name": repo_id, "id": repo_id}, {}

    # -- collections: a title is unique per owner (409 with the slug, as the Hub answers)

    def h_create_collection(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        d, hub = self._json(body), self.server_state
        owner = d.get("namespace") or hub.user
        with hub.lock:
            old = next((c for c in hub.collections.values()
                        if c["owner"]["name"] == owner and c["title"] == d["title"]), None)
            if old is not None:
                raise HubError(409, "Collection already exists", body={"error": "Collection already exists",
                                                                      "slug": old["slug"]})
            words = re.sub(r"[^a-z0-9]+", "-", d["title"].lower()).strip("-")
            slug = f"{owner}/{words}-{hub._new_id(owner, d['title'])[:24]}"
            hub.collections[slug] = {"slug": slug, "title": d["title"], "owner": {"name": owner, "type": "user"},
                                     "items": [], "lastUpdated": now(), "position": 0,
                                     "private": bool(d.get("private")), "theme": "indigo", "upvotes": 0,
                                     "description": d.get("description")}
        return 200, hub.collections[slug], {}

    def h_get_collection(self, body: bytes, slug: str) -> tuple[int, Any, dict[str, str]]:
        c = self.server_state.collections.get(slug)
        if c is None:
            raise HubError(404, "Collection not found")
        return 200, c, {}

    def h_add_collection_item(self, body: bytes, slug: str) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        hub, item = self.server_state, self._json(body)["item"]
        with hub.lock:
            c = hub.collections.get(slug)
            if c is None:
                raise HubError(404, "Collection not found")
            if (item["type"], item["id"]) not in hub.repos:
                raise HubError(404, f"{item['type']} {item['id']} not found")
            if any(i["id"] == item["id"] and i["type"] == item["type"] for i in c["items"]):
                raise HubError(409, "Item already in the collection")
            c["items"].append({"_id": hub._new_id(slug, item["id"])[:24], "id": item["id"], "type": item["type"],
                               "position": len(c["items"])})
            c["lastUpdated"] = now()
        return 200, c, {}

    def h_delete_repo(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        self._need_auth()
        d = self._json(body)
        repo_id = f"{d.get('organization') or self.server_state.user}/{d['name']}"
        if self.server_state.repos.pop((d.get("type") or "model", repo_id), None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return 200, {}, {}

    def h_info(self, body: bytes, t: str, repo: str, rev: str | None) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev or "main")
        return 200, {"id": r.id, "_id": r.id, "author": r.id.split("/")[0], "sha": c.id,
                     "private": r.private, "gated": False, "disabled": False, "downloads": 0,
                     "likes": 0, "tags": [], "lastModified": c.date, "createdAt": c.date,
                     "siblings": [{"rfilename": p} for p in sorted(c.tree)]}, {}

    def h_refs(self, body: bytes, t: str, repo: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)

        def ref(name: str) -> dict[str, str]:
            full = name if name.startswith("refs/") else f"refs/heads/{name}"
            return {"name": name.removeprefix("refs/convert/"), "ref": full, "targetCommit": r.branches[name]}

        return 200, {"branches": [ref(b) for b in r.branches if not b.startswith("refs/")],
                     "converts": [ref(b) for b in r.branches if b.startswith("refs/convert/")],
                     "tags": [], "pullRequests": []}, {}

    def h_commits(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        return 200, [{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                      "authors": [{"user": c.author}]} for c in r.history(self._rev(r, rev))], {}

    def h_create_branch(self, body: bytes, t: str, repo: str, branch: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        if branch in r.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._json(body).get("startingPoint") or "main"
        r.branches[branch] = self._rev(r, start).id
        return 200, {}, {}

    def h_delete_branch(self, body: bytes, t: str, repo: str, branch: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo, write=True)
        if branch == "main" or r.branches.pop(branch, None) is None:
            raise HubError(404 if branch != "main" else 403, f"cannot delete branch {branch}")
        return 200, {}, {}

    # ------------------------------------------------------------ reading trees and files

    def h_tree(self, body: bytes, t: str, repo: str, rev: str, path: str | None) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = listing(c.tree, (path or "").strip("/"), recursive)
        if path and not entries and path.strip("/") not in c.tree:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        start = int(self.query.get("cursor", ["0"])[0])
        size = self.server_state.page_size
        page, headers = entries[start:start + size], {}
        if start + size < len(entries):
            url = f"{self._base()}{urlsplit(self.path).path}?recursive={str(recursive).lower()}&cursor={start + size}"
            headers["Link"] = f'<{url}>; rel="next"'
        return 200, page, headers

    def h_paths_info(self, body: bytes, t: str, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev)
        form = parse_qs(body.decode())
        out = []
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in c.tree:
                out.append(c.tree[p].entry(p))
            elif any(k.startswith(p + "/") for k in c.tree):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        return 200, out, {}

    def h_resolve(self, body: bytes, t: str | None, repo: str, rev: str, path: str) -> tuple[int, Any, dict[str, str]]:
        r = self._repo(t, repo)
        c = self._rev(r, rev)
        blob = c.tree.get(path)
        if blob is None:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        data = blob.data if blob.data is not None else r.lfs[blob.sha256 or ""]
        headers = {"X-Repo-Commit": c.id, "ETag": f'"{blob.sha256 or blob.oid}"', "Accept-Ranges": "bytes"}
        if blob.sha256:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            lo, hi = int(rng.group(1)), int(rng.group(2) or len(data) - 1)
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            return 206, data[lo:hi + 1], headers
        return 200, data, headers

    # ------------------------------------------------------------ card metadata

    def h_validate_yaml(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        d = self._json(body)
        errors, warnings = validate_card_metadata(d.get("content", ""), d.get("repoType") or "model")
        payload = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        if errors:
            raise HubError(400, "; ".join(errors), body=payload)
        return 200, payload, {}
