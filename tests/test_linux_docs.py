"""linux_docs from a tiny fixture tree, and the Debian fetcher against fake apt-get / dpkg
(never the real download)."""

import gzip
import hashlib
import json
import os
import stat

import pytest

from sparse_attn import debpkg
from sparse_attn.data import linux_docs, offline


def _doc(root, rel, text):
  p = root / rel
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(gzip.compress(text.encode()))


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "Documentation"
  for i in range(6):
    _doc(root, f"networking/doc{i}.rst.gz",
         f".. SPDX-License-Identifier: GPL-2.0\n\nNetworking {i}\n" + "packets " * 50)
    _doc(root, f"hwmon/sub/chip{i}.rst.gz", f"Chip {i} sensors\n" + "voltage " * 40)
  _doc(root, "mm/one.rst.gz", "A lone memory document")                  # Too few: dropped.
  _doc(root, "translations/zh_CN/networking/doc0.rst.gz", "translated")   # Dropped.
  _doc(root, "index.rst.gz", "The top-level index")                       # No subsystem.
  _doc(root, "networking/copy.rst.gz",
       ".. SPDX-License-Identifier: GPL-2.0\n\nNetworking 0\n" + "packets " * 50)  # Duplicate.
  return root


def test_documents_rules(tree):
  docs = linux_docs.read_documents(tree)
  subs = [s for s, _ in docs]
  assert sorted(set(subs)) == ["hwmon", "mm", "networking"]
  assert subs.count("networking") == 6 and subs.count("hwmon") == 6     # Duplicate once.
  assert not any("SPDX" in t for _, t in docs)
  assert linux_docs.classes(docs, min_docs=5) == ("hwmon", "networking")


def test_labels_splits_and_mlm(tree, monkeypatch):
  docs = linux_docs.read_documents(tree)
  monkeypatch.setattr(linux_docs, "MIN_DOCS", 5)
  monkeypatch.setattr(linux_docs, "LABELS", ("hwmon", "networking"))
  parts = {s: linux_docs.linux_docs(s, docs) for s in offline.OFFLINE_SPLITS}
  texts = [t for ex in parts.values() for (t,) in ex.texts]
  assert len(texts) == len(set(texts)) == 12                 # mm dropped, every doc once.
  for s, ex in parts.items():
    for (t,), y in zip(ex.texts, ex.labels):
      assert offline.split_of(t) == s
      assert linux_docs.LABELS[y] == ("hwmon" if "sensors" in t else "networking")
  mlm = sum(len(linux_docs.linux_docs_mlm(s, docs).texts) for s in offline.OFFLINE_SPLITS)
  assert mlm == 13                                            # Every subsystem, mm too.
  monkeypatch.setattr(linux_docs, "LABELS", ("hwmon", "networking", "virt"))
  with pytest.raises(ValueError, match="other documents"):
    linux_docs.linux_docs("train", docs)


def test_the_task_is_registered():
  from sparse_attn.data import tasks
  task = tasks.OFFLINE_TASKS["linux_docs"]
  assert task.label_names == linux_docs.LABELS and task.kind == "classification"
  assert tasks.OFFLINE_TASKS["linux_docs_mlm"].kind == "mlm"


# ---- the fetcher, against fake tools -------------------------------------------------

DEB_BYTES = b"!<arch>\nfake deb"
DEB_SHA = hashlib.sha256(DEB_BYTES).hexdigest()


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
  """apt-get / dpkg stand-ins: the archive offers `offered` (a file), dpkg -x writes a
  Documentation tree."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  state = tmp_path / "offered"
  state.write_text("6.1.176-1")
  deb_src = tmp_path / "deb"
  deb_src.write_bytes(DEB_BYTES)
  (bin_dir / "apt-get").write_text(f"""#!/bin/sh
offered=$(cat {state})
if [ "$2" = "--print-uris" ]; then
  echo "'http://x/pkg.deb' pkg_${{offered}}_all.deb 16 SHA256:{DEB_SHA}"; exit 0; fi
want=${{2#*=}}
[ "$want" = "$offered" ] || {{ echo "E: Version '$want' not found" >&2; exit 100; }}
cp {deb_src} "pkg_${{offered}}_all.deb"
""")
  (bin_dir / "dpkg").write_text("""#!/bin/sh
mkdir -p "$3/usr/share/doc/linux-doc-6.1/Documentation/networking"
echo hi > "$3/usr/share/doc/linux-doc-6.1/Documentation/networking/a.rst"
""")
  for f in bin_dir.iterdir():
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv(debpkg.ACCEPT_VAR, raising=False)
  monkeypatch.setitem(debpkg.PINS, "pkg", {"6.1.176-1": DEB_SHA, "6.1.170-3": "0" * 64})
  return state


def test_fetch_downloads_verifies_unpacks_and_records(fake_apt, tmp_path):
  tree, record = debpkg.fetch("pkg")
  assert (tree / "usr/share/doc/linux-doc-6.1/Documentation/networking/a.rst").is_file()
  assert record == {"package": "pkg", "version": "6.1.176-1", "sha256": DEB_SHA,
                    "bytes": len(DEB_BYTES)}
  saved = json.loads((tmp_path / "cache/debian/pkg/fetched.json").read_text())
  assert saved == record
  fake_apt.write_text("9.9")                 # The archive moves on: the cache still serves.
  assert debpkg.fetch("pkg")[0] == tree


def test_an_archive_that_moved_on_is_a_clear_error_and_can_be_accepted(fake_apt,
                                                                      monkeypatch):
  fake_apt.write_text("6.1.180-1")
  with pytest.raises(debpkg.DebianPackageError, match=r"moved on.*6\.1\.180-1") as e:
    debpkg.fetch("pkg")
  assert f"{debpkg.ACCEPT_VAR}=pkg=6.1.180-1" in str(e.value)
  monkeypatch.setenv(debpkg.ACCEPT_VAR, "pkg=6.1.180-1")
  tree, record = debpkg.fetch("pkg")
  assert record["version"] == "6.1.180-1" and tree.name == "6.1.180-1"


def test_a_checksum_mismatch_is_refused(fake_apt, monkeypatch):
  monkeypatch.setitem(debpkg.PINS, "pkg", {"6.1.176-1": "f" * 64})
  with pytest.raises(debpkg.DebianPackageError, match="not the pinned"):
    debpkg.fetch("pkg")
  assert not any((debpkg.assets.cache_dir() / "debian/pkg").glob("6.1.*"))


def test_missing_apt_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))                 # Nothing on PATH.
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))
  with pytest.raises(debpkg.DebianPackageError, match="apt-get.*not on PATH"):
    debpkg.fetch("linux-doc-6.1")
