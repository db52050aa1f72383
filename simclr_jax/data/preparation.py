"""Preparing a TFDS dataset that is not on disk yet, or saying clearly why not.

With ``config.download`` an unprepared dataset is downloaded and prepared
by TFDS itself (``builder.download_and_prepare()``, as ``tfds.load`` does).
TFDS retries an unreachable host for minutes, so the download hosts are
first checked with a short TCP connection: without network a run fails in
seconds, saying how to prepare the data elsewhere. Datasets whose files
TFDS cannot fetch (ImageNet: MANUAL_DOWNLOAD_INSTRUCTIONS) need them in the
builder's manual folder first; the error names it.
"""
import os
import socket
import threading
import urllib.parse
import urllib.request

from absl import logging

from simclr_jax import storage
from simclr_jax.errors import DataError

CONNECT_TIMEOUT_S = 5.0  # per download host, all checked at once


def _not_prepared(dataset, builder, data_dir):
    where = data_dir if data_dir is not None else (
        f"{builder.data_dir_root} (TFDS default; data_dir was None)")
    return (f"TFDS dataset {dataset!r} is not prepared under data_dir {where} "
            f"(looked for {builder.data_dir})")


def _prepare_elsewhere(dataset):
    return (f"Run `tfds build {dataset}` (or tfds.load({dataset!r}, download=True)) on a "
            "machine with internet access and copy the result, then set config.data_dir or "
            "the TFDS_DATA_DIR environment variable to the folder holding the prepared dataset.")


def manual_dir(builder):
    """The folder TFDS reads manually downloaded files from by default."""
    return storage.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _endpoint(url):
    """(host, port) a download of ``url`` connects to: its proxy's, if one is set."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def unreachable(urls, timeout):
    """'host:port (reason)' for each endpoint of ``urls`` that no TCP connection
    reaches within ``timeout`` seconds; all are tried at once, and name
    resolution is bounded too (it runs in the same daemon threads)."""
    endpoints = sorted({_endpoint(url) for url in urls})
    reasons = {endpoint: f"no connection within {timeout:g} s" for endpoint in endpoints}

    def connect(endpoint):
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
            reasons[endpoint] = None
        except OSError as e:
            reasons[endpoint] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=connect, args=(e,), daemon=True) for e in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return [f"{host}:{port} ({reasons[host, port]})" for host, port in endpoints
            if reasons[host, port] is not None]


def _manual_hint(builder):
    instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
    return (f"Put its files in {manual_dir(builder)} (TFDS's manual folder, "
            "<data_dir>/downloads/manual) and run again with config.download=True to let TFDS "
            f"prepare them. TFDS expects: {instructions}")


def prepare(builder, dataset, data_dir, *, download):
    """Downloads and prepares ``builder``'s dataset, or raises a ValueError
    saying what to do: ``download`` False, a manual dataset without its
    files, unreachable download hosts, or a failed download."""
    not_prepared, advice = _not_prepared(dataset, builder, data_dir), _prepare_elsewhere(dataset)
    if not download:
        raise DataError(
            f"{not_prepared} and config.download is False, so TFDS cannot download it here. "
            f"{advice} Or set config.download=True to let TFDS download and prepare it here.")
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        folder = manual_dir(builder)
        if not (storage.isdir(folder) and storage.listdir(folder)):
            raise DataError(
                f"{not_prepared}, and TFDS cannot download it: its files must be downloaded by "
                f"hand, and its manual folder is missing or empty. {_manual_hint(builder)} "
                f"Or prepare it elsewhere: {advice}")
        advice = f"{_manual_hint(builder)} Or prepare it elsewhere: {advice}"
    else:  # (a manual dataset's listed URLs are the ones it does not fetch)
        failed = unreachable(builder.url_infos or {}, CONNECT_TIMEOUT_S)
        if failed:
            raise DataError(f"{not_prepared}; downloading it failed: cannot connect to "
                             f"{', '.join(failed)}, so TFDS cannot download here. {advice}")
    logging.info("Downloading and preparing %s into %s (config.download=True)", dataset,
                 builder.data_dir_root)
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any failure gets the same advice
        raise DataError(f"{not_prepared}; downloading and preparing it with TFDS failed "
                         f"({type(e).__name__}: {str(e)[:500]}). {advice}") from e
