"""Where the runtime's tensors live (KV cache, activations between engines), behind one small seam.

`HostMemory` keeps them in numpy arrays: the CPU backend's default, which numpy reads and writes in place
at no cost. `OrtMemory` lets onnxruntime allocate them on a device (`OrtValue.ortvalue_from_shape_and_type`):
CUDA memory for the cuda and tensorrt backends, or onnxruntime's own CPU memory, which runs on any machine
the very code path CUDA takes (`STEERGUARD_MEMORY=device`). Either way the runtime holds `Buffer`s and
binds them to engines by address with I/O binding, so the binding code is the same on every device; only
allocation and the few copies the runtime makes itself (a prefix's KV into a row, a row moved within the
cache) differ."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import SteerguardError


class Buffer:
    """A dense tensor in some memory: its address, shape and element type. `rows` and `view` give views
    of the same bytes; `array` is the numpy array itself in host memory (None on a device)."""

    def __init__(self, memory: "Memory", ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: object,
                 array: np.ndarray | None = None):
        self.memory, self.ptr, self.shape, self.dtype = memory, ptr, tuple(shape), np.dtype(dtype)
        self.owner, self.array = owner, array    # owner keeps the allocation alive

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> "Buffer":
        """Rows start..stop-1 along the first axis: a contiguous view."""
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        array = self.array[start:stop] if self.array is not None else None
        return Buffer(self.memory, self.ptr + start * row, (stop - start, *self.shape[1:]), self.dtype, self.owner, array)

    def view(self, shape: tuple[int, ...]) -> "Buffer":
        """The same bytes with another shape of the same size."""
        if int(np.prod(shape)) != int(np.prod(self.shape)):
            raise ValueError(f"cannot view {self.shape} as {shape}")
        array = self.array.reshape(shape) if self.array is not None else None
        return Buffer(self.memory, self.ptr, shape, self.dtype, self.owner, array)

    def bind_input(self, binding: ort.IOBinding, name: str) -> None:
        m = self.memory
        binding.bind_input(name, m.device_type, m.device_id, self.dtype.type, list(self.shape), self.ptr)

    def bind_output(self, binding: ort.IOBinding, name: str) -> None:
        m = self.memory
        binding.bind_output(name, m.device_type, m.device_id, self.dtype.type, list(self.shape), self.ptr)

    def numpy(self) -> np.ndarray:
        """The contents on the host: the array itself in host memory, else a copy."""
        if self.array is not None:
            return self.array
        out = np.empty(self.shape, self.dtype)
        self.memory.copy_2d(out.ctypes.data, self.nbytes, self.ptr, self.nbytes, self.nbytes, 1)
        return out


class Memory:
    """Allocates Buffers on one device and copies blocks of KV cache between them."""
    device_type = "cpu"
    device_id = 0
    host = True          # Buffers are numpy arrays

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Buffer:
        raise NotImplementedError

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        """`height` rows of `width` bytes, `spitch` apart at `src`, to `dpitch` apart at `dst`."""
        raise NotImplementedError

    def copy_positions(self, dst: Buffer, dst_row: int, src: Buffer, src_row: int, n: int) -> None:
        """The first `n` positions of KV row `src_row` of `src` into row `dst_row` of `dst`; both
        (batch, heads, length, head_dim), their lengths may differ."""
        _, heads, length, dim = dst.shape
        src_length = src.shape[2]
        size = dst.dtype.itemsize
        self.copy_2d(dst.ptr + dst_row * heads * length * dim * size, length * dim * size,
                     src.ptr + src_row * heads * src_length * dim * size, src_length * dim * size, n * dim * size, heads)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device_type}:{self.device_id})"


class HostMemory(Memory):
    """numpy arrays (zeroed lazily by the OS: a cache's pages are touched only as tokens fill it)."""

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Buffer:
        return self.wrap(np.zeros(shape, dtype))

    def wrap(self, array: np.ndarray) -> Buffer:
        """A Buffer over an existing C-contiguous numpy array (shares its memory)."""
        if not array.flags.c_contiguous:
            raise ValueError("only C-contiguous arrays can be bound by address")
        return Buffer(self, array.ctypes.data, array.shape, array.dtype, array, array)

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        _memmove_2d(dst, dpitch, src, spitch, width, height)

    def copy_positions(self, dst: Buffer, dst_row: int, src: Buffer, src_row: int, n: int) -> None:
        if dst.array is None or src.array is None:
            super().copy_positions(dst, dst_row, src, src_row, n)
        else:
            dst.array[dst_row, :, :n] = src.array[src_row, :, :n]


class OrtMemory(Memory):
    """Buffers onnxruntime allocates on `device_type` ("cpu" or "cuda"). On the CPU the copies are
    memmoves; on CUDA they go through the CUDA runtime, after the device has finished its queued work."""
    host = False

    def __init__(self, device_type: str = "cpu", device_id: int = 0):
        self.device_type, self.device_id = device_type, device_id
        self._cuda = _CudaRuntime(device_id) if device_type == "cuda" else None

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Buffer:
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, self.device_type,
                                                          self.device_id)
        buf = Buffer(self, value.data_ptr(), shape, dtype, value)
        if self._cuda is not None:
            self._cuda.memset(buf.ptr, buf.nbytes)
        else:
            ctypes.memset(buf.ptr, 0, buf.nbytes)
        return buf

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        if self._cuda is not None:
            self._cuda.copy_2d(dst, dpitch, src, spitch, width, height)
        else:
            _memmove_2d(dst, dpitch, src, spitch, width, height)


HOST = HostMemory()
MEMORY_KINDS = ("host", "device")


def memory_for(device: str, kind: str | None) -> Memory:
    """The memory a backend on `device` ("cpu" or "cuda") keeps its tensors in: `kind` "host" (numpy,
    the CPU's default) or "device" (allocated by onnxruntime on the device, the GPUs' only choice)."""
    kind = kind or ("host" if device == "cpu" else "device")
    if kind not in MEMORY_KINDS:
        raise SteerguardError(f"unknown memory {kind!r}; choose host or device (STEERGUARD_MEMORY)")
    if kind == "host":
        if device != "cpu":
            raise SteerguardError(f"the {device} backend keeps its tensors on the device; memory 'host' is for the CPU")
        return HOST
    return OrtMemory(device)


def _memmove_2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
    if dpitch == spitch == width:
        ctypes.memmove(dst, src, width * height)
        return
    for r in range(height):
        ctypes.memmove(dst + r * dpitch, src + r * spitch, width)


class _CudaRuntime:
    """The few CUDA runtime calls the copies need, through ctypes (the runtime has no CUDA Python package).
    onnxruntime runs its kernels on streams of its own and waits for them at the end of each run; the
    device is synchronized around every copy here as well, so no copy overlaps a kernel."""
    MEMCPY_DEFAULT = 4     # cudaMemcpyDefault: the direction follows from the addresses (unified addressing)

    def __init__(self, device_id: int):
        self.device_id = device_id
        self.lib = _load_cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _check(self, name: str, *args) -> None:
        err = getattr(self.lib, name)(*args)
        if err:
            raise SteerguardError(f"CUDA {name} failed: {self.lib.cudaGetErrorString(err).decode()} ({err})")

    def _prepare(self) -> None:
        self._check("cudaSetDevice", ctypes.c_int(self.device_id))
        self._check("cudaDeviceSynchronize")

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        self._prepare()
        size = ctypes.c_size_t
        self._check("cudaMemcpy2D", ctypes.c_void_p(dst), size(dpitch), ctypes.c_void_p(src), size(spitch),
                    size(width), size(height), ctypes.c_int(self.MEMCPY_DEFAULT))
        self._check("cudaDeviceSynchronize")

    def memset(self, ptr: int, nbytes: int) -> None:
        self._prepare()
        self._check("cudaMemset", ctypes.c_void_p(ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes))
        self._check("cudaDeviceSynchronize")


def _load_cudart() -> ctypes.CDLL:
    """The CUDA runtime onnxruntime's CUDA provider has loaded (found by its soname), else one from the
    nvidia-cuda-runtime wheels on sys.path."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for base in map(Path, sys.path):
        for path in sorted((base / "nvidia").glob("**/libcudart.so*"), reverse=True) if (base / "nvidia").is_dir() else []:
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                pass
    raise SteerguardError("the CUDA runtime library (libcudart.so) is not on this machine; install the "
                          "nvidia-cuda-runtime package that onnxruntime-gpu needs")
