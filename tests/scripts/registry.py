#!/usr/bin/env python3
"""A read-only OCI distribution registry (pull side only) over a directory, for the testbed,
where no registry is reachable. containerd's CRI registry mirrors point the public registries'
names here.

    registry.py DIR PORT

DIR holds blobs/sha256/HEX (manifests, configs, layers) and tags/HOST/REPO/TAG, a file with
the manifest's digest. A mirror request carries the registry it stands in for as ?ns=HOST;
without it HOST is "docker.io". Serves GET and HEAD of /v2/, /v2/REPO/manifests/REF (a tag or
a digest) and /v2/REPO/blobs/DIGEST; anything else is 404 with a distribution error body.
"""

import hashlib
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ROOT = sys.argv[1]
ROUTE = re.compile(r"^/v2/(?P<repo>[a-z0-9._/-]+)/(?P<kind>manifests|blobs)/(?P<ref>[A-Za-z0-9_.:+-]+)$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class Registry(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("registry: " + (fmt % args) + "\n")

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def fail(self, status, code, message):
        data = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def serve(self, body):
        url = urlsplit(self.path)
        if url.path in ("/v2", "/v2/"):
            self.send_response(200)
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        m = ROUTE.match(url.path)
        if not m or ".." in m["repo"].split("/"):
            return self.fail(404, "NAME_UNKNOWN", "no such route")
        host = parse_qs(url.query).get("ns", ["docker.io"])[0]
        if "/" in host or host.startswith("."):
            return self.fail(400, "NAME_INVALID", "bad ns")
        repo, kind, ref = m["repo"], m["kind"], m["ref"]
        media = "application/octet-stream"
        if kind == "manifests":
            if not DIGEST.match(ref):
                tag = os.path.join(ROOT, "tags", host, repo, ref)
                if not os.path.isfile(tag):
                    return self.fail(404, "MANIFEST_UNKNOWN", f"{host}/{repo}:{ref} unknown")
                with open(tag) as f:
                    ref = f.read().strip()
            elif not os.path.isdir(os.path.join(ROOT, "tags", host, repo)):
                return self.fail(404, "NAME_UNKNOWN", f"{host}/{repo} unknown")
        elif not DIGEST.match(ref):
            return self.fail(400, "DIGEST_INVALID", ref)
        path = os.path.join(ROOT, "blobs", "sha256", ref.split(":", 1)[1])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return self.fail(404, "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN", ref)
        if "sha256:" + hashlib.sha256(data).hexdigest() != ref:
            return self.fail(500, "UNKNOWN", f"{ref} does not match its content")
        if kind == "manifests":
            media = json.loads(data).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        self.send_response(200)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Docker-Content-Digest", ref)
        self.end_headers()
        if body:
            self.wfile.write(data)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Registry)
    server.daemon_threads = True
    server.serve_forever()
