"""``lab bundle build --from release``: the bundle from the projects' official release artefacts, for a host with
internet. Each piece comes from where the recipe's ``release:`` section says and is verified before it is written
into the bundle:

- binaries by their published sha256 file (dl.k8s.io's ``.sha256``, get.helm.sh's ``.sha256sum``); helm is taken
  out of its tarball (that one member, a regular file, nothing else);
- charts by the ``digest`` their repository's index.yaml gives;
- manifests that have no published checksum by the same file in the Go module at that version, which
  ``go mod download`` fetches and the Go checksum database vouches for;
- images by skopeo, which checks every blob against the manifest digest we pin (and record) first;
- our probe image, released nowhere, is an official base image plus one layer of our files (umoci unpack,
  repack).

Downloads go through :func:`lab.images.download` (retries, resume) into a work directory, so a rerun resumes.
``base`` sends every HTTP request to one mirror instead (same path), ``registry`` every image to one registry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.parse
from pathlib import Path
from typing import Callable

import yaml

from lab import images
from lab.bundle.manifest import BundleError, Entry, Manifest, now, sha256_file, write_manifest
from lab.bundle.recipe import (REPO_ROOT, GoBuild, Image, Recipe, ReleaseChart, ReleaseFile, component, image_component,
                               parse_source)
from lab.bundle.source import run
from lab.errors import ImageError

Say = Callable[[str], None]
OS, ARCH = "linux", "amd64"
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
AGAIN = "run `lab bundle build --from release` again; finished downloads are kept and partial ones resume"


def rebase(url: str, base: str | None) -> str:
    """``url`` with its scheme and host replaced by ``base``'s (base's path, if any, goes before url's path)."""
    if not base:
        return url
    b, u = urllib.parse.urlsplit(base), urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((b.scheme, b.netloc, b.path.rstrip("/") + u.path, u.query, ""))


def fill(template: str, build: GoBuild, **more: str) -> str:
    return template.format(version=build.version, bare=build.version.lstrip("v"), **more)


def published_sha256(text: str, filename: str, source: str) -> str:
    """The sha256 in a checksum file: a bare digest (dl.k8s.io) or ``<digest> [*]<file name>`` lines."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 1 and HEX64.match(parts[0]):
            return parts[0].lower()
        if len(parts) >= 2 and HEX64.match(parts[0]) and parts[1].lstrip("*").removeprefix("./") == filename:
            return parts[0].lower()
    raise BundleError(f"{source} gives no sha256 for {filename}",
                      hint="the release's checksum file changed form, or the recipe's checksum template is wrong")


def mismatch(what: str, path: Path, expected: str, actual: str, source: str, against: str) -> BundleError:
    path.unlink(missing_ok=True)
    return BundleError(f"checksum mismatch for {what}: sha256 {actual} of {source}, expected {expected} "
                       f"({against}); the download was removed",
                       hint=f"{AGAIN}; if it fails again the release or the mirror serves other content than "
                            "it publishes: do not use it")


def go_module_dir(module: str, version: str, work: Path) -> Path:
    """The module's directory in the Go module cache, fetched (and checked against sum.golang.org) if needed."""
    if shutil.which("go") is None:
        raise BundleError(f"verifying a file against the Go module {module}@{version} needs Go, which is not "
                          "on PATH", hint="install Go 1.26 (https://go.dev/dl) and run `lab bundle build "
                                          "--from release` again")
    work.mkdir(parents=True, exist_ok=True)
    out = run(["go", "mod", "download", "-json", f"{module}@{version}"], cwd=work,
              env={"GOFLAGS": "-mod=mod", "GO111MODULE": "on"}, what=f"go mod download of {module}@{version}")
    info = json.loads(out)
    if info.get("Error") or not info.get("Dir"):
        raise BundleError(f"go mod download of {module}@{version}: {info.get('Error', 'no Dir')}",
                          hint="check GOPROXY/GONOSUMDB and the network, then run again")
    return Path(info["Dir"])


class ReleaseFetch:
    """One release fetch of ``recipe`` with downloads kept in ``work``; ``assemble(out)`` writes the bundle."""

    def __init__(self, recipe: Recipe, recipe_sha: str, work: Path, say: Say, *, base: str | None = None,
                 registry: str | None = None):
        if recipe.release is None:
            raise BundleError("the recipe has no release: section, so there is nothing to fetch",
                              hint="build from source (`lab bundle build --from source`) or add release: to "
                                   "bundle/recipe.yaml")
        self.recipe, self.release, self.recipe_sha, self.say = recipe, recipe.release, recipe_sha, say
        self.work = work / "release"
        self.base = base
        self.registry = registry if registry is not None else self.release.registry

    # ------------------------------------------------------------------------------------------ HTTP

    def _dl(self, url: str) -> Path:
        name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or "index"
        return self.work / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name

    def text(self, url: str) -> str:
        """A small file (checksum, index), always fetched afresh."""
        part = self._dl(url).with_suffix(".txt.part")
        part.unlink(missing_ok=True)
        self._download(url, part)
        try:
            return part.read_text(encoding="utf-8", errors="replace")
        finally:
            part.unlink(missing_ok=True)

    def fetch(self, url: str, expected: str, what: str, against: str) -> Path:
        """``url`` downloaded into the work directory (resumed; reused when already there with ``expected``),
        checked against ``expected``. A mismatch removes the file and raises."""
        path = self._dl(url)
        if path.is_file() and sha256_file(path) == expected:
            return path
        path.unlink(missing_ok=True)
        part = path.with_name(path.name + ".part")
        self._download(url, part)
        part.replace(path)
        actual = sha256_file(path)
        if actual != expected:
            raise mismatch(what, path, expected, actual, url, against)
        return path

    @staticmethod
    def _download(url: str, part: Path) -> None:
        try:
            images.download(url, part)
        except ImageError as exc:
            raise BundleError(exc.message, hint=f"check the network (or --release-base), then {AGAIN}") from None

    # ------------------------------------------------------------------------------------------ files

    def binary(self, name: str, src: ReleaseFile, out: Path) -> Entry:
        build = self.recipe.builds[src.build]
        official = fill(src.url, build, name=name)
        url = rebase(official, self.base)
        checksum_url = rebase(fill(src.checksum, build, name=name, url=official), self.base)
        filename = official.rsplit("/", 1)[-1]
        self.say(f"{name}: {url}")
        expected = published_sha256(self.text(checksum_url), filename, checksum_url)
        path = self.fetch(url, expected, f"bin/{name}", f"published in {checksum_url}")
        dest = out / "bin" / name
        if src.member:
            self.extract(path, src.member, dest, url)
        else:
            shutil.copyfile(path, dest)
        os.chmod(dest, 0o755)
        return Entry(path=f"bin/{name}", component=component(src.build), kind="binary", version=build.version,
                     source=url + (f"#{src.member}" if src.member else ""), sha256=sha256_file(dest))

    @staticmethod
    def extract(archive: Path, member: str, dest: Path, source: str) -> None:
        """Copy one regular-file member out of a tarball; never extract anything else or follow links."""
        try:
            with tarfile.open(archive, "r:*") as tar:
                info = tar.getmember(member)
                if not info.isreg():
                    raise BundleError(f"{source}: {member} is not a regular file in the archive",
                                      hint="the release archive changed form: check it before using it")
                with tar.extractfile(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except KeyError:
            raise BundleError(f"{source} has no {member}", hint="fix release.binaries.*.member in the recipe") \
                from None
        except tarfile.TarError as exc:
            raise BundleError(f"{source} is not a readable tarball: {exc}", hint=AGAIN) from None

    def chart(self, name: str, src: ReleaseChart, out: Path) -> Entry:
        build = self.recipe.builds[src.build]
        version = fill(src.version, build)
        repo = src.repo if src.repo.endswith("/") else src.repo + "/"
        index_url = rebase(urllib.parse.urljoin(repo, "index.yaml"), self.base)
        self.say(f"chart {name} {version}: {index_url}")
        try:
            index = yaml.load(self.text(index_url), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            found = [c for c in index["entries"][name] if str(c.get("version")) == version]
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            raise BundleError(f"{index_url} is not a Helm repository index with chart {name}: {exc!r}",
                              hint="check release.charts in the recipe (repo, chart name)") from None
        if not found or not found[0].get("urls") or not HEX64.match(str(found[0].get("digest", ""))):
            raise BundleError(f"{index_url} has no chart {name} {version} with a URL and a sha256 digest",
                              hint="check the version (release.charts and builds) against the repository")
        url = rebase(urllib.parse.urljoin(repo, found[0]["urls"][0]), self.base)
        expected = str(found[0]["digest"]).lower()
        tgz = f"charts/{name}-{version}.tgz"
        path = self.fetch(url, expected, tgz, f"digest in {index_url}")
        shutil.copyfile(path, out / tgz)
        return Entry(path=tgz, component=component(src.build), kind="chart", version=version, source=url,
                     sha256=sha256_file(out / tgz))

    def module_dir(self, module: str, version: str) -> Path:
        return go_module_dir(module, version, self.work / "go")

    def manifest(self, name: str, src: ReleaseFile, out: Path) -> Entry:
        build = self.recipe.builds[src.build]
        url = rebase(fill(src.url, build, name=name), self.base)
        self.say(f"manifest {name}: {url}")
        if src.checksum:
            checksum_url = rebase(fill(src.checksum, build, name=name, url=fill(src.url, build, name=name)),
                                  self.base)
            expected = published_sha256(self.text(checksum_url), url.rsplit("/", 1)[-1], checksum_url)
            against = f"published in {checksum_url}"
        else:
            module, _, inner = src.module.partition(":")
            copy = self.module_dir(module, build.version) / inner
            if not copy.is_file():
                raise BundleError(f"the Go module {module}@{build.version} has no {inner}",
                                  hint="fix release.manifests.*.module in the recipe")
            expected, against = sha256_file(copy), f"the copy in Go module {module}@{build.version}: {copy}"
        path = self.fetch(url, expected, f"manifests/{name}", against)
        shutil.copyfile(path, out / "manifests" / name)
        return Entry(path=f"manifests/{name}", component=component(src.build), kind="manifest",
                     version=build.version, source=url, sha256=sha256_file(out / "manifests" / name))

    # ------------------------------------------------------------------------------------------ images

    def pull_ref(self, ref: str) -> tuple[str, bool]:
        """(the reference to pull ``ref`` from, whether TLS is verified): ``registry`` replaces the host."""
        host, _, rest = ref.partition("/")
        if not rest or not ("." in host or ":" in host or host == "localhost"):
            raise BundleError(f"image {ref!r} does not name its registry",
                              hint="write images fully qualified, e.g. docker.io/library/python:3.12-slim")
        if not self.registry:
            return ref, True
        mirror = urllib.parse.urlsplit(self.registry if "://" in self.registry else "https://" + self.registry)
        return f"{mirror.netloc}/{rest}", mirror.scheme != "http"

    def skopeo(self, *args: str, tls: bool = True, what: str) -> str:
        flags = [] if tls else ["--src-tls-verify=false"]
        cmd = ["skopeo", "--override-os", OS, "--override-arch", ARCH, args[0], *flags, *args[1:]]
        return run(cmd, what=what)

    def pin(self, ref: str) -> tuple[str, str]:
        """(``name@sha256:...`` to copy, ``docker://ref@sha256:...`` to record) for the ref's manifest now."""
        pull, tls = self.pull_ref(ref)
        flags = [] if tls else ["--tls-verify=false"]
        cmd = ["skopeo", "inspect", "--raw", "--retry-times", "3", *flags, f"docker://{pull}"]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0:
            raise BundleError(f"cannot read the manifest of {pull}: {proc.stderr.decode(errors='replace').strip()}",
                              hint=f"check the image name, the network (or the registry mirror), then {AGAIN}")
        digest = "sha256:" + hashlib.sha256(proc.stdout).hexdigest()  # of the bytes as served: the ref's digest
        repo = pull.rsplit(":", 1)[0] if ":" in pull.rsplit("/", 1)[-1] else pull
        return f"{repo}@{digest}", f"docker://{pull}@{digest}"

    def image(self, ref: str, out: Path) -> Entry:
        pinned, recorded = self.pin(ref)
        self.say(f"image {ref}: {recorded}")
        archive = out / "images" / f"{safe(ref)}.tar"
        self._archive(f"docker://{pinned}", archive, ref, tls=self.pull_ref(ref)[1])
        comp, version = image_component(self.recipe, ref)
        return Entry(path=f"images/{archive.name}", component=comp, kind="image", version=version,
                     source=recorded, sha256=sha256_file(archive), ref=ref,
                     preload=self.recipe.images[ref].preload)

    def _archive(self, src: str, archive: Path, ref: str, tls: bool) -> None:
        part = archive.with_name(archive.name + ".part")
        part.unlink(missing_ok=True)
        try:
            self.skopeo("copy", "--quiet", "--retry-times", "3", src, f"docker-archive:{part}:{ref}", tls=tls,
                        what=f"copy of {ref}")
            part.replace(archive)
        finally:
            part.unlink(missing_ok=True)

    def built_image(self, ref: str, image: Image, base: str, out: Path) -> Entry:
        """``base`` (official) + one layer of the image's repo: files, with the recipe's config."""
        pinned, recorded = self.pin(base)
        tls = self.pull_ref(base)[1]
        self.say(f"image {ref}: {recorded} + {', '.join(image.files.values())}")
        layout = self.work / "oci" / safe(ref)
        bundle = self.work / "unpacked" / safe(ref)
        for d in (layout, bundle):
            if d.exists():
                run(["rm", "-rf", "--one-file-system", str(d)], what=f"removing the old {d}")
        layout.parent.mkdir(parents=True, exist_ok=True)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        img = f"{layout}:img"
        self.skopeo("copy", "--quiet", "--retry-times", "3", f"docker://{pinned}", f"oci:{img}", tls=tls,
                    what=f"copy of the base image {base}")
        # unpack + repack rather than `umoci insert`: umoci 0.4.7 (Debian 12) writes insert layers without the
        # tar trailer or the last file's padding (umoci#436, fixed in #534), which GNU tar and Python reject.
        rootless = [] if os.geteuid() == 0 else ["--rootless"]
        if image.files:
            run(["umoci", "unpack", *rootless, "--image", img, str(bundle)], what=f"unpacking the base of {ref}")
            for dest, src in image.files.items():
                path = bundle / "rootfs" / dest.lstrip("/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                shutil.copyfile(REPO_ROOT / parse_source(src)[2], path)
                os.chmod(path, 0o755)
            run(["umoci", "repack", "--image", img, "--history.created_by",
                 "kvmlab " + " ".join(image.files.values()), str(bundle)], what=f"file layer of {ref}")
        config = ["umoci", "config", "--image", img, "--os", OS, "--architecture", ARCH]
        for k, v in image.env.items():
            config += ["--config.env", f"{k}={v}"]
        for flag, values in (("--config.entrypoint", image.entrypoint), ("--config.cmd", image.cmd)):
            config += [a for v in values for a in (flag, v)]
        config += ["--config.workingdir", image.workdir] if image.workdir else []
        config += ["--config.user", image.user] if image.user else []
        run(config, what=f"image config of {ref}")
        archive = out / "images" / f"{safe(ref)}.tar"
        self._archive(f"oci:{img}", archive, ref, tls=True)
        run(["rm", "-rf", "--one-file-system", str(layout), str(bundle)], what="removing the work copies")
        comp, version = image_component(self.recipe, ref)
        return Entry(path=f"images/{archive.name}", component=comp, kind="image", version=version,
                     source="+".join([f"built:{recorded}", *image.files.values()]), sha256=sha256_file(archive),
                     ref=ref, preload=self.recipe.images[ref].preload)

    # ------------------------------------------------------------------------------------------ the bundle

    def assemble(self, out: Path) -> Manifest:
        for d in ("bin", "images", "charts", "manifests"):
            (out / d).mkdir(parents=True, exist_ok=True)
        entries = [self.binary(n, s, out) for n, s in self.release.binaries.items()]
        for ref, image in self.recipe.images.items():
            built = self.release.build.get(ref)
            entries.append(self.built_image(ref, image, built.base, out) if built else self.image(ref, out))
        entries += [self.chart(n, s, out) for n, s in self.release.charts.items()]
        entries += [self.manifest(n, s, out) for n, s in self.release.manifests.items()]
        manifest = Manifest(producer="release", recipe_sha256=self.recipe_sha, kubernetes=self.recipe.kubernetes,
                            built_at=now(), entries=entries)
        write_manifest(out, manifest)
        return manifest


def safe(ref: str) -> str:
    """The archive name of an image, as the source producer names it."""
    return ref.replace("/", "_").replace(":", "_")


