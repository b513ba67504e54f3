"""Progress bars of the command line: tqdm on stderr, shown on a terminal unless ``-q``."""

import sys

__all__ = ["show_progress", "progress_bar"]


def show_progress(args):
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def progress_bar(args, total, desc, unit="beat"):
    """A tqdm bar on stderr (shown on a terminal, without --quiet) and its ``update(done, total=None)``."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, unit_scale=total is None,
               disable=not show_progress(args))

    def update(done, _total=None):
        bar.update(done - bar.n)
    return bar, update
