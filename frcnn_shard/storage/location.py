"""Where a location points: a local path or an fsspec URL, and the store that serves it."""
from __future__ import annotations

import os
import re

from .base import Store, StorageError
from .local import LocalStore
from .remote import FsspecStore, filesystem

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
_INSTALL_HINT = {"s3": "s3fs (pip install 'frcnn-shard[s3]')", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                 "abfs": "adlfs", "hf": "huggingface_hub"}


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (file:// included); False for plain local paths."""
    return bool(_URL.match(os.fspath(location)))


def open_store(location: str | os.PathLike, storage_options: dict | None = None) -> Store:
    """The store of a local path or an fsspec URL; StorageError when the URL's scheme cannot be served here."""
    text = os.fspath(location)
    m = _URL.match(text)
    if m is None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/?[^/]", text):
        raise StorageError(f"{text!r} looks like a URL but is not one (a URL is scheme://bucket/path); "
                           "for a local path, start it with ./ or /")
    if m is None or m.group("scheme") == "file":
        if storage_options:
            raise StorageError(f"storage options apply to URLs such as s3://..., not to the local path {text!r}")
        return LocalStore(m.group("rest") if m else text)
    scheme = m.group("scheme")
    import fsspec  # here, not at the top: local-only use never pays for importing it

    if scheme not in fsspec.available_protocols():
        raise StorageError(f"{text}: no storage here understands {scheme}:// (fsspec knows no such protocol; "
                           "schemes are lower case, e.g. s3://bucket/path)")
    try:
        fs = filesystem(scheme, storage_options or {})
    except ImportError as e:
        need = _INSTALL_HINT.get(scheme, f"the fsspec package for {scheme}://")
        raise StorageError(f"{text}: {scheme}:// needs {need}; install it to use this location ({e.msg})") from None
    except TypeError as e:  # an unknown option: the message names it, never a value
        raise StorageError(f"{text}: the storage options were refused ({e})") from None
    return FsspecStore(fs, fs._strip_protocol(text), scheme)


def store_of(location: str | os.PathLike | Store, storage_options: dict | None = None) -> Store:
    """A store from a path, a URL or a store (returned as it is)."""
    if isinstance(location, (LocalStore, FsspecStore)):
        return location
    return open_store(location, storage_options)
