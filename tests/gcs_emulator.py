"""A local Cloud Storage server for the tests: PyPI's `gcp-storage-emulator`, in memory, on 127.0.0.1.

    python tests/gcs_emulator.py PORT BUCKET [BUCKET ...]

Four adjustments to the emulator itself (not to flax_gpt):
- a listen backlog of 128 instead of http.server's 5: TensorStore and gcsfs open many connections
  at once, and refused ones cost them seconds of back-off;
- the objects.moveTo route gcsfs tries first for a rename (else it retries a 501 for ~30 s);
- media downloads carry `x-goog-generation`, as real GCS's do (TensorStore needs it);
- a bucket named `forbidden-*` answers 403 to everything, because the emulator has no permissions
  (the only way to see how a refused request is reported).
"""

from __future__ import annotations

import logging
import socketserver
import sys
import time
from functools import partial
from http import HTTPStatus
from http import server as http_server

from gcp_storage_emulator import server as srv
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects


def _backlog() -> None:
    class Server(http_server.HTTPServer):
        request_queue_size = 128

    def run(self):
        self._httpd = Server((self._host, self._port), partial(srv.RequestHandler, self._storage))
        self.is_running.set()
        self._httpd.serve_forever()

    srv.APIThread.run = run


def _move_to_route() -> None:
    def move(request, response, storage, *args, **kwargs):
        p = request.params
        try:
            obj = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"], p["bucket_name"],
                                p["dest_object_id"])
            storage.delete_file(p["bucket_name"], p["object_id"])
            response.json(obj)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND

    route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
             {"POST": move})
    srv.HANDLERS = (route, *srv.HANDLERS)


def _generation_headers() -> None:
    """Media downloads carry the object's generation (`x-goog-generation`), as GCS's do: TensorStore
    reads it to know which version it got (without it, reads of OCDBT manifests fail at random)."""
    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj.get("generation", "0"))
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return original(request, response, storage, *args, **kwargs)

    objects.download = download
    srv.HANDLERS = tuple((pattern, {m: (download if h is original else h) for m, h in methods.items()})
                         for pattern, methods in srv.HANDLERS)


def _forbidden(prefix: str = "forbidden-") -> None:
    def deny(request, response, storage, *args, **kwargs):
        response.status = HTTPStatus.FORBIDDEN
        response.json({"error": {"code": 403, "message": "caller does not have storage.objects access",
                                 "errors": [{"reason": "forbidden"}]}})

    every = {m: deny for m in ("GET", "POST", "PUT", "DELETE", "PATCH")}
    routes = tuple((rf"^{pre}/b/{prefix}[-.\w]*(/.*)?$", every) for pre in
                   ("/storage/v1", "/upload/storage/v1", "/download/storage/v1"))
    srv.HANDLERS = (*routes, (rf"^/{prefix}[-.\w]*/.*$", every), *srv.HANDLERS)


def _quiet() -> None:
    for name in ("gcp_storage_emulator", "api.object", "api.bucket", "gcp_storage_emulator.server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    original = socketserver.BaseServer.handle_error

    def handle_error(self, request, client_address):  # clients closing early are not errors
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            original(self, request, client_address)

    socketserver.BaseServer.handle_error = handle_error


def main() -> None:
    port, names = int(sys.argv[1]), sys.argv[2:] or ["test-bucket"]
    _backlog()
    _move_to_route()
    _generation_headers()
    _forbidden()
    _quiet()
    server = srv.create_server("127.0.0.1", port, in_memory=True, default_bucket=names[0])
    for name in names[1:]:
        buckets.create_bucket(name, server._storage)
    server.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
