"""Zero tensors on a CPU whose memory is taken from the OS page by page as it is written.

Why: the KV cache is a rectangle, every slot as long as the longest row in flight, but each row
writes only its own tokens. A tensor from an anonymous private memory mapping reads as zeros and
holds no memory until a page (4 KiB, 16 positions of a 64-wide head) is first written, so the
process's memory follows what the rows wrote, not the rectangle. Reading an unwritten page maps
the kernel's one shared zero page, which counts for nothing and stays in the CPU's cache. Freeing
the tensor unmaps it at once (glibc would keep a freed 16 MiB tensor on its heap), `forget`
gives a range back (a slot whose conversation left) without freeing the tensor, and `claim`
takes a range's pages in one call ahead of its writes.

Elsewhere (another device, or a system without anonymous mappings) these are plain zeros.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap

import torch

FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value, where Python lacks the name


def maps_lazily(device: torch.device) -> bool:
    """Whether `mapped_zeros` on `device` takes memory only as pages are written."""
    return torch.device(device).type == "cpu" and bool(FLAGS)


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of `shape`; on a CPU backed by pages that hold memory once written."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not maps_lazily(device) or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, nbytes, flags=FLAGS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MiB page would hold memory for unwritten rows
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    # The tensor keeps the mapping alive; when the last view of it goes, the mapping is unmapped.
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def forget(tensor: torch.Tensor, start: int, stop: int) -> None:
    """Give back the whole pages within elements start..stop-1 (flat order) of a contiguous
    `mapped_zeros` tensor on a CPU: they read as zeros again. A no-op on other devices."""
    if not maps_lazily(tensor.device):
        return
    address, size = tensor.data_ptr(), tensor.element_size()
    give_back(address + start * size, address + stop * size)


def claim(tensor: torch.Tensor, start: int, stop: int) -> None:
    """Take the memory of the pages that elements start..stop-1 (flat order) of a contiguous
    `mapped_zeros` tensor on a CPU touch, now, in one call (Linux 5.14's MADV_POPULATE_WRITE),
    where nothing was written from `start` on. Why: a page's first write is a fault of its own, and
    a page that a read had mapped to the zero page is copied then, flushing the other cores' TLBs
    (twice the cost on a VM); such mappings are dropped first (whole pages only), and populating
    the range costs as much as fresh faults at most. A no-op elsewhere: pages are then taken at
    their first write."""
    if not maps_lazily(tensor.device) or not _can_populate():
        return
    address, size = tensor.data_ptr(), tensor.element_size()
    first, end = address + start * size, address + stop * size
    if end > first:  # (should populating fail, out of memory, pages are taken at their first write)
        give_back(first, end)
        first = first // mmap.PAGESIZE * mmap.PAGESIZE
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), POPULATE_WRITE)


@functools.cache
def _can_populate() -> bool:
    """Whether this kernel takes MADV_POPULATE_WRITE (Linux 5.14 on)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return False
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=FLAGS)
    try:
        page.madvise(POPULATE_WRITE)
        return True
    except OSError:
        return False
    finally:
        page.close()


def give_back(start: int, end: int) -> None:
    """Drop the resident pages wholly inside the address range start..end-1 (Linux): an anonymous
    page reads as zeros again, a file-backed one reads back from its file."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
