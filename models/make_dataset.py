"""Write ``models/digits.npz``: the 8x8 handwritten digits with a fixed stratified train/test split.

Run once (``python models/make_dataset.py``); the output is committed, so nothing at runtime needs
scikit-learn. This script is the only place that imports it (``pip install -e .[dataset]``).

File contents (every array loads with ``np.load(path, allow_pickle=False)``):

* ``x``           float32 (1797, 1, 8, 8): pixel counts 0..16 divided by 16, so every value is an
                  exact multiple of 1/16 in [0, 1].
* ``y``           int64 (1797,): digit labels 0..9.
* ``train_idx``   int64 (1437,), ``test_idx`` int64 (360,): sorted, disjoint, together all rows.
                  80/20 split stratified by label, ``train_test_split(..., random_state=SEED)``.
* ``attribution`` a unicode string naming the dataset, its source, license and citation.

The zip members carry a fixed timestamp, so rerunning the script rewrites a byte-identical file.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 20240601
TEST_FRACTION = 0.2
DEFAULT_OUT = Path(__file__).resolve().parent / "digits.npz"

ATTRIBUTION = (
    "Optical Recognition of Handwritten Digits (8x8 bitmaps, the 1,797-image copy shipped with "
    "scikit-learn as sklearn.datasets.load_digits). Source: UCI Machine Learning Repository, "
    "https://doi.org/10.24432/C50P49. License: CC BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/). Citation: E. Alpaydin and C. Kaynak, "
    "Optical Recognition of Handwritten Digits, UCI Machine Learning Repository, 1998. "
    "Modifications: pixel counts divided by 16, reshaped to (N,1,8,8), fixed 80/20 stratified split."
)

log = logging.getLogger("make_dataset")


def build_arrays() -> dict[str, np.ndarray]:
    """The arrays of digits.npz, deterministic for a given scikit-learn copy of the data."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    rows = np.arange(len(y), dtype=np.int64)
    train_idx, test_idx = train_test_split(rows, test_size=TEST_FRACTION, stratify=y, random_state=SEED)
    return {
        "x": np.ascontiguousarray(x),
        "y": y,
        "train_idx": np.sort(train_idx).astype(np.int64),
        "test_idx": np.sort(test_idx).astype(np.int64),
        "attribution": np.array(ATTRIBUTION),
    }


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an .npz at ``path`` via a temp file and rename; byte-reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, array in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, array, allow_pickle=False)
                # np.savez stamps the current time; a fixed one keeps reruns byte-identical.
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, buf.getvalue())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the file is a shared, committed artifact
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    arrays = build_arrays()
    write_npz_atomic(args.out, arrays)
    log.info("wrote %s: %d images, %d train, %d test", args.out, len(arrays["y"]), len(arrays["train_idx"]), len(arrays["test_idx"]))


if __name__ == "__main__":
    main()
