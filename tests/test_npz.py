"""``.npz`` outputs are the same bytes wherever they are made (a checkout's Python, the images' Debian one).

``np.savez`` wrote zip64 headers under Python 3.11.7 and plain ones under Debian's 3.11.2, so stage 1's
camera files, and with them its content digest, differed between the local and the docker backend.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np

from headavatar.imaging import npz_bytes

# sha256 of npz_bytes(EXAMPLE), the same under CPython 3.11.2 (headavatar/preprocess, headavatar/cpu) and 3.11.7.
EXAMPLE = {"extrinsic": np.arange(12.0).reshape(3, 4), "intrinsic": np.eye(3)}
EXAMPLE_SHA256 = "7001c2afc310c95cc51c7fc75f95b6112f6e9d9745f85fa4a2c03ea49e0c9b29"


def test_npz_bytes_depend_on_the_arrays_alone() -> None:
    data = npz_bytes(**EXAMPLE)
    assert hashlib.sha256(data).hexdigest() == EXAMPLE_SHA256
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert [(i.filename, i.date_time, i.extract_version) for i in zf.infolist()] == [
            ("extrinsic.npy", (1980, 1, 1, 0, 0, 0), 20), ("intrinsic.npy", (1980, 1, 1, 0, 0, 0), 20)]
    loaded = np.load(io.BytesIO(data))
    for name, array in EXAMPLE.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
