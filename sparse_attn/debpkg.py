"""Offline data from Debian packages: `apt-get download`, checksum pins, `dpkg -x` unpacking.

Some real long-document text ships only as Debian packages (e.g. the Linux kernel's
documentation in `linux-doc-6.1`). `fetch(package)` downloads the package with apt (no
root and no install: only the .deb), checks its SHA-256 against the versions pinned in
`PINS`, unpacks it with `dpkg -x` into the asset cache
(`<cache>/debian/<package>/<version>/`) and records what it fetched in
`<cache>/debian/<package>/fetched.json` (package, version, sha256, size).

Debian replaces a package's version in its archive when it ships an update, so a pin can
disappear. Then `fetch` fails and says which version the archive offers now. Never
silently: a different version may hold different documents, and so different splits. To
use that version anyway, accept it explicitly with
`SPARSE_ATTN_DEBIAN_ACCEPT=<package>=<version>` (its checksum is recorded as fetched), or
put a pinned .deb into `<cache>/debian/<package>/` by hand. Unpacking goes to a temporary
directory that is renamed when complete, so a crash never leaves a half-unpacked tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile

from sparse_attn import assets
from sparse_attn.pkgindex import sha256_of

# package -> {version: sha256 of its .deb}, newest first.
PINS: dict[str, dict[str, str]] = {
    "linux-doc-6.1": {
        "6.1.176-1": "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
        "6.1.170-3": "8a0e80e4f14407d0d96058b9eec7afa4ae57e6408d3f4e2bed35462d14b99342",
    },
}
ACCEPT_VAR = "SPARSE_ATTN_DEBIAN_ACCEPT"
RECORD = "fetched.json"


class DebianPackageError(assets.AssetError):
  """A Debian package could not be fetched, verified or unpacked (the message says why and
  what to do)."""


def _root(package: str) -> pathlib.Path:
  return assets.cache_dir() / "debian" / package


def _accepted(package: str) -> str | None:
  """The version accepted through $SPARSE_ATTN_DEBIAN_ACCEPT for `package`, if any."""
  for item in os.environ.get(ACCEPT_VAR, "").split(","):
    name, _, version = item.strip().partition("=")
    if name == package and version:
      return version
  return None


def _tool(name: str) -> str:
  path = shutil.which(name)
  if path is None:
    raise DebianPackageError(
        f"This dataset comes from a Debian package and needs `{name}`, which is not on "
        "PATH. Way out: run on Debian or Ubuntu (apt-get and dpkg are part of the base "
        "system), or fetch the data once on such a machine and copy its asset cache "
        f"({assets.cache_dir() / 'debian'}) here.")
  return path


def _offered(package: str) -> tuple[str, str] | None:
  """(version, sha256) of the package the configured apt archive offers now, if any."""
  proc = subprocess.run([_tool("apt-get"), "download", "--print-uris", package],
                        capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    parts = line.split()
    if len(parts) >= 4 and parts[3].startswith("SHA256:"):
      name = parts[1]                      # <package>_<version>_<arch>.deb
      return name.split("_")[1].replace("%3a", ":"), parts[3].split(":", 1)[1]
  return None


def _download(package: str, version: str, dest: pathlib.Path) -> pathlib.Path | None:
  """`apt-get download <package>=<version>` into dest; the .deb, or None if not offered."""
  proc = subprocess.run([_tool("apt-get"), "download", f"{package}={version}"], cwd=dest,
                        capture_output=True, text=True)
  found = sorted(dest.glob(f"{package}_*.deb"))
  return found[0] if proc.returncode == 0 and found else None


def _unpack(deb: pathlib.Path, target: pathlib.Path) -> None:
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
  try:
    proc = subprocess.run([_tool("dpkg"), "-x", str(deb), str(tmp)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
      raise DebianPackageError(f"dpkg -x {deb} failed: {proc.stderr.strip()[-500:]}. The "
                               "file was removed; call again to download it anew.")
    os.replace(tmp, target)   # Complete trees only.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_record(root: pathlib.Path, record: dict) -> None:
  with tempfile.NamedTemporaryFile("w", dir=root, delete=False, suffix=".tmp") as f:
    json.dump(record, f, indent=2)
  os.replace(f.name, root / RECORD)


def fetch(package: str) -> tuple[pathlib.Path, dict]:
  """The unpacked tree of a pinned Debian package, and the record of what was fetched.

  Args:
    package: a key of `PINS` (e.g. "linux-doc-6.1").

  Returns:
    (directory holding the package's files as `dpkg -x` lays them out, e.g.
    `usr/share/doc/...`; {"package", "version", "sha256", "bytes"}).

  Raises:
    DebianPackageError: apt-get / dpkg missing, no pinned (or accepted) version offered by
      the archive (the message names the one it offers and how to accept it), a checksum
      mismatch, or a failed unpack.
  """
  if package not in PINS:
    raise KeyError(f"No pinned Debian package {package!r}; known: {sorted(PINS)}")
  root = _root(package)
  root.mkdir(parents=True, exist_ok=True)
  pins = dict(PINS[package])
  accepted = _accepted(package)
  if (root / RECORD).is_file():
    record = json.loads((root / RECORD).read_text())
    tree = root / record["version"]
    if tree.is_dir() and (pins.get(record["version"]) == record["sha256"]
                          or record["version"] == accepted):
      return tree, record
  debs = {sha256_of(p): p for p in root.glob(f"{package}_*.deb")}   # Placed by hand.
  deb = version = None
  for v, sha in pins.items():
    if sha in debs:
      deb, version = debs[sha], v
      break
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    if deb is None:
      for v in ([accepted] if accepted else []) + list(pins):
        got = _download(package, v, pathlib.Path(tmp))
        if got is None:
          continue
        sha = sha256_of(got)
        if v != accepted and sha != pins[v]:
          raise DebianPackageError(
              f"{got.name} has sha256 {sha}, not the pinned {pins[v]}: the archive's file "
              "is not the one this library was built against. Nothing was unpacked.")
        deb, version = pathlib.Path(shutil.move(str(got), root / got.name)), v
        break
    if deb is None:
      offered = _offered(package)
      now = (f"it offers {package} {offered[0]} (sha256 {offered[1]})" if offered
             else "apt offers no version of it (is the archive configured, see "
                  "/etc/apt/sources.list, and `apt-get update` run?)")
      raise DebianPackageError(
          f"Debian's archive has moved on: none of the pinned versions of {package} "
          f"({', '.join(pins)}) can be downloaded; {now}. Another version may hold "
          "different documents, and so different splits. To use it anyway, set "
          f"{ACCEPT_VAR}={package}={offered[0] if offered else '<version>'}; or put a "
          f"pinned .deb into {root}.")
    target = root / version
    if not target.is_dir():
      _unpack(deb, target)
  record = {"package": package, "version": version, "sha256": sha256_of(deb),
            "bytes": deb.stat().st_size}
  _write_record(root, record)
  return target, record
