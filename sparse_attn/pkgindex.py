"""Pinned source archives from pip's configured package indexes, without running pip.

`pip download` of a source archive runs the package's `setup.py` to read its metadata.
Here the archive's link is found on the sources pip is configured with (``pip config
list`` and the ``PIP_*`` environment: find-links, index-url, extra-index-url; default
https://pypi.org/simple; PEP 503 HTML or PEP 691 JSON pages, file:// directories too),
downloaded with urllib and checked against a pinned SHA-256 (and the index's own hash).
Nothing of the package is extracted, imported or executed here.
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import json
import os
import pathlib
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

from sparse_attn.errors import UserError

DEFAULT_INDEX = "https://pypi.org/simple"


class PackageIndexError(UserError, RuntimeError):
  """A source archive could not be found, downloaded or verified."""


def sha256_of(path: os.PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def normalize(name: str) -> str:
  """PEP 503 project name normalisation ("Foo.Bar_baz" -> "foo-bar-baz")."""
  return re.sub(r"[-_.]+", "-", name).lower()


def is_sdist_of(filename: str, package: str) -> bool:
  """True if ``filename`` is the .tar.gz source archive of the pinned ``package``."""
  if not filename.endswith(".tar.gz"):
    return False
  name, _, version = filename[:-len(".tar.gz")].rpartition("-")
  want_name, want_version = package.split("==")
  return bool(name) and normalize(name) == normalize(want_name) and version == want_version


def parse_pip_config(listing: str, environ: dict[str, str]) -> dict[str, str]:
  """pip's effective settings for ``pip download`` from ``pip config list`` output.

  Args:
    listing: lines "section.option='value'" as ``pip config list`` prints them (the
      files already merged; ":env:" lines are PIP_* variables).
    environ: the environment; PIP_<OPTION> variables override everything, as in pip.

  Returns:
    {option: value} for the options this module uses (index-url, extra-index-url,
    find-links, no-index, cert, timeout).
  """
  by_section: dict[str, dict[str, str]] = {}
  for line in listing.splitlines():
    key, sep, raw = line.partition("=")
    section, dot, option = key.strip().rpartition(".")
    if not (sep and dot):
      continue
    try:
      value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      value = raw.strip()
    by_section.setdefault(section, {})[option] = str(value)
  out: dict[str, str] = {}
  # Later sections win: pip reads [global], then the command's own section, then PIP_*.
  for section in ("global", "download", ":env:"):
    out.update(by_section.get(section, {}))
  for option in ("index-url", "extra-index-url", "find-links", "no-index", "cert",
                 "timeout", "default-timeout"):
    env = environ.get("PIP_" + option.upper().replace("-", "_"))
    if env is not None:
      out[option] = env
  if "default-timeout" in out:  # The long spelling of --timeout.
    out.setdefault("timeout", out.pop("default-timeout"))
  return out


def pip_settings() -> dict[str, str]:
  """pip's configured indexes, find-links, certificate and timeout (see parse_pip_config).

  Runs ``pip config list`` (pip's own code only; it reads configuration files and
  nothing else) so that the same sources are used as for wheels.
  """
  try:
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                          capture_output=True, text=True, timeout=120)
    listing = proc.stdout if proc.returncode == 0 else ""
  except (OSError, subprocess.SubprocessError):
    listing = ""  # No pip: the PIP_* environment and the default index still apply.
  return parse_pip_config(listing, dict(os.environ))


def sources(settings: dict[str, str]) -> list[tuple[str, str]]:
  """[(kind, location)]: "links" (find-links) then "index" entries, in pip's order."""
  out = [("links", x) for x in settings.get("find-links", "").split()]
  if settings.get("no-index", "").strip().lower() in ("1", "true", "yes", "on"):
    return out
  out.append(("index", settings.get("index-url") or DEFAULT_INDEX))
  out += [("index", x) for x in settings.get("extra-index-url", "").split()]
  return out


class _Links(html.parser.HTMLParser):
  """Collects the href of every <a> of a simple-index (PEP 503) or find-links page."""

  def __init__(self):
    super().__init__()
    self.hrefs: list[str] = []

  def handle_starttag(self, tag, attrs):
    href = dict(attrs).get("href")
    if tag == "a" and href:
      self.hrefs.append(href)


def parse_index_page(body: bytes, content_type: str, page_url: str) -> list[dict[str, str]]:
  """The files a simple-index page lists: [{"filename", "url", "sha256" ("" if none)}].

  Args:
    body: the page, PEP 691 JSON or PEP 503 HTML.
    content_type: its Content-Type ("" if unknown, e.g. a file:// page).
    page_url: its URL, to resolve relative links.
  """
  text = body.decode("utf-8", errors="replace")
  if "json" in content_type or text.lstrip().startswith("{"):
    try:
      doc = json.loads(text)
    except json.JSONDecodeError as e:
      raise PackageIndexError(f"The package index page {page_url} is not valid JSON ({e}).") from e
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list):
      raise PackageIndexError(f"The package index page {page_url} is not a PEP 691 project page "
                       "(no 'files' list).")
    return [{"filename": str(f.get("filename", "")),
             "url": urllib.parse.urljoin(page_url, str(f.get("url", ""))),
             "sha256": str(f["hashes"].get("sha256", "") if isinstance(f.get("hashes"), dict)
                           else "").lower()}
            for f in files if isinstance(f, dict)]
  parser = _Links()
  parser.feed(text)
  out = []
  for href in parser.hrefs:
    url = urllib.parse.urljoin(page_url, href)
    base, _, fragment = url.partition("#")
    algo, _, digest = fragment.partition("=")
    out.append({"filename": urllib.parse.unquote(base.rstrip("/").rsplit("/", 1)[-1]),
                "url": base, "sha256": digest.lower() if algo == "sha256" else ""})
  return out


def _open_url(url: str, settings: dict[str, str], accept: str = "*/*"):
  """urlopen with pip's certificate bundle and timeout."""
  cert = settings.get("cert")
  ctx = ssl.create_default_context(cafile=cert if cert and os.path.isfile(cert) else None)
  timeout = float(settings.get("timeout") or 60)
  req = urllib.request.Request(url, headers={"Accept": accept,
                                             "User-Agent": "sparse_attn-assets"})
  return urllib.request.urlopen(req, timeout=timeout, context=ctx)


def _read_page(url: str, settings: dict[str, str]) -> tuple[bytes, str, str] | None:
  """(body, content type, final URL) of an index / links page; None if it does not exist.

  A file:// (or plain path) directory is read as pip reads it: its index.html if it has
  one, else its listing of files.
  """
  path = None
  if "://" not in url:
    path = pathlib.Path(url)
  elif url.startswith("file:"):
    path = pathlib.Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
  if path is not None:
    if path.is_dir():
      if (path / "index.html").is_file():
        return (path / "index.html").read_bytes(), "text/html", (path / "index.html").as_uri()
      links = "".join(f'<a href="{urllib.parse.quote(p.name)}">{p.name}</a>'
                      for p in sorted(path.iterdir()) if p.is_file())
      return links.encode(), "text/html", path.as_uri() + "/"
    return (path.read_bytes(), "", path.as_uri()) if path.is_file() else None
  try:
    with _open_url(url, settings, "application/vnd.pypi.simple.v1+json, "
                   "text/html;q=0.1") as r:
      return r.read(), r.headers.get("Content-Type", ""), r.geturl()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def find_sdist(package: str, settings: dict[str, str]) -> tuple[list[dict[str, str]],
                                                                 list[str]]:
  """Links to the source archive of ``package`` on pip's sources, and what each said."""
  found, notes = [], []
  for kind, where in sources(settings):
    page = where
    if kind == "index":
      page = where.rstrip("/") + "/" + normalize(package.split("==")[0]) + "/"
    try:
      got = _read_page(page, settings)
    except (OSError, urllib.error.URLError, ValueError) as e:
      notes.append(f"{page}: {e}")
      continue
    if got is None:
      notes.append(f"{page}: not found")
      continue
    try:
      hits = [f for f in parse_index_page(*got) if is_sdist_of(f["filename"], package)]
    except PackageIndexError as e:
      notes.append(str(e))
      continue
    notes.append(f"{page}: {'has it' if hits else 'no ' + package + ' source archive'}")
    found += hits
  return found, notes


def download_sdist(package: str, archive_sha256: str, dest: pathlib.Path) -> pathlib.Path:
  """The verified source archive of ``package`` ("name==version") in ``dest``.

  Downloaded if needed; its SHA-256 must equal ``archive_sha256`` before this returns, and
  a cached archive that does not match is deleted and downloaded anew.

  Raises:
    PackageIndexError: no source lists the archive, the download failed, or its hash is
      wrong (the bad file is deleted before anything reads it).
  """
  for p in dest.glob("*.tar.gz"):
    if is_sdist_of(p.name, package):
      if sha256_of(p) == archive_sha256:
        return p
      p.unlink()  # Truncated or replaced: never read an unverified archive.
  settings = pip_settings()
  links, notes = find_sdist(package, settings)
  way_out = (f"Way out: make PyPI (or the configured index) reachable, or download "
             f"{package.replace('==', '-')}.tar.gz (sha256 {archive_sha256}) "
             f"elsewhere and put it in {dest}.")
  if not links:
    raise PackageIndexError(f"No package source lists the source archive of {package!r} "
                     "(needed offline data).\n  " + "\n  ".join(notes) + "\n" + way_out)
  problems = []
  for link in links:
    if link["sha256"] and link["sha256"] != archive_sha256:
      problems.append(f"{link['url']}: the index's sha256 is {link['sha256']}, not the "
                      f"pinned {archive_sha256}")
      continue
    target = dest / link["filename"]
    tmp = dest / f"{link['filename']}.{os.getpid()}.part"
    h = hashlib.sha256()
    try:
      with _open_url(link["url"], settings) as r, open(tmp, "wb") as f:
        for chunk in iter(lambda: r.read(1 << 20), b""):
          h.update(chunk)
          f.write(chunk)
    except (OSError, urllib.error.URLError, ValueError) as e:
      tmp.unlink(missing_ok=True)
      problems.append(f"{link['url']}: download failed ({e})")
      continue
    if h.hexdigest() != archive_sha256:
      tmp.unlink(missing_ok=True)  # Deleted unread: a wrong archive is never opened.
      problems.append(f"{link['url']}: downloaded file has sha256 {h.hexdigest()}, not the "
                      f"pinned {archive_sha256}")
      continue
    os.replace(tmp, target)
    return target
  raise PackageIndexError(f"Could not get a verified source archive of {package!r}:\n  "
                   + "\n  ".join(problems) + "\n" + way_out)
