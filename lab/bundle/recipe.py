"""The bundle recipe (bundle/recipe.yaml) as typed data, its hash, and where bundles are cached.

The recipe hash covers every file under bundle/ (path, executable bit, contents) and every repository file an
image takes (``repo:`` sources): change any of them and the bundle is built anew in a directory of its own.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lab.errors import SpecError

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "bundle"
RECIPE_FILE = RECIPE_DIR / "recipe.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GoBuild(_Model):
    module: str                         # directory under bundle/go/
    version: str                        # the component's version, used in ldflags and the manifest
    programs: dict[str, str]            # output name -> Go package
    tags: list[str] = Field(default_factory=list)
    ldflags: str = ""

    def stamped_ldflags(self, date: str) -> str:
        bare = self.version.lstrip("v")
        parts = bare.split(".")
        values = {"version": self.version, "bare": bare, "major": parts[0],
                  "minor": parts[1] if len(parts) > 1 else "", "date": date}
        return " ".join(("-s -w " + self.ldflags.format(**values)).split())


class Root(_Model):
    packages: list[str]
    links: dict[str, str] = Field(default_factory=dict)  # path in root -> target


class Image(_Model):
    root: str                                            # "static" or a key of roots
    files: dict[str, str]                                # path in image -> source (see Source)
    component: str = ""                                  # default: the build of its first file
    preload: bool = True                                 # imported into every node by the runtime phase
    entrypoint: list[str] = Field(default_factory=list)
    cmd: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str = ""
    user: str = ""


class ReleaseFile(_Model):
    """A file from an official release host. ``url`` and ``checksum`` are templates: {name} (the key), {version}
    and {bare} (the build's version with and without "v"); ``checksum`` also takes {url}. Exactly one of
    ``checksum`` (a published sha256 file) or ``module`` (``<go module>:<path>``, the same file in the Go module
    at {version}, which the Go checksum database vouches for) says how the file is verified."""
    build: str                          # key of builds: the component and version
    url: str
    checksum: str = ""
    module: str = ""
    member: str = ""                    # for a .tar.gz: the one member to take out of it


class ReleaseChart(_Model):
    """A chart from a Helm repository; verified by the ``digest`` (sha256) the repository's index.yaml gives."""
    build: str
    repo: str                           # base URL of the repository (index.yaml lives under it)
    version: str = "{bare}"             # template like ReleaseFile's


class ReleaseImage(_Model):
    """An image of ours, released nowhere: ``base`` (an official image) plus one layer of the image's ``repo:``
    files, with the recipe's config."""
    base: str


class Release(_Model):
    """Where ``lab bundle build --from release`` takes each piece. Images of ``images:`` not listed in ``build``
    are copied from their registries by reference (skopeo verifies every blob digest)."""
    binaries: dict[str, ReleaseFile]    # output name (as in node_binaries) -> source
    charts: dict[str, ReleaseChart]     # as in charts
    manifests: dict[str, ReleaseFile]   # as in manifests
    build: dict[str, ReleaseImage] = Field(default_factory=dict)   # image ref -> how we build it
    registry: str = ""                  # optional mirror for every registry host (http://host:port for plain HTTP)


class Recipe(_Model):
    kubernetes: str
    builds: dict[str, GoBuild]
    roots: dict[str, Root]
    images: dict[str, Image]
    node_binaries: list[str]
    charts: dict[str, str]
    manifests: dict[str, str]
    release: Release | None = None

    def sources(self) -> list[str]:
        """Every source reference the recipe uses (program, module file or repo file)."""
        refs = [s for img in self.images.values() for s in img.files.values()]
        return refs + list(self.node_binaries) + list(self.charts.values()) + list(self.manifests.values())


SOURCE = re.compile(r"^(?:(?P<build>[a-z0-9-]+)/(?P<program>[a-z0-9.-]+)|(?P<origin>[a-z0-9-]+):(?P<path>\S+))$")


def parse_source(ref: str) -> tuple[str, str, str]:
    """``build/program`` -> ("program", build, program); ``module:path`` -> ("module", module, path);
    ``repo:path`` -> ("repo", "", path)."""
    m = SOURCE.match(ref)
    if not m:
        raise ValueError(f"{ref!r}: use build/program, <go-module>:path or repo:path")
    if m.group("build"):
        return "program", m.group("build"), m.group("program")
    if m.group("origin") == "repo":
        return "repo", "", m.group("path")
    return "module", m.group("origin"), m.group("path")


def component(build: str) -> str:
    """The component a build belongs to: cilium and cilium-operator are both Cilium."""
    return "cilium" if build.startswith("cilium") else build


def image_component(recipe: Recipe, ref: str) -> tuple[str, str]:
    """(component, version) of an image: its declared component and tag, else those of its first program's build."""
    image = recipe.images[ref]
    if image.component:
        return image.component, ref.rsplit(":", 1)[-1]
    kind, build, _ = parse_source(next(iter(image.files.values())))
    if kind != "program":
        raise ValueError(f"images.{ref}: name its component (its first file is not a program)")
    return component(build), recipe.builds[build].version


def _problems(recipe: Recipe) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    modules = {b.module for b in recipe.builds.values()}
    for ref in recipe.sources():
        try:
            kind, owner, name = parse_source(ref)
        except ValueError as exc:
            problems.append(("", str(exc)))
            continue
        if kind == "program" and (owner not in recipe.builds or name not in recipe.builds[owner].programs):
            problems.append(("", f"{ref}: no program {name!r} in builds.{owner}"))
        if kind == "module" and owner not in modules:
            problems.append(("", f"{ref}: no build uses module {owner!r}"))
        if kind == "repo" and not (REPO_ROOT / name).is_file():
            problems.append(("", f"{ref}: {name} is not a file of this repository"))
    for ref, img in recipe.images.items():
        if img.root != "static" and img.root not in recipe.roots:
            problems.append((f"images.{ref}.root", f"{img.root!r} is neither 'static' nor one of roots"))
    if recipe.release is not None:
        problems += _release_problems(recipe, recipe.release)
    for name, build in recipe.builds.items():
        if not (RECIPE_DIR / "go" / build.module / "go.mod").is_file():
            problems.append((f"builds.{name}.module", f"bundle/go/{build.module}/go.mod does not exist"))
    return problems


def _release_problems(recipe: Recipe, release: Release) -> list[tuple[str, str]]:
    """release: must give every node binary, chart and manifest the source producer gives, each verified once."""
    problems: list[tuple[str, str]] = []
    want = {"binaries": {parse_source(r)[2] for r in recipe.node_binaries if SOURCE.match(r)},
            "charts": set(recipe.charts), "manifests": set(recipe.manifests)}
    for section, wanted in want.items():
        have = set(getattr(release, section))
        for name in sorted(wanted - have):
            problems.append((f"release.{section}", f"no source for {name!r}, which the recipe ships"))
        listed = "node_binaries" if section == "binaries" else section
        for name in sorted(have - wanted):
            problems.append((f"release.{section}.{name}", f"not in the recipe's {listed}"))
    for section in ("binaries", "charts", "manifests"):
        for name, src in getattr(release, section).items():
            if src.build not in recipe.builds:
                problems.append((f"release.{section}.{name}.build", f"{src.build!r} is not one of builds"))
            if isinstance(src, ReleaseFile) and bool(src.checksum) == bool(src.module):
                problems.append((f"release.{section}.{name}", "give exactly one of checksum (a URL template) "
                                 "or module (<go module>:<path>)"))
            if isinstance(src, ReleaseFile) and src.module and ":" not in src.module:
                problems.append((f"release.{section}.{name}.module", "use <go module>:<path in the module>"))
    for ref in release.build:
        files = recipe.images[ref].files.values() if ref in recipe.images else []
        if ref not in recipe.images:
            problems.append((f"release.build.{ref}", "not one of images"))
        elif any(parse_source(f)[0] != "repo" for f in files if SOURCE.match(f)):
            problems.append((f"release.build.{ref}", "only images whose files are all repo:path can be built "
                             "on an official base"))
    return problems


def load_recipe(path: Path = RECIPE_FILE) -> Recipe:
    try:
        recipe = Recipe.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        raise SpecError([(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()],
                        source=str(path)) from None
    problems = _problems(recipe)
    if problems:
        raise SpecError(problems, source=str(path))
    return recipe


def recipe_hash(recipe: Recipe, recipe_dir: Path = RECIPE_DIR) -> str:
    """sha256 over bundle/ (path, exec bit, content) and the repository files the images take."""
    h = hashlib.sha256()
    files = sorted(p for p in recipe_dir.rglob("*") if p.is_file())
    extra = sorted({REPO_ROOT / parse_source(r)[2] for r in recipe.sources() if parse_source(r)[0] == "repo"})
    for p in files + extra:
        rel = p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p
        h.update(f"{rel} {'x' if os.access(p, os.X_OK) else '-'}\n".encode())
        h.update(hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def current_recipe_hash() -> str:
    """The recipe hash of this checkout's bundle (known without the bundle being built)."""
    return recipe_hash(load_recipe())


def cache_root() -> Path:
    base = os.environ.get("KVMLAB_BUNDLE_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvmlab" / "bundles"


def image_ref(recipe: Recipe, repository: str) -> tuple[str, str]:
    """(repository, tag) of the recipe's image from ``repository`` (e.g. quay.io/cilium/cilium)."""
    for ref in recipe.images:
        repo, _, tag = ref.rpartition(":")
        if repo == repository:
            return repo, tag
    raise KeyError(f"bundle/recipe.yaml has no image from {repository}")
