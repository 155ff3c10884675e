"""Find or build the bundle for the current recipe: ``<cache>/<recipe sha256>/``, verified, whole or absent."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Literal

from lab.bundle.manifest import BundleError, Manifest, verify
from lab.bundle.recipe import cache_root, load_recipe, recipe_hash

Producer = Literal["source", "release"]


def bundle_dir(sha: str | None = None) -> Path:
    """Where the bundle of the current recipe (or of recipe hash ``sha``) lives."""
    if sha is None:
        sha = recipe_hash(load_recipe())
    return cache_root() / sha


def current_bundle() -> tuple[Path, Manifest]:
    """The verified bundle for the current recipe, or a BundleError that says how to build it."""
    path = bundle_dir()
    if not path.is_dir():
        raise BundleError(f"no bundle for the current recipe at {path}",
                          hint="build it: `make bundle` (or `lab bundle build`); a cold build from source takes "
                               "about an hour on 2 cores")
    return path, verify(path)


def build_bundle(producer: Producer = "source", *, force: bool = False, release_base: str | None = None,
                 release_registry: str | None = None, say: Callable[[str], None] = print) -> tuple[Path, Manifest, float]:
    """Return (directory, manifest, seconds spent). A verified bundle for this recipe is reused unless ``force``.

    From release, ``release_base`` (a URL) replaces the scheme and host of every HTTP source, keeping the path, and
    ``release_registry`` (``host:port``, or ``http://host:port`` for plain HTTP) every image registry."""
    started = time.monotonic()
    recipe = load_recipe()
    sha = recipe_hash(recipe)
    out = cache_root() / sha
    if out.is_dir() and not force:
        try:
            manifest = verify(out)
            say(f"bundle {sha[:12]} is up to date: {out}")
            return out, manifest, time.monotonic() - started
        except BundleError as exc:
            say(f"bundle {sha[:12]} is damaged, rebuilding: {exc.message.splitlines()[0]}")
    work = cache_root() / "work"  # steps keep their own input stamps, so work outlives recipe changes
    tmp = cache_root() / f".{sha}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if producer == "source":
            from lab.bundle.source import SourceBuild, check_tools

            check_tools()
            build = SourceBuild(recipe, sha, work, say)
            build.prepare()
            build.assemble(tmp)
        else:
            from lab.bundle.release import ReleaseFetch

            ReleaseFetch(recipe, sha, work, say, base=release_base, registry=release_registry).assemble(tmp)
        manifest = verify(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_other_bundles(sha, say)
    say(f"bundle {sha[:12]} built from {producer} in {time.monotonic() - started:.0f}s: {out}")
    return out, manifest, time.monotonic() - started


def prune_other_bundles(keep: str, say: Callable[[str], None] = print) -> None:
    """Remove the bundles (and their disk images) of other recipes: each is gigabytes, and the work cache rebuilds
    one in seconds to minutes. Labs keep running: their nodes read a copy in the lab's libvirt pool."""
    root = cache_root()
    for path in root.iterdir():
        name = path.name.split(".", 1)[0]
        if len(name) == 64 and name != keep and all(c in "0123456789abcdef" for c in name):
            say(f"removing the bundle of another recipe: {path.name}")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
