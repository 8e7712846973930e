"""A job's checkpoint directory: a PEFT adapter anyone can load, plus the state to resume training exactly.

    adapter_config.json          PEFT LoraConfig (NOLA adapters are exported as the LoRA A/B they compute), or VeraConfig
    adapter_model.safetensors    base_model.model.<module>.lora_{A,B}.weight, fp32 (DoRA: .lora_magnitude_vector too;
                                 expert parameters: as PEFT's ParamWrapper names them, `expert_peft_keys`)
    training_state.pt            step counters, adapter parameters, optimizer + scheduler, data cursor, dropout RNG:
                                 its tensors as one flat tensor per dtype and their layout (`FLAT_STATE_FORMAT`;
                                 read with `read_training_state`), a GaLore job's as they are (`STATE_FORMAT`)

(A LoPA job's directory holds its own export instead of the PEFT adapter: executor/lopa.py's `save_lopa`.)

Each file is written under a temporary name and renamed, so a crash mid-write never leaves a torn file behind.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import queue
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, VeraConfig

from lorafleet.executor.adapters import Adapter, VeraAdapter
from lorafleet.executor.experts import expert_factors_of
from lorafleet.scheduler.spec import ALL_LINEAR, JobSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_STATE = "training_state.pt"
STATE_FORMAT = 1  # torch.save of the state itself: each tensor keeps its strides (a GaLore job's, whose projections'
# layout decides its matmuls' bits)
FLAT_STATE_FORMAT = 2  # the state's tensors as one flat tensor per dtype and where each goes (`HostCopy.save`)

log = logging.getLogger(__name__)


def peft_key(module_name: str, factor: str) -> str:
    return f"base_model.model.{module_name}.lora_{factor}.weight"


def replace_file(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def save_letting_go_of_the_gil(state: dict, path: Path) -> None:
    """torch.save through a Python file object. Given a path, torch.save writes each record holding the GIL (a
    400 MB record: ~110 ms in which the training loop's thread cannot run, half of the save); through a file object
    its writes are Python's, which let go of the GIL while the bytes go to the file."""
    with open(path, "wb") as handle:
        torch.save(state, handle)


@dataclass
class ExportFiles:
    """An export's two files, as copies taken off the live adapter (tensors on their way to the host, the config as
    text): written later, on another thread, while the adapter trains on (executor/publisher.py)."""
    tensors: HostCopy  # of a dict name -> tensor
    config: str
    weights_name: str = ADAPTER_WEIGHTS
    config_name: str = ADAPTER_CONFIG

    def write(self, directory: Path) -> None:
        replace_file(directory / self.weights_name,
                     lambda path: self.tensors.write_safetensors(path, metadata={"format": "pt"}))
        replace_file(directory / self.config_name, lambda path: path.write_text(self.config))


class HostCopy:
    """A nested state on its way to the host: `start` (on the training loop) takes what the state holds now and
    returns at once; `get` (on the publisher's thread) waits for the copy and gives the state with CPU tensors.

    The tensors of one device and dtype travel as one flat tensor: a job's state is hundreds of small tensors
    (factors, moments, gradients), and a copy each from a GPU is a host sync each (on the H200 about a second for a
    1B cohort's eight checkpoints, run P10). On a GPU the loop only gathers the flat tensor on its stream (so the next
    step's updates come after it); the device's copier thread takes host memory and copies the flat into it on a side
    stream. Pinning host memory is slow the first time (the pinned allocator keeps it afterwards): taken on the loop,
    a 1B cohort's first checkpoint round cost it 1.2-1.5 s (bench/bench_publish.py); the copier takes it, and pins by
    registering (`PINNED_BY_REGISTERING`). `STAGING_BYTES` bounds the GPU memory that gathered flats not yet copied
    hold. The pinned memory held by copies not yet written and dropped is bounded by `PINNED_BYTES`: past it (the
    publisher far behind, e.g. on a slow file system) a copy goes to pageable memory, which only the copier waits for.

    The publisher's thread copies nothing again: `save` writes the flat copies with their layout (`from_saved` gives
    the state back), `write_safetensors` writes the flats' bytes under a header, and `get` gives views of the flats
    (a flat holds this state's elements only).
    Runs H5-H6 measured why (bench/bench_publish.py): with the publisher cloning a job's ~1,400 tensors one by one
    beside it, the loop's next step took 0.43 s instead of 0.19 s; with views, 0.19 s."""

    STAGING_BYTES = 1 << 30
    PINNED_BYTES = 4 << 30
    _in_flight: list["_Transfer"] = []  # transfers that may still hold GPU staging memory, oldest first (not the
    # copies: a copy written and dropped gives its pinned memory back)
    pinned_held = 0  # bytes of pinned memory held by live copies
    _pinned_lock = threading.Lock()  # the copier pins, the publisher's thread drops

    def __init__(self, skeleton, flats: list[tuple[list[int], list[torch.Size], torch.Tensor]],
                 transfer: "_Transfer | None"):
        self._skeleton, self._flats, self._transfer = skeleton, flats, transfer

    @classmethod
    def start(cls, state) -> "HostCopy":
        leaves: list[torch.Tensor] = []
        skeleton = _with_slots(state, leaves)  # non-tensor leaves are copied now: the live state moves on
        flats = []
        for indices in _groups(leaves).values():
            flats.append((indices, [leaves[i].shape for i in indices], _gathered([leaves[i] for i in indices])))
        on_gpu = [flat for _, _, flat in flats if flat.is_cuda]
        if not on_gpu:
            return cls(skeleton, flats, None)
        staged = sum(flat.numel() * flat.element_size() for flat in on_gpu)
        cls._wait_for_staging_room(staged)
        device = on_gpu[0].device
        gathered = torch.cuda.Event()
        gathered.record(torch.cuda.current_stream(device))
        copy = cls(skeleton, flats, _Transfer(staged))
        cls._in_flight.append(copy._transfer)
        _copier(device).put(functools.partial(copy._copy_to_host, gathered))
        return copy

    @classmethod
    def pin_ahead(cls, states: list) -> None:
        """Have the copier pin host memory for copies of `states` now, for their first `start`s to take: a cohort's
        first checkpoint round would otherwise wait for the copier to pin it (on an H100 a 1B cohort's round, 1.7 GiB,
        stalled the loop 0.4 s, the staging memory full of flats not yet copied; run H8). Within `PINNED_BYTES`."""
        sizes: dict[torch.device, list[int]] = {}
        for state in states:
            leaves: list[torch.Tensor] = []
            _with_slots(state, leaves)
            for (device, dtype), indices in _groups(leaves).items():
                if device.type == "cuda":
                    sizes.setdefault(device, []).append(sum(leaves[i].numel() for i in indices) * dtype.itemsize)
        for device, device_sizes in sizes.items():
            _copier(device).put(functools.partial(_pin, device_sizes))

    def _copy_to_host(self, gathered: "torch.cuda.Event") -> None:
        """On the copier thread: host memory for each GPU flat, and its copy queued on the side stream after the
        gather; the flats are this copy's from then on. A failure is its reader's to learn (`get`)."""
        _PINNED_AHEAD.clear()  # into the pinned allocator's cache, for these copies and the next ones to take
        try:
            done = self._queue_host_copies(gathered)
        except Exception as exc:  # the copier goes on with the next copy
            self._transfer.copied(None, exc)
            return
        self._transfer.copied(done)

    def _queue_host_copies(self, gathered: "torch.cuda.Event") -> "torch.cuda.Event":
        device = next(flat.device for _, _, flat in self._flats if flat.is_cuda)
        side = _copy_stream(device)
        side.wait_event(gathered)
        staged = self._transfer.staged
        with self._pinned_lock:
            pinned = HostCopy.pinned_held + staged <= self.PINNED_BYTES
            HostCopy.pinned_held += staged if pinned else 0
        if pinned:
            weakref.finalize(self, HostCopy._unpin, staged)
        host_flats = []
        with torch.cuda.device(device), torch.cuda.stream(side):
            for indices, shapes, flat in self._flats:
                if flat.is_cuda:
                    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=pinned)
                    host.copy_(flat, non_blocking=True)
                    flat.record_stream(side)  # its memory is not reused before the copy has read it
                    flat = host
                host_flats.append((indices, shapes, flat))
            done = torch.cuda.Event()
            done.record(side)
        self._flats = host_flats
        return done

    @classmethod
    def _unpin(cls, count: int) -> None:
        with cls._pinned_lock:
            cls.pinned_held -= count

    @classmethod
    def _wait_for_staging_room(cls, wanted: int) -> None:
        cls._in_flight = [transfer for transfer in cls._in_flight if not transfer.finished()]
        while cls._in_flight and sum(transfer.staged for transfer in cls._in_flight) + wanted > cls.STAGING_BYTES:
            cls._in_flight.pop(0).wait()

    def _wait(self) -> None:
        if self._transfer is not None:
            self._transfer.wait()

    def get(self):
        """The state, its tensors views of the copy's flat tensors (a flat holds this state's elements only)."""
        self._wait()
        views: list[torch.Tensor | None] = [None] * sum(len(indices) for indices, _, _ in self._flats)
        for indices, shapes, flat in self._flats:
            for i, shape, part in zip(indices, shapes, flat.split([shape.numel() for shape in shapes])):
                views[i] = part.view(shape)
        return _filled(self._skeleton, views)

    def save(self, path: Path, fields: dict) -> None:
        """torch.save `fields` with this state as its flat copies, where each tensor goes in them, and the state's
        other values: a few objects to pickle, not each of ~900 tensor views of a 1B job (pickled one by one, in
        Python, on the GIL the training loop needs: 0.18 s against 0.03 s for 8 such states on a CPU).
        `from_saved` reads it back."""
        self._wait()
        save_letting_go_of_the_gil(
            {**fields, "skeleton": self._skeleton, "flats": [flat for _, _, flat in self._flats],
             "layout": [(indices, [list(shape) for shape in shapes]) for indices, shapes, _ in self._flats]},
            path)

    @staticmethod
    def from_saved(saved: dict):
        """The state `save` wrote (its tensors views of the flats read back)."""
        flats = [(indices, [torch.Size(shape) for shape in shapes], flat)
                 for (indices, shapes), flat in zip(saved["layout"], saved["flats"], strict=True)]
        return HostCopy(saved["skeleton"], flats, None).get()

    def write_safetensors(self, path: Path, metadata: dict[str, str]) -> None:
        """Write a flat state (name -> tensor) as a safetensors file straight from the flat copies: a header, then
        each flat's bytes in one write (no tensor copied again, no Python per tensor in the writing; the loop's
        steps go on meanwhile)."""
        self._wait()
        names = {slot.index: name for name, slot in self._skeleton.items()}
        flats = sorted(self._flats, key=lambda entry: -entry[2].element_size())  # every tensor aligned to its size
        header: dict[str, dict] = {"__metadata__": metadata}
        offset = 0
        for indices, shapes, flat in flats:
            for i, shape in zip(indices, shapes):
                end = offset + shape.numel() * flat.element_size()
                header[names[i]] = {"dtype": _SAFETENSORS_DTYPES[flat.dtype], "shape": list(shape),
                                    "data_offsets": [offset, end]}
                offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for _, _, flat in flats:
                handle.write(memoryview(flat.view(torch.uint8).numpy()))


class _Transfer:
    """A copy's way from the GPU: `staged` bytes of gathered flats until the copier has queued their copies to the
    host (`copied`) and the side stream has run them."""

    def __init__(self, staged: int):
        self.staged = staged
        self._queued = threading.Event()
        self._done: "torch.cuda.Event | None" = None
        self._error: Exception | None = None

    def copied(self, done: "torch.cuda.Event | None", error: Exception | None = None) -> None:
        self._done, self._error = done, error
        self._queued.set()

    def finished(self) -> bool:
        return self._queued.is_set() and (self._done is None or self._done.query())

    def wait(self) -> None:
        self._queued.wait()
        if self._error is not None:
            raise RuntimeError(f"copying a snapshot to the host failed: {self._error}") from self._error
        self._done.synchronize()


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def _groups(leaves: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The leaves' indices by device and dtype: what travels as one flat tensor."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(leaves):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return groups


@torch.no_grad()
def _gathered(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One new 1-D tensor holding `tensors`' elements (a copy of now): one call, however many tensors (a job's state
    is about a thousand; a call each is host time on the loop)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1).clone()
    return torch._utils._flatten_dense_tensors(tensors)


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}
_COPIERS: dict[torch.device, "queue.SimpleQueue[Callable[[], None]]"] = {}
_COPIERS_LOCK = threading.Lock()
_PINNED_AHEAD: list[torch.Tensor] = []  # host memory `HostCopy.pin_ahead` pinned, held until the next copy (the
# pinned allocator's cache keeps what is freed, and would give one block to every pinning ahead if each freed its own)


# Pinned host memory by cudaHostRegister of ordinary memory, paged in by 8 threads, not by cudaHostAlloc: that holds
# the driver's lock for as long as it pins, and every CUDA call of the loop waits for it, whichever thread pins. On an
# H100 a 1B cohort's checkpoint round (1.7 GiB) took 1.1-1.2 s to pin by cudaHostAlloc, and a step beside it 1.6 s;
# registered, 0.34-0.37 s, and the steps beside it 0.19-0.20 s against 0.18 s (run H7, bench/bench_publish.py).
PINNED_BY_REGISTERING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def _copier(device: torch.device) -> "queue.SimpleQueue[Callable[[], None]]":
    """The queue of the device's copier thread (started on first use): `HostCopy._copy_to_host` and `_pin`, in
    order."""
    with _COPIERS_LOCK:
        if device not in _COPIERS:
            torch._C._accelerator_setAllocatorSettings(PINNED_BY_REGISTERING)  # the process's pinned allocator
            _COPIERS[device] = queue.SimpleQueue()
            threading.Thread(target=_copy_forever, args=(_COPIERS[device],), name=f"host-copier-{device}",
                             daemon=True).start()
        return _COPIERS[device]


def _copy_forever(tasks: "queue.SimpleQueue[Callable[[], None]]") -> None:
    while True:
        tasks.get()()  # no reference to a copy outlives its task: a dropped copy unpins at once


def _pin(sizes: list[int]) -> None:
    """On the copier thread: pinned host memory of `sizes` bytes, held in `_PINNED_AHEAD` (within `PINNED_BYTES`)."""
    held = sum(buffer.numel() for buffer in _PINNED_AHEAD)
    try:
        for size in sizes:
            if held + size > HostCopy.PINNED_BYTES:
                return
            _PINNED_AHEAD.append(torch.empty(size, dtype=torch.uint8, pin_memory=True))
            held += size
    except RuntimeError as exc:  # the copies will pin what they need themselves
        log.warning("could not pin host memory ahead of a checkpoint: %s", exc)


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


@dataclass(frozen=True)
class _Slot:
    """Where the `index`th tensor leaf of a state goes back in."""
    index: int


_IMMUTABLE = (int, float, str, bool, type(None))  # leaves kept as they are: a deep copy of one is itself
_SLOTS: dict[int, _Slot] = {}  # index -> its _Slot, made once (frozen: one instance serves every state)


def _slot(index: int) -> _Slot:
    slot = _SLOTS.get(index)
    return slot if slot is not None else _SLOTS.setdefault(index, _Slot(index))  # keyed: right under any thread


def _with_slots(state, leaves: list[torch.Tensor]):
    """`state` with each tensor appended to `leaves` and replaced by its `_Slot`, everything else deep-copied.
    Runs on the training loop for every leaf of a job's state (~1,400 for a 1B job), hence no deep copy of an
    immutable leaf and the slots shared."""
    if isinstance(state, torch.Tensor):
        leaves.append(state)
        return _slot(len(leaves) - 1)
    if isinstance(state, dict):
        return {key: _with_slots(value, leaves) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)([_with_slots(value, leaves) for value in state])
    if isinstance(state, _IMMUTABLE):
        return state
    return copy.deepcopy(state)


def _filled(skeleton, tensors: list[torch.Tensor]):
    """The state `_with_slots` took apart, with `tensors` in its slots."""
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {key: _filled(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_filled(value, tensors) for value in skeleton)
    return skeleton


def save_peft_adapter(directory: Path, adapter: Adapter, base_model_path: str, fan_in_fan_out: bool = False) -> None:
    peft_adapter_files(adapter, base_model_path, fan_in_fan_out).write(directory)


def peft_adapter_files(adapter: Adapter, base_model_path: str, fan_in_fan_out: bool = False) -> ExportFiles:
    """The PEFT export of `adapter`. `fan_in_fan_out`: the targets are transformers' Conv1D (GPT-2), whose weights PEFT
    must know are [in, out]."""
    spec = adapter.spec
    common = dict(
        r=spec.r,
        target_modules=ALL_LINEAR if spec.target_modules == (ALL_LINEAR,) else list(spec.target_modules),
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
        bias="none",
        base_model_name_or_path=str(base_model_path),
    )
    config = (_vera_config if isinstance(adapter, VeraAdapter) else _lora_config)(adapter, common)
    fields = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return ExportFiles(HostCopy.start(peft_tensors(adapter)), json.dumps(fields, indent=2, sort_keys=True))


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The tensors of `adapter`'s PEFT export, fp32, as its copy takes them (and `HostCopy.pin_ahead` sizes them):
    the live factors, which the snapshot's HostCopy copies."""
    tensors = _vera_tensors(adapter) if isinstance(adapter, VeraAdapter) else lora_tensors(adapter, copies=False)
    return {key: tensor.detach().float() for key, tensor in tensors.items()}


def _lora_config(adapter: Adapter, common: dict) -> LoraConfig:
    """LoRA, rsLoRA and DoRA as PEFT's LoraConfig; NOLA as the LoRA factors it computes."""
    spec = adapter.spec
    return LoraConfig(
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        use_rslora=spec.use_rslora,  # LoRA+ (loraplus_lr_ratio) changes only training: nothing to export
        use_dora=spec.use_dora,
        target_parameters=list(spec.target_parameters) or None,  # a MoE base's expert parameters (executor/experts.py)
        **common,
    )


def lora_tensors(adapter: Adapter, copies: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA-kind adapter's tensors under the names PEFT saves them with: copies, or with `copies=False` its live
    layer factors (a copy each is a launch and an allocation on the loop, a thousand for a 1B cohort's checkpoint)."""
    tensors = {}
    for name, (a, b) in adapter.lora_weights(copies).items():
        tensors[peft_key(name, "A")], tensors[peft_key(name, "B")] = a, b
    experts = expert_factors_of(adapter)
    if experts is not None:
        weights = experts.peft_weights()
        for name, key in expert_peft_keys(list(weights)).items():
            tensors[key.format(factor="A")], tensors[key.format(factor="B")] = weights[name]
    for name, magnitude in adapter.magnitudes().items():
        tensors[f"base_model.model.{name}.lora_magnitude_vector"] = magnitude.detach().clone()
    return tensors


def expert_peft_keys(names: list[str]) -> dict[str, str]:
    """Expert parameter key -> its factors' name in PEFT's file (with a `{factor}` field for A or B).

    PEFT wraps a module once per targeted parameter, in the module's parameter order, each wrapper around the last:
    the first parameter's factors sit deepest, under one `.base_layer` per parameter of that module targeted after it
    (Qwen2-MoE with both: `experts.base_layer.lora_A` is gate_up_proj's, `experts.lora_A` down_proj's). `names` come
    in model order, which is that order.
    """
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    keys = {}
    for module, params in by_module.items():
        for i, name in enumerate(params):
            keys[name] = f"base_model.model.{module}{'.base_layer' * (len(params) - 1 - i)}.lora_{{factor}}.weight"
    return keys


def _vera_config(adapter: VeraAdapter, common: dict) -> VeraConfig:
    """PEFT's VeraConfig with the shared projections saved (`save_projection`), so loading needs no PRNG replay."""
    spec = adapter.spec
    return VeraConfig(projection_prng_key=spec.vera.projection_prng_key, d_initial=spec.vera.d_initial,
                      vera_dropout=spec.lora_dropout, save_projection=True, **common)


def _vera_tensors(adapter: VeraAdapter) -> dict[str, torch.Tensor]:
    vera_a, vera_b = adapter.projections
    tensors = {"base_model.vera_A": vera_a, "base_model.vera_B": vera_b}
    for name, lambda_d, lambda_b in zip(adapter.layer_names, adapter.lambda_d, adapter.lambda_b):
        tensors[f"base_model.model.{name}.vera_lambda_d"] = lambda_d
        tensors[f"base_model.model.{name}.vera_lambda_b"] = lambda_b
    return tensors


@dataclass
class JobSnapshot:
    """A job's export (and, for a checkpoint, its training state) as copies taken at a step boundary, to be written
    into `directory` by `write` (which returns it): taken on the training loop, written on the publisher's thread
    while the cohort trains on. Files already written (a GaLore job's, written on the loop) are left as they are."""
    directory: Path
    export: ExportFiles | None = None
    training_state: HostCopy | None = None

    def write(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.export is not None:
            self.export.write(self.directory)
        if self.training_state is not None:
            replace_file(self.directory / TRAINING_STATE,
                         lambda path: self.training_state.save(path, {"format": FLAT_STATE_FORMAT}))
        return self.directory


def save_training_state(directory: Path, state: dict) -> None:
    replace_file(directory / TRAINING_STATE,
                 lambda path: save_letting_go_of_the_gil({"format": STATE_FORMAT, **state}, path))


def read_training_state(directory) -> tuple[Path, dict]:
    """The training state saved in `directory` and its path; raises when there is none or its format is another."""
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no {TRAINING_STATE} in {directory}")
    with torch.serialization.safe_globals([_Slot]):
        saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") not in (STATE_FORMAT, FLAT_STATE_FORMAT):
        raise ValueError(f"cannot resume: {path} has state format {saved.get('format')}, expected {STATE_FORMAT} or "
                         f"{FLAT_STATE_FORMAT}")
    if saved["format"] == STATE_FORMAT:
        return path, saved
    return path, {"format": saved["format"], **HostCopy.from_saved(saved)}


def load_training_state(directory: Path, spec: JobSpec) -> dict:
    """Read a job's training state, refusing one saved for a different spec (it would not resume the same run)."""
    path, state = read_training_state(directory)
    if _saved_spec(state["spec"]) != spec:
        raise ValueError(f"cannot resume: {path} was saved for a different job spec")
    return state


def _saved_spec(text: str) -> JobSpec | None:
    """The spec a state was saved for, read as a spec rather than compared as text: one saved before a field was
    added to JobSpec lacks it, and holds its default (a job running through an upgrade resumes)."""
    try:
        return JobSpec.model_validate_json(text)
    except ValueError:
        return None
