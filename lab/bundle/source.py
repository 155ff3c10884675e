"""``lab bundle build --from source``: every program built from the Go modules pinned under bundle/go/, images
assembled without a Docker engine (mmdebstrap for Debian roots, umoci for layers and config, skopeo for the
archive containerd imports), charts and manifests taken from the same module versions.

Each step keeps its output in a work directory beside the cache and skips itself when that output is complete,
so an interrupted build continues where it stopped. The bundle itself appears whole or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from lab.bundle.manifest import BundleError, Entry, Manifest, now, sha256_file, write_manifest
from lab.bundle.recipe import (RECIPE_DIR, REPO_ROOT, GoBuild, Image, Recipe, Root, component, image_component,
                               parse_source)

Say = Callable[[str], None]
DEBIAN_SUITE = "bookworm"
MIRROR = os.environ.get("KVMLAB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("KVMLAB_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_TOOLS = {"go": "golang 1.26 (https://go.dev/dl)", "mmdebstrap": "apt-get install mmdebstrap",
                  "umoci": "apt-get install umoci", "skopeo": "apt-get install skopeo"}


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, what: str) -> str:
    """Run a build command; on failure raise BundleError naming the step and the output's tail."""
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BundleError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd[:6])} ...\n{tail}",
                          hint="fix the cause above and run `lab bundle build` again; finished steps are kept")
    return proc.stdout


def check_tools() -> None:
    missing = [f"{tool} ({fix})" for tool, fix in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise BundleError("building the bundle from source needs: " + ", ".join(missing),
                          hint="`make bundle` installs the Debian packages; Go comes from go.dev")
    if os.geteuid() != 0:
        raise BundleError("building the bundle from source needs root (mmdebstrap --mode=root keeps ownership)",
                          hint="run `sudo lab bundle build` or `make bundle` as root")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()


class SourceBuild:
    """One from-source build of ``recipe`` in ``work``; ``assemble(out)`` writes the bundle into ``out``."""

    def __init__(self, recipe: Recipe, recipe_sha: str, work: Path, say: Say):
        self.recipe, self.recipe_sha, self.work, self.say = recipe, recipe_sha, work, say
        self.date = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime())
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ Go programs

    def program(self, build: str, name: str) -> Path:
        return self.work / "bin" / build / name

    def build_programs(self, name: str, build: GoBuild) -> None:
        module = RECIPE_DIR / "go" / build.module
        key = _digest((module / "go.mod").read_bytes(), (module / "go.sum").read_bytes() if
                      (module / "go.sum").exists() else b"", build.model_dump_json())
        out = self.work / "bin" / name
        stamp = out / ".built"
        if stamp.is_file() and stamp.read_text() == key:
            self.say(f"{name}: programs up to date")
            return
        out.mkdir(parents=True, exist_ok=True)
        ldflags = build.stamped_ldflags(self.date)
        started = time.monotonic()
        for program, package in build.programs.items():
            self.say(f"{name}: go build {package} ({build.version})")
            cmd = ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out / program)]
            if build.tags:
                cmd[2:2] = ["-tags", ",".join(build.tags)]
            run(cmd + [package], cwd=module, env={"CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"},
                what=f"go build of {package}")
        stamp.write_text(key)
        self.timings[f"go:{name}"] = round(time.monotonic() - started, 1)

    def module_dir(self, module: str) -> Path:
        """Where the Go module that build module ``module`` is about lives in the module cache."""
        build = next(b for b in self.recipe.builds.values() if b.module == module)
        package = next(iter(build.programs.values()))
        out = run(["go", "list", "-f", "{{.Module.Dir}}", package], cwd=RECIPE_DIR / "go" / module,
                  what=f"locating the module of {package}")
        return Path(out.strip())

    def source_path(self, ref: str) -> Path:
        kind, owner, name = parse_source(ref)
        if kind == "program":
            return self.program(owner, name)
        if kind == "repo":
            return REPO_ROOT / name
        return self.module_dir(owner) / name

    # ------------------------------------------------------------------------------------------ roots

    def root_dir(self, name: str) -> Path:
        return self.work / "roots" / name

    def build_root(self, name: str, root: Root) -> None:
        target = self.root_dir(name)
        stamp = target.parent / f"{name}.built"
        key = _digest(root.model_dump_json(), DEBIAN_SUITE)
        if stamp.is_file() and stamp.read_text() == key and target.is_dir():
            self.say(f"root {name}: up to date")
            return
        if target.exists():
            run(["rm", "-rf", "--one-file-system", str(target)], what=f"removing the old root {name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        debs = self.work / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        self.say(f"root {name}: mmdebstrap {DEBIAN_SUITE} + {', '.join(root.packages)}")
        started = time.monotonic()
        run(["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
             "--include=" + ",".join(root.packages),
             "--aptopt=Acquire::Languages \"none\"", "--aptopt=APT::Install-Recommends \"false\"",
             *[f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "info", "doc", "locale", "lintian")],
             "--dpkgopt=path-include=/usr/share/doc/*/copyright",
             "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
             f"--setup-hook=sync-in '{debs}' /var/cache/apt/archives/",
             f"--customize-hook=sync-out /var/cache/apt/archives '{debs}'",
             "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/archives/*.deb "
             "\"$1\"/var/log/* \"$1\"/var/cache/debconf/*-old",
             DEBIAN_SUITE, str(target), f"deb {MIRROR} {DEBIAN_SUITE} main",
             f"deb {MIRROR} {DEBIAN_SUITE}-updates main",
             f"deb {SECURITY_MIRROR} {DEBIAN_SUITE}-security main"], what=f"mmdebstrap of root {name}")
        for link, dest in root.links.items():
            path = target / link.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.symlink_to(dest)
        stamp.write_text(key)
        self.timings[f"root:{name}"] = round(time.monotonic() - started, 1)

    def static_root(self) -> Path:
        """passwd, group, nsswitch, CA certificates and /tmp: what static Go programs expect of a root."""
        root = self.root_dir("static")
        if root.is_dir():
            return root
        tmp = root.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "etc/ssl/certs").mkdir(parents=True)
        (tmp / "etc/passwd").write_text("root:x:0:0:root:/root:/sbin/nologin\n"
                                        "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
                                        "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
        (tmp / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n")
        (tmp / "etc/nsswitch.conf").write_text("hosts: files dns\n")
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", tmp / "etc/ssl/certs/ca-certificates.crt")
        (tmp / "tmp").mkdir(mode=0o1777)
        os.chmod(tmp / "tmp", 0o1777)
        (tmp / "home/nonroot").mkdir(parents=True)
        os.chown(tmp / "home/nonroot", 65532, 65532)
        tmp.rename(root)
        return root

    # ------------------------------------------------------------------------------------------ images

    def build_image(self, ref: str, image: Image, out: Path) -> Path:
        safe = ref.replace("/", "_").replace(":", "_")
        archive = out / "images" / f"{safe}.tar"
        layout = self.work / "oci" / safe
        shutil.rmtree(layout, ignore_errors=True)
        layout.parent.mkdir(parents=True, exist_ok=True)
        img = f"{layout}:img"
        self.say(f"image {ref}")
        run(["umoci", "init", "--layout", str(layout)], what=f"umoci init for {ref}")
        run(["umoci", "new", "--image", img], what=f"umoci new for {ref}")
        base = self.static_root() if image.root == "static" else self.root_dir(image.root)
        staging = self.work / "staging" / safe
        shutil.rmtree(staging, ignore_errors=True)
        # unpack + copy + repack, not `umoci insert`: Debian 12's umoci 0.4.7 writes insert layers without the
        # tar end-of-archive blocks (umoci#436), which strict tar readers reject.
        self._layer(img, staging, f"kvmlab root {image.root}", lambda rootfs: run(
            ["cp", "-a", f"{base}/.", str(rootfs)], what=f"copying root {image.root} for {ref}"))
        self._layer(img, staging, "kvmlab programs", lambda rootfs: self._add_files(image, rootfs))
        config = ["umoci", "config", "--image", img, "--os", "linux", "--architecture", "amd64",
                  "--config.env", PATH_ENV]
        for k, v in image.env.items():
            config += ["--config.env", f"{k}={v}"]
        for arg in image.entrypoint:
            config += ["--config.entrypoint", arg]
        for arg in image.cmd:
            config += ["--config.cmd", arg]
        if image.workdir:
            config += ["--config.workingdir", image.workdir]
        if image.user:
            config += ["--config.user", image.user]
        run(config, what=f"image config of {ref}")
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        run(["skopeo", "copy", "--quiet", f"oci:{img}", f"docker-archive:{archive}:{ref}"],
            what=f"archive of {ref}")
        shutil.rmtree(layout, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        return archive

    def image_key(self, ref: str, image: Image) -> str:
        """The inputs of one image: its recipe entry, its root's stamp and the digest of every file it takes."""
        root = "static" if image.root == "static" else (self.work / "roots" / f"{image.root}.built").read_text()
        files = []
        for src in image.files.values():
            path = self.source_path(src)
            paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            files += [f"{p.relative_to(path) if path.is_dir() else ''}:{sha256_file(p)}" for p in paths]
        return _digest(ref, image.model_dump_json(), root, *files)[:24]

    def cached_image(self, ref: str, image: Image, out: Path) -> Path:
        """The image archive, reused from the work cache when none of its inputs changed."""
        safe = ref.replace("/", "_").replace(":", "_")
        cached = self.work / "images" / f"{safe}.{self.image_key(ref, image)}.tar"
        if not cached.is_file():
            for stale in (self.work / "images").glob(f"{safe}.*.tar"):
                stale.unlink()
            started = time.monotonic()
            built = self.build_image(ref, image, self.work / "images-new")
            cached.parent.mkdir(parents=True, exist_ok=True)
            built.rename(cached)
            self.timings[f"image:{ref}"] = round(time.monotonic() - started, 1)
        else:
            self.say(f"image {ref}: up to date")
        archive = out / "images" / f"{safe}.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        os.link(cached, archive)  # same file system: no copy of hundreds of MB
        return archive

    def _layer(self, img: str, staging: Path, created_by: str, fill: Callable[[Path], object]) -> None:
        """One new layer: unpack the image, let ``fill`` change its rootfs, repack the difference."""
        shutil.rmtree(staging, ignore_errors=True)
        run(["umoci", "unpack", "--image", img, str(staging)], what=f"umoci unpack of {img}")
        fill(staging / "rootfs")
        run(["umoci", "repack", "--image", img, "--history.created_by", created_by, str(staging)],
            what=f"umoci repack of {img}")
        shutil.rmtree(staging, ignore_errors=True)

    def _add_files(self, image: Image, rootfs: Path) -> None:
        for dest, src in image.files.items():
            path = rootfs / dest.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            source = self.source_path(src)
            if source.is_dir():
                shutil.copytree(source, path, symlinks=False)
                for p in [path, *path.rglob("*")]:
                    os.chmod(p, 0o755 if p.is_dir() else 0o644)
            else:
                shutil.copyfile(source, path)
                os.chmod(path, 0o755)

    # ------------------------------------------------------------------------------------------ the bundle

    def component_of(self, ref: str) -> tuple[str, str]:
        """(component, version) for a program ref ``build/program``."""
        _, build, _ = parse_source(ref)
        return component(build), self.recipe.builds[build].version

    def assemble(self, out: Path) -> Manifest:
        entries: list[Entry] = []
        (out / "bin").mkdir(parents=True)
        for ref in self.recipe.node_binaries:
            _, build, program = parse_source(ref)
            dest = out / "bin" / program
            shutil.copyfile(self.program(build, program), dest)
            os.chmod(dest, 0o755)
            component, version = self.component_of(ref)
            package = self.recipe.builds[build].programs[program]
            entries.append(Entry(path=f"bin/{program}", component=component, kind="binary", version=version,
                                 source=f"go:{package}@{version}", sha256=sha256_file(dest)))
        for ref, image in self.recipe.images.items():
            archive = self.cached_image(ref, image, out)
            component, version = image_component(self.recipe, ref)
            entries.append(Entry(path=str(archive.relative_to(out)), component=component, kind="image",
                                 version=version, source="+".join([f"built:{image.root}", *image.files.values()]),
                                 sha256=sha256_file(archive), ref=ref, preload=image.preload))
        helm = self.program("helm", "helm")
        (out / "charts").mkdir()
        for name, ref in self.recipe.charts.items():
            chart_dir = self.source_path(ref)
            run([str(helm), "package", str(chart_dir), "--destination", str(out / "charts")],
                what=f"helm package of the {name} chart")
            tgz = next((out / "charts").glob(f"{name}-*.tgz"))
            version = tgz.name[len(name) + 1:-len(".tgz")]
            entries.append(Entry(path=f"charts/{tgz.name}", component=name, kind="chart", version=version,
                                 source=f"module:{ref}", sha256=sha256_file(tgz)))
        (out / "manifests").mkdir()
        for name, ref in self.recipe.manifests.items():
            dest = out / "manifests" / name
            shutil.copyfile(self.source_path(ref), dest)
            owner = parse_source(ref)[1]
            build = next(b for b in self.recipe.builds.values() if b.module == owner)
            entries.append(Entry(path=f"manifests/{name}", component=owner, kind="manifest",
                                 version=build.version, source=f"module:{ref}", sha256=sha256_file(dest)))
        manifest = Manifest(producer="source", recipe_sha256=self.recipe_sha, kubernetes=self.recipe.kubernetes,
                            built_at=now(), entries=entries)
        write_manifest(out, manifest)
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")
        return manifest

    def prepare(self) -> None:
        """Everything before assembly: Go programs and Debian roots (each skipped when already built)."""
        for name, build in self.recipe.builds.items():
            self.build_programs(name, build)
        needed = {img.root for img in self.recipe.images.values()} - {"static"}
        for name in sorted(needed):
            self.build_root(name, self.recipe.roots[name])
