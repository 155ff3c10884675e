"""Image: resolve the spec's image (catalog name or local files), downloading and verifying if needed."""
from __future__ import annotations

from lab.images import resolve_image
from lab.phase import Context, Phase


class Image(Phase):
    name = "image"
    every_up = True  # resolves the cached image; downloads only into the cache, never into the lab

    def run(self, ctx: Context) -> None:
        ctx.image = resolve_image(ctx.lab.image)
        ctx.state.update(image={"name": ctx.image.name, "format": ctx.image.format, "sha256": ctx.image.sha256})
        ctx.log.info(f"image {ctx.image.name} ({ctx.image.format}) sha256 {ctx.image.sha256[:16]}...")
