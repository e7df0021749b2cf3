"""The pictures a training run draws, as hooks (`train.hooks.RunHooks`) that `dinopre train` and `resume` pass in:

- `ViewsPicture`: views.png at the start of a fresh run, the views of the first batch as training renders them
  (`viz.preview`), also sent to the trackers;
- `AttentionGrids`: at each --eval-every epoch of a run with trackers (`--logger`), the teacher's last-block
  attention over a few fixed training images, written to attention/epoch_NNNN.png and sent to the trackers.

Both draw on the main process only and draw no random numbers, so a run trains the same with or without them.
"""

from __future__ import annotations

from dinopre.data.images import BadImageError
from dinopre.train.hooks import RunContext, RunHooks
from dinopre.viz.attention import compute_figure
from dinopre.viz.figures import save_png
from dinopre.viz.preview import VIEWS, first_images, write_views

ATTENTION_IMAGES = 4  # fixed training images whose attention grid the trackers get


class ViewsPicture:
    """views.png in the run directory when a run starts afresh (a resumed run keeps the one it has)."""

    def on_run_start(self, context: RunContext) -> None:
        if context.resumed:
            return
        views = write_views(context.config, context.source, context.run_dir / VIEWS, device=context.device)
        if context.trackers is not None:
            context.trackers.log_image("views", views, 0)

    def on_epoch_end(self, context: RunContext) -> None:
        pass

    def close(self) -> None:
        pass


class AttentionGrids:
    """The teacher's attention maps of the first images the run visits, at each --eval-every epoch, for the
    trackers (a run without `--logger` draws none)."""

    def on_run_start(self, context: RunContext) -> None:
        pass

    def on_epoch_end(self, context: RunContext) -> None:
        if context.trackers is None or not context.eval_epoch:
            return
        config, source = context.config, context.source
        indices = first_images(config, min(ATTENTION_IMAGES, len(source)), 0, len(source))
        loaders = []
        for i in indices:
            try:
                image = source.load(i)
            except BadImageError:  # listed in bad_files.json already; the grid shows the others
                continue
            loaders.append((source.describe(i).rsplit("/", 1)[-1], lambda image=image: image))
        if not loaders:
            return
        figure = compute_figure(context.teacher, config.model.patch_size, loaders, config.model.image_size)
        path = save_png(figure.grid(96).render(), context.run_dir / "attention" / f"epoch_{context.epoch:04d}.png")
        context.trackers.log_image("attention", path, context.global_step)

    def close(self) -> None:
        pass


def run_pictures() -> list[RunHooks]:
    """The hooks that draw a training run's pictures, in the order the run calls them."""
    return [ViewsPicture(), AttentionGrids()]
