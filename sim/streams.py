"""Stream drivers for Amaranth async testbenches.

Every stream test in this project goes through these helpers: the producer idles at random between beats and the
consumer withholds ``ready`` at random, so that each test exercises the valid/ready rules (payload held until
accepted, nothing lost, duplicated or reordered).
"""

import random

from amaranth.hdl import Value

__all__ = ["Stalls", "put", "get"]


class Stalls:
    """Random stall pattern for one side of a stream.

    Parameters
    ----------
    idle : float
        Probability, per cycle, that the side stalls (producer: no ``valid``; consumer: no ``ready``).
    seed : int
        Seed of the private random generator, so that every run is reproducible.
    """

    def __init__(self, idle=0.3, seed=0):
        if not 0.0 <= idle < 1.0:
            raise ValueError(f"idle probability must be in [0, 1), not {idle}")
        self.idle = idle
        self.rng = random.Random(seed)

    def stall(self):
        return self.idle > 0 and self.rng.random() < self.idle


NO_STALLS = Stalls(0.0)


async def put(ctx, stream, payloads, stalls=NO_STALLS):
    """Drive ``payloads`` into ``stream`` one beat each, idling at random between beats.

    ``valid`` and the payload stay asserted until the beat is accepted. A payload is an ``int`` (the raw bits of the
    payload, fastest) or anything ``ctx.set`` takes for the payload's shape.
    """
    raw = Value.cast(stream.payload)
    for payload in payloads:
        while stalls.stall():
            await ctx.tick()
        ctx.set(stream.valid, 1)
        ctx.set(raw if isinstance(payload, int) else stream.payload, payload)
        await ctx.tick().until(stream.ready)
        ctx.set(stream.valid, 0)


async def get(ctx, stream, count, stalls=NO_STALLS, max_cycles=1_000_000, progress=None):
    """Collect ``count`` beats from ``stream``, withholding ``ready`` at random.

    ``progress(done, count)`` is called every 256 beats and at the end, for a progress bar.

    Returns the raw payload bits (``int``) in arrival order. Fewer than ``count`` beats means the design stopped
    producing within ``max_cycles``; the caller's comparison reports that.
    """
    beats = []
    raw = Value.cast(stream.payload)
    for _ in range(max_cycles):
        if len(beats) == count:
            break
        ctx.set(stream.ready, 0 if stalls.stall() else 1)
        _, _, valid, ready, payload = await ctx.tick().sample(stream.valid, stream.ready, raw)
        if valid and ready:
            beats.append(payload)
            if progress and (len(beats) % 256 == 0 or len(beats) == count):
                progress(len(beats), count)
    ctx.set(stream.ready, 0)
    return beats
