"""A GCS API server on loopback for the tests: gcp-storage-emulator, with
the generation headers its media downloads lack.

    python tests/gcs_server.py PORT BUCKET

tensorstore (Orbax's array store) reads an object's generation from the
``x-goog-generation`` header of the download, as real GCS sends it; without
it, reading a checkpoint's OCDBT manifest fails ("Malformed
StorageGeneration"). The handler is wrapped before the server module builds
its routing table from it.
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
        resource = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(resource["generation"])
        response["x-goog-metageneration"] = str(resource["metageneration"])


objects.download = _download_with_generation

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    port, bucket = sys.argv[1:]
    main(["start", "--host", "127.0.0.1", "--port", port, "--in-memory", "--default-bucket", bucket, "-q"])
