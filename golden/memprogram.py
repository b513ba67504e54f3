"""The memory program of the memory-fed step (``rtl/lora/memstep.py``): every burst request it issues, in order,
and what the memory must hold around it (twin of its read and write sequencers).

The step in this form keeps every tensor in its on-chip scratchpads, as ``rtl/lora/step.py`` does, and moves them
across the external-memory port (``rtl/memport.py``) once each; only the NF4 weight is streamed from memory in
every pass the GEMM engine makes over it (``ceil(t / rows)`` passes in F2 and again in B4). The order is fixed by
the job descriptor alone, never by timing, so a testbench can supply the read words in request order
(``rtl/dram_port.py``).

Reads, in program order:

1. ``x``, ``dy``, ``lora_A``, ``lora_B``: each region whole.
2. F2's weight passes, then B4's: per pass, per group of :data:`WEIGHT_GROUP` blocks, the group's ``absmax2``
   value (double quantization: the port word that holds it), its ``absmax`` codes, then its ``codes``.
3. AdamW: per group of :data:`STATE_GROUP` elements of A, then of B, the group's ``exp_avg`` then ``exp_avg_sq``.

Writes, in program order: ``y`` (F2, one request per output row of each ``rows x cols`` tile, in the engine's tile
order), ``dx`` (B4, likewise), then per group of :data:`STATE_GROUP` elements of A, then of B: the new master,
then (AdamW) the new ``exp_avg`` and ``exp_avg_sq``.

Every job is split into bursts as ``rtl/memport.py``'s ``split_bursts`` does (at most ``max_burst`` words, never
across a multiple of ``boundary``).
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["WEIGHT_GROUP", "STATE_GROUP", "PortShape", "Job", "Request", "split_bursts", "read_jobs", "write_jobs",
           "requests", "bytes_by_tensor", "fill_words", "apply_writes", "check_shape", "state_groups"]

#: NF4 blocks per group of the weight stream: one ``absmax2`` value covers 256 blocks.
WEIGHT_GROUP = 256
#: Elements of A or B per group of the update's reads and writes.
STATE_GROUP = 64


@dataclass(frozen=True)
class PortShape:
    """The port as the program sees it: bytes per word, most words per burst, the boundary bursts never cross."""

    word_bytes: int = 2
    max_burst: int = 64
    boundary: int = 1024

    @classmethod
    def of(cls, config):
        """From an ``rtl/memport.py`` ``MemPortConfig`` (any object with those fields)."""
        return cls(config.data_width // 8, config.max_burst, config.boundary)


@dataclass(frozen=True)
class Job:
    """A contiguous transfer: ``tensor`` (region name), byte ``address``, ``bytes``."""

    tensor: str
    address: int
    bytes: int


@dataclass(frozen=True)
class Request:
    """One burst on the port: ``op`` (``"read"``/``"write"``), ``tensor``, byte ``address``, ``length`` in words."""

    op: str
    tensor: str
    address: int
    length: int


def split_bursts(port, address, size):
    """``(address, length)`` requests of a job, as the RTL's splitter makes them."""
    if size <= 0:
        return []
    wb = port.word_bytes
    address -= address % wb
    words = -(-size // wb)
    out = []
    while words:
        length = min(words, port.max_burst, (port.boundary - address % port.boundary) // wb)
        out.append((address, length))
        address += length * wb
        words -= length
    return out


def check_shape(memmap, rows, cols, port):
    """The shapes this program serves; raises ValueError naming the first that does not hold."""
    wb = port.word_bytes
    if cols & (cols - 1) or cols * 2 < wb:
        raise ValueError(f"the engine's columns ({cols}) must be a power of two with a bf16 output row of at least "
                         f"a port word ({wb} bytes)")
    for name, value in (("t", memmap.t), ("d_in", memmap.d_in), ("d_out", memmap.d_out)):
        unit = rows if name == "t" else cols
        if value % unit:
            raise ValueError(f"{name} = {value} must be a multiple of the engine's "
                             f"{'rows' if name == 't' else 'columns'} ({unit}): the step writes whole output tiles")
    if memmap.align % wb:
        raise ValueError(f"the memory map's alignment ({memmap.align}) must be a multiple of the port word ({wb})")
    if memmap.gradients_out:
        raise ValueError("the memory-fed step does not write the gradients (gradients_out must be False)")


def read_jobs(memmap, rows):
    """The read jobs of one step, in program order (see the module docstring)."""
    jobs = [Job(name, memmap[name].address, memmap[name].size) for name in ("x", "dy", "lora_A", "lora_B")]
    n = memmap.d_in * memmap.d_out
    blocks = -(-n // memmap.blocksize)
    item = 1 if memmap.double_quant else 4
    group_codes = WEIGHT_GROUP * memmap.blocksize // 2
    codes, absmax = memmap["nf4_codes"], memmap["nf4_absmax"]
    passes = -(-memmap.t // rows)
    for _ in range(2 * passes):
        for g in range(-(-blocks // WEIGHT_GROUP)):
            if memmap.double_quant:
                jobs.append(Job("nf4_absmax2", memmap["nf4_absmax2"].address + 4 * g, 4))
            count = min(WEIGHT_GROUP, blocks - g * WEIGHT_GROUP)
            jobs.append(Job("nf4_absmax", absmax.address + g * WEIGHT_GROUP * item, count * item))
            jobs.append(Job("nf4_codes", codes.address + g * group_codes,
                            min(group_codes, codes.size - g * group_codes)))
    if memmap.optimizer == "adamw":
        for which, elements in (("A", memmap.r * memmap.d_in), ("B", memmap.d_out * memmap.r)):
            for e in range(0, elements, STATE_GROUP):
                size = 4 * min(STATE_GROUP, elements - e)
                for name in (f"exp_avg_{which}", f"exp_avg_sq_{which}"):
                    jobs.append(Job(name, memmap[name].address + 4 * e, size))
    return jobs


def write_jobs(memmap, rows, cols):
    """The write jobs of one step, in program order (``tensor`` names the output region written)."""
    jobs = []
    t = memmap.t
    for name, features in (("y", memmap.d_out), ("dx", memmap.d_in)):
        base = memmap[name].address
        for m0 in range(0, t, rows):
            for p0 in range(0, features, cols):
                for token in range(m0, min(m0 + rows, t)):
                    jobs.append(Job(name, base + 2 * (token * features + p0), 2 * cols))
    for offset, size, names in state_groups(memmap):
        for name in names:
            region = memmap.output_region(name)
            jobs.append(Job(region.name, region.address + offset, size))
    return jobs


def state_groups(memmap):
    """The update's groups, in order: per :data:`STATE_GROUP` elements of A, then of B, ``(byte offset, bytes,
    names)`` with the region names of the master and (AdamW) its two moments."""
    states = memmap.optimizer == "adamw"
    for which, elements in (("A", memmap.r * memmap.d_in), ("B", memmap.d_out * memmap.r)):
        names = [f"lora_{which}"] + ([f"exp_avg_{which}", f"exp_avg_sq_{which}"] if states else [])
        for e in range(0, elements, STATE_GROUP):
            yield 4 * e, 4 * min(STATE_GROUP, elements - e), names


def requests(port, jobs, op):
    """The burst requests of ``jobs`` (:class:`Request`), in order."""
    return [Request(op, job.tensor, address, length)
            for job in jobs for address, length in split_bursts(port, job.address, job.bytes)]


def bytes_by_tensor(port, reqs):
    """Bytes each tensor moves across the port (whole words), ``{tensor: bytes}`` in first-seen order."""
    out = {}
    for r in reqs:
        out[r.tensor] = out.get(r.tensor, 0) + r.length * port.word_bytes
    return out


def fill_words(port, image, base, reads):
    """The words the memory returns for ``reads`` in order (ints, little-endian), from ``image`` (byte ``i`` at
    address ``base + i``; bytes past its end read as zero)."""
    wb = port.word_bytes
    total = sum(r.length for r in reads) * wb
    raw = np.zeros(total, np.uint8)
    position = 0
    image = np.frombuffer(bytes(image), np.uint8)
    for r in reads:
        start = r.address - base
        size = r.length * wb
        chunk = image[max(start, 0):max(start, 0) + size]
        raw[position:position + len(chunk)] = chunk
        position += size
    words = raw.reshape(-1, wb)
    return [int.from_bytes(w.tobytes(), "little") for w in words]


def apply_writes(port, image, base, written):
    """Store ``written`` ``(byte address, word)`` pairs into ``image`` (a bytearray from ``base``)."""
    wb = port.word_bytes
    for address, word in written:
        start = address - base
        if not 0 <= start <= len(image) - wb:
            raise ValueError(f"a write to 0x{address:x} falls outside the memory image")
        image[start:start + wb] = int(word).to_bytes(wb, "little")
    return image
