"""The download path, exercised offline through a file:// URL to a generated archive."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from helpers import write_cifar10_folder
from iaat.data import cifar, load_dataset
from iaat.errors import DataError


@pytest.fixture
def local_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    folder = write_cifar10_folder(src, train_per_batch=10, n_test=20)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    spec = dict(cifar._SPECS["cifar10"], url=archive.as_uri(),
                archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(cifar._SPECS, "cifar10", spec)
    return spec


def test_missing_data_is_downloaded_and_checked(local_archive, tmp_path):
    dest = tmp_path / "data"
    with pytest.warns(UserWarning, match="differ"):
        splits = load_dataset("cifar10", str(dest), download=True)
    assert len(splits.train) == 50 and len(splits.test) == 20
    assert (dest / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert not list(dest.glob("*.part"))


def test_download_with_wrong_md5_is_refused(local_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(cifar._SPECS, "cifar10", dict(local_archive, archive_md5="0" * 32))
    with pytest.raises(DataError, match="wrong md5"):
        load_dataset("cifar10", str(tmp_path / "data"), download=True)
    assert not (tmp_path / "data").exists()  # the folder this download created is gone with it


def test_offline_download_failure_says_where_it_looked(tmp_path, monkeypatch):
    spec = dict(cifar._SPECS["cifar10"], url=(tmp_path / "absent.tar.gz").as_uri())
    monkeypatch.setitem(cifar._SPECS, "cifar10", spec)
    with pytest.raises(DataError, match="downloading failed") as err:
        load_dataset("cifar10", str(tmp_path / "data"), download=True)
    assert str(tmp_path / "data") in str(err.value) and "--data-dir" in str(err.value)
    assert not (tmp_path / "data").exists()


def test_a_failed_download_removes_only_what_it_created(tmp_path, monkeypatch):
    """Folders that existed before stay, with what they hold; new empty ones are removed."""
    spec = dict(cifar._SPECS["cifar10"], url=(tmp_path / "absent.tar.gz").as_uri())
    monkeypatch.setitem(cifar._SPECS, "cifar10", spec)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep\n")
    with pytest.raises(DataError):
        load_dataset("cifar10", str(tmp_path / "mine" / "new" / "data"), download=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
