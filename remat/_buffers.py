"""What is live at a compiled step's memory peak, read from XLA's dump.

XLA writes its buffer assignment when compiled with ``xla_dump_to=DIR``
(``lowered.compile(compiler_options={"xla_dump_to": DIR})``), next to the
optimized HLO module:

- ``*after_optimizations-live-range.txt``: the schedule's live ranges and,
  under ``Live ranges at N (peak):``, every HLO value live at the peak with its
  size in bytes;
- ``*after_optimizations-buffer-assignment.txt``: the allocations (their
  size and ``color``, the memory space), each value's allocation, offset,
  shape and layout (``S(5)`` in a layout is host memory);
- ``*after_optimizations.txt``: the optimized HLO, where each instruction
  carries JAX's metadata (``op_name``: the name stack, e.g.
  ``jit(step)/transpose(jvp(Transformer))/layers/...``; ``stack_frame_id``: the
  source line, resolved through the module's ``StackFrames`` tables).

These files are unversioned text that no library parses, so this module is
the one place that reads them; it raises :class:`DumpFormatError` with what it
did not find when the format changes, and callers fall back to
``memory_analysis()`` alone. Tested on committed dumps (``tests/dumps/``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from remat import _compat
from remat._errors import DumpFormatError

_compat.hide_frames(__file__)

__all__ = ["LiveValue", "PeakDump", "device_memory", "read_dump"]

HOST_MEMORY_SPACE = 5
"""XLA's memory space of ``pinned_host`` buffers (``S(5)`` in a layout)."""

TPU_HBM_MEMORY_SPACE = 0
"""XLA:TPU's memory space of HBM, the only one ``memory_analysis()`` counts
on a TPU. Its others are on-chip memories (``S(1)`` VMEM, ``S(2)`` SMEM,
``S(6)`` sync flags, ...): the buffer assignment lists their allocations
(``color 1``, ...), but libtpu's ``temp_size_in_bytes`` does not grow with
them (checked on v5p: a VMEM allocation of 8 MiB beside one of 4 MiB in HBM,
``temp_size_in_bytes`` 4 MiB + 64 KiB). On other platforms every memory space
but the host's is device memory (XLA:GPU's colors 1 and 2, collective and
temporary buffers, lie in GPU memory)."""


def device_memory(space: int, platform: str) -> bool:
    """Whether memory space ``space`` is device memory as ``memory_analysis()``
    counts it on ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``)."""
    if platform == "tpu":
        return space == TPU_HBM_MEMORY_SPACE
    return space != HOST_MEMORY_SPACE


@dataclasses.dataclass(frozen=True)
class LiveValue:
    """One HLO value live at the peak.

    Attributes:
      value: the HLO value, ``instruction{tuple index}``, e.g. ``arg_tuple.1{7}``.
      size_bytes: its size in bytes (per device), less any bytes a larger value
        live at the peak occupies too (XLA updating a buffer in place, e.g. a
        loop's carry and its update), so that no byte counts twice.
      shape: e.g. ``"f32[4,4,128,384]"`` (layout dropped).
      parameter: the entry parameter's name where the value is an argument of
        the step (e.g. ``state_params__embed____embedding___value.1``), else "".
      op_name: JAX's ``op_name`` of the instruction that makes the value,
        found through tuples, loop-carried values and copies (the
        ``jit(...)/`` prefix kept), "" where there is none.
      source: ``file:line`` of that instruction's innermost stack frame, or "".
      memory_space: the memory space of its layout (``S(n)``; 0 where none): 5 is host (``pinned_host``).
      in_temp: the value lies in the step's temporary allocation (XLA's
        ``preallocated-temp``), not in an argument's or output's buffer.
      copy_of: the entry parameter's name where the value is a copy XLA made
        of an argument (a cast, transpose or layout change with no metadata
        of its own), else "".
    """

    value: str
    size_bytes: int
    shape: str
    parameter: str
    op_name: str
    source: str
    memory_space: int = 0
    in_temp: bool = False
    copy_of: str = ""


@dataclasses.dataclass(frozen=True)
class PeakDump:
    """The values live at the peak of one compiled module.

    Attributes:
      module: the HLO module's name, e.g. ``jit_step``.
      live: the values live at the peak in the buffers ``memory_analysis()``
        counts (the arguments', the outputs' and the temporary allocation in
        device memory: not constants, thread-local buffers or a TPU's on-chip
        memories, :func:`device_memory`) or in host memory, largest first; and,
        for each argument's or output's buffer, its bytes that no live value
        occupies (see :func:`read_dump`).
      peak_live_bytes: the total size in bytes of every value live at the
        peak, as XLA's live-range dump states it (on-chip values included).
      temp_allocation_bytes: the size of the temporary allocation(s) in
        device memory (the heap the values in it are packed into), bytes:
        the ``preallocated-temp`` allocations whose color is device memory.
    """

    module: str
    live: tuple[LiveValue, ...]
    peak_live_bytes: int
    temp_allocation_bytes: int

    @property
    def fragmentation_bytes(self) -> int:
        """Bytes of the temporary allocation that no value occupies at the
        peak: the holes the heap's packing leaves between live values."""
        return self.temp_allocation_bytes - sum(v.size_bytes for v in self.live if v.in_temp)


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_ATTR = {k: re.compile(rf"\b{k}=%?([\w.\-]+)") for k in ("calls", "body", "condition", "to_apply", "index")}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)" source_line=(\d+)')
_PEAK = re.compile(r"^\s*Live ranges at \d+ \(peak\):\s*$")
_PEAK_VALUE = re.compile(r"^\s+(\S+): (\d+) bytes")
_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(?:, color (\d+))?(.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")


@dataclasses.dataclass
class _Instruction:
    name: str
    opcode: str
    operands: list[str]
    attrs: dict[str, str]
    computation: str
    op_name: str
    source: str


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise DumpFormatError(f"unbalanced brackets in HLO line: {text[:120]!r}")


def _frames(lines: list[str]) -> dict[str, str]:
    """``stack_frame_id`` -> ``file:line`` from the module's FileNames /
    FileLocations / StackFrames tables (the innermost frame of each id)."""
    tables: dict[str, dict[str, str]] = {k: {} for k in ("FileNames", "FunctionNames", "FileLocations",
                                                          "StackFrames")}
    current = None
    for line in lines:
        if line in tables:
            current = tables[line]
        elif current is not None and (m := re.match(r"^(\d+) (.*)$", line)):
            current[m[1]] = m[2]
        elif line.startswith(("%", "ENTRY")):
            break
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    out = {}
    for frame, text in tables["StackFrames"].items():
        loc = re.search(r"file_location_id=(\d+)", text)
        where = tables["FileLocations"].get(loc[1], "") if loc else ""
        f, ln = re.search(r"file_name_id=(\d+)", where), re.search(r"\bline=(\d+)", where)
        if f and ln:
            out[frame] = f"{_short(files.get(f[1], '?'))}:{ln[1]}"
    return out


def _short(path: str) -> str:
    """``path`` relative to the working directory where it lies under it."""
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return path if rel.startswith("..") else rel


def _parse_hlo(text: str) -> tuple[dict[str, _Instruction], str, dict[str, str]]:
    """Instructions by name, the entry computation's name, and the root of each computation."""
    lines = text.splitlines()
    frames = _frames(lines)
    instrs: dict[str, _Instruction] = {}
    roots: dict[str, str] = {}
    entry = computation = ""
    for line in lines:
        if line.startswith(("%", "ENTRY %")) and line.rstrip().endswith("{"):
            computation = _COMPUTATION.match(line)[1]  # type: ignore[index]
            entry = computation if line.startswith("ENTRY") else entry
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        rest = line[m.end():]
        shape_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        after = rest[shape_end:].lstrip()
        paren = after.index("(")
        opcode = after[:paren]
        args_end = _balanced(after, paren)
        operands = re.findall(r"%([\w.\-]+)", after[paren:args_end])
        tail = after[args_end:]
        attrs = {k: a[1] for k, p in _ATTR.items() if (a := p.search(tail))}
        if opcode == "parameter":
            attrs["number"] = after[paren + 1:args_end - 1]
        op = _OP_NAME.search(tail)
        frame = _FRAME.search(tail)
        src = _SOURCE.search(tail)
        source = frames.get(frame[1], "") if frame else (f"{src[1]}:{src[2]}" if src else "")
        op_name = op[1].replace("\\'", "'").replace('\\"', '"') if op else ""
        instrs[m[1]] = _Instruction(m[1], opcode, operands, attrs, computation, op_name, source)
        if line.lstrip().startswith("ROOT "):
            roots[computation] = m[1]
    if not entry or not instrs:
        raise DumpFormatError("no ENTRY computation or no instructions in the optimized HLO")
    return instrs, entry, roots


_MAX_TUPLE_DEPTH = 16
"""How deep :func:`_origin` follows a value into nested tuples: deeper, it is
going round a loop of tuples (each turn one level deeper) and stops."""


def _origin(instrs: dict[str, _Instruction], entry: str, roots: dict[str, str],
            callers: dict[str, _Instruction], value: str) -> tuple[_Instruction | None, bool]:
    """The instruction that makes ``value`` (``name{i,j}``), looking through
    tuples, get-tuple-element, loop-carried values (to what the loop body
    writes, or to the loop's input where the body passes the value through),
    bitcasts, and copies or conversions XLA added (no JAX metadata of their own);
    and whether the value is such a copy (a buffer of its own)."""
    m = re.match(r"^(.*?)\{([\d,]*)\}$", value)
    name, index = (m[1], [int(i) for i in m[2].split(",") if i]) if m else (value, [])
    seen: set[tuple[str, tuple[int, ...]]] = set()
    copied = False
    while name in instrs:
        key = (name, tuple(index))
        ins = instrs[name]
        if key in seen or len(index) > _MAX_TUPLE_DEPTH:
            return ins, copied
        seen.add(key)
        op = ins.opcode
        if op == "tuple" and index:
            name, index = ins.operands[index[0]], index[1:]
        elif op == "get-tuple-element":
            name, index = ins.operands[0], [int(ins.attrs["index"]), *index]
        elif op == "while":
            body = ins.attrs["body"]
            passed = _origin_is(instrs, roots[body], index, _param(instrs, roots[body]))
            name = ins.operands[0] if passed else roots[body]
        elif op == "bitcast" and ins.operands:
            name = ins.operands[0]
        elif not _jax(ins) and "calls" in ins.attrs and ins.attrs["calls"] in roots:
            inner = instrs[roots[ins.attrs["calls"]]]  # a fusion: its root op's metadata
            if _jax(inner):
                return dataclasses.replace(inner, name=ins.name, opcode=ins.opcode), copied
            name, copied = (ins.operands[0], True) if ins.operands else (name, copied)
        elif not _jax(ins) and ins.operands and op not in ("parameter", "constant"):
            name, copied = ins.operands[0], True  # e.g. a copy or convert XLA added: what it copies
        elif op == "parameter" and ins.computation != entry and ins.computation in callers:
            caller = callers[ins.computation]
            # a loop's body or condition: the loop's state, what the body writes
            written = roots.get(caller.attrs["body"]) if caller.opcode == "while" else None
            if written and (written, tuple(index)) not in seen:
                # what the body writes, unless it passes the value through unchanged
                passed = _origin_is(instrs, written, index, _param(instrs, written))
                name = caller.operands[0] if passed else written
            elif caller.opcode != "while" and "number" in ins.attrs:
                name = caller.operands[int(ins.attrs["number"])]
            else:
                return ins, copied
        else:
            return ins, copied
    return None, copied


def _jax(ins: _Instruction) -> bool:
    """Whether ``ins`` carries JAX's metadata (an ``op_name`` under ``jit(...)``),
    not none or a name XLA copied onto an op it made (an argument's path on a
    transpose of it, the name of the HLO op an XLA:TPU ``AllocateBuffer`` replaced)."""
    return ins.op_name.startswith("jit(")


def _param(instrs: dict[str, _Instruction], root: str) -> str:
    """The parameter of the computation whose root is ``root``."""
    comp = instrs[root].computation
    return next((i.name for i in instrs.values() if i.computation == comp and i.opcode == "parameter"), "")


def _origin_is(instrs: dict[str, _Instruction], root: str, index: list[int], param: str) -> bool:
    """Whether element ``index`` of the tuple ``root`` is ``param``'s own element (a pass-through)."""
    ins = instrs.get(root)
    if ins is None or ins.opcode != "tuple" or not index:
        return False
    el = instrs.get(ins.operands[index[0]])
    return bool(el and el.opcode == "get-tuple-element" and el.operands[0] == param
                and int(el.attrs.get("index", -1)) == index[0] and len(index) == 1)


def _uncovered(covered: list[tuple[int, int]], start: int, end: int) -> int:
    """Bytes of ``[start, end)`` outside the union of the intervals ``covered``,
    which it then joins."""
    free, pos = 0, start
    for s, e in sorted(covered):
        if s >= end:
            break
        if e > pos:
            free += max(0, s - pos)
            pos = e
    free += max(0, end - pos)
    covered.append((start, end))
    return free


def _shape(layout: str) -> str:
    """``"f32[4,128]{1,0:T(8,128)}"`` -> ``"f32[4,128]"``."""
    return re.sub(r"\{[^}]*\}", "", layout)


def _one(directory: Path, suffix: str) -> Path:
    found = sorted(directory.glob(f"*after_optimizations{suffix}"))
    if not found:
        raise DumpFormatError(f"no *after_optimizations{suffix} in {directory}")
    return found[-1]


def read_dump(directory: str | Path, platform: str = "cpu") -> PeakDump:
    """The values live at the peak of the module XLA dumped to ``directory``,
    compiled for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``: which memory
    spaces are device memory, :func:`device_memory`).

    The values are those of the live-range dump's peak that lie in a buffer
    ``memory_analysis()`` counts, each counted for the bytes no larger value
    live at the peak occupies too. An argument's or output's buffer is held
    for the whole step even where no value in it is live at the peak (a
    donated parameter between its last read and its update; XLA:TPU lends such
    a buffer to temporaries meanwhile): its free bytes are a value of their own,
    the argument (or the output's largest value). So the values and
    :attr:`PeakDump.fragmentation_bytes` add up to the arguments + outputs +
    temporary allocation - aliased bytes, ``memory_analysis()``'s peak where
    its ``temp_size_in_bytes`` is the temporary allocation (CPU, GPU; on a TPU
    see ``reserved`` in :func:`remat._memory.peak_terms`).

    Raises:
      DumpFormatError: a file or section is missing or not as expected.
    """
    directory = Path(directory)
    live_path = _one(directory, "-live-range.txt")
    module = live_path.name.split(".")[1] if live_path.name.count(".") > 1 else live_path.stem
    prefix = live_path.name[: -len("-live-range.txt")]
    hlo_path = directory / f"{prefix}.txt"
    ba_path = directory / f"{prefix}-buffer-assignment.txt"
    for p in (hlo_path, ba_path):
        if not p.exists():
            raise DumpFormatError(f"{p.name} missing beside {live_path.name}")

    peak: list[tuple[str, int]] = []
    in_peak = False
    for line in live_path.read_text().splitlines():
        if _PEAK.match(line):
            in_peak = True
        elif in_peak:
            m = _PEAK_VALUE.match(line)
            if not m:
                break
            peak.append((m[1], int(m[2])))
    if not in_peak:
        raise DumpFormatError(f"no 'Live ranges at N (peak):' section in {live_path.name}")

    shapes: dict[str, str] = {}
    place: dict[str, tuple[int, int, int]] = {}  # value -> (allocation, offset, size)
    counted: dict[int, tuple[int, str]] = {}  # allocation -> (size, entry parameter number or "")
    temp_allocations: set[int] = set()
    allocation = 0
    for line in ba_path.read_text().splitlines():
        if m := _ALLOCATION.match(line):
            allocation, kinds = int(m[1]), m[4]
            if not device_memory(int(m[3] or 0), platform):
                continue
            # what memory_analysis() counts: arguments, outputs, temporaries
            number = a[1] if (a := re.match(r", parameter (\d+)", kinds)) else ""
            if "preallocated-temp" in kinds:
                temp_allocations.add(allocation)
            if number or "preallocated-temp" in kinds or "maybe-live-out" in kinds:
                counted[allocation] = (int(m[2]), number)
        elif m := _VALUE.match(line):
            name = m[1] if "{" in m[1] else m[1] + "{}"
            shapes[name] = m[4]
            place[name] = (allocation, int(m[3]), int(m[2]))
    if not shapes:
        raise DumpFormatError(f"no ' value: <...>' lines in {ba_path.name}")
    instrs, entry, roots = _parse_hlo(hlo_path.read_text())
    callers = {}
    for ins in instrs.values():
        for k in ("body", "condition", "calls", "to_apply"):
            if k in ins.attrs:
                callers.setdefault(ins.attrs[k], ins)

    def is_argument(ins: _Instruction) -> bool:
        return ins.opcode == "parameter" and ins.computation == entry

    mates: dict[tuple[int, int, int, str], list[str]] = {}  # values that share one buffer
    for name, (a, offset, n) in place.items():
        mates.setdefault((a, offset, n, _shape(shapes[name])), []).append(name)

    def value_at(value: str, size: int, space: int = 0) -> LiveValue:
        origin, copied = _origin(instrs, entry, roots, callers, value)
        if value in place and not (origin and (origin.op_name.startswith("jit(") or is_argument(origin))):
            # no JAX metadata (e.g. XLA:TPU's AllocateBuffer custom-call that
            # reserves a scan's stacked outputs): the op that writes the same buffer
            for mate in mates[(*place[value], _shape(shapes[value]))]:
                o, c = _origin(instrs, entry, roots, callers, mate)
                if o and o.op_name.startswith("jit("):
                    origin, copied = o, c
                    break
        argument = origin.name if origin and is_argument(origin) else ""
        return LiveValue(value=value, size_bytes=size, shape=_shape(shapes.get(value, "")),
                         parameter="" if copied else argument, copy_of=argument if copied else "",
                         op_name=origin.op_name if origin else "", source=origin.source if origin else "",
                         memory_space=space, in_temp=value in place and place[value][0] in temp_allocations)

    live = []
    covered: dict[int, list[tuple[int, int]]] = {}
    for value, size in sorted(peak, key=lambda p: -p[1]):
        space = int(s[1]) if (s := re.search(r"S\((\d+)\)", shapes.get(value, ""))) else 0
        if value in place:
            a, start, n = place[value]
            if a not in counted and space != HOST_MEMORY_SPACE:
                continue  # on-chip (a TPU's VMEM, SMEM, ...), a constant or thread-local: not in the peak
            size = _uncovered(covered.setdefault(a, []), start, start + n)  # bytes no larger value holds
            if not size:
                continue
        live.append(value_at(value, size, space))
    # An argument's or output's buffer is held all step, even where no value in
    # it is live at the peak (a parameter donated and updated in place, between
    # its last read and its update): its free bytes count as that argument (or
    # as the output's largest value).
    params = {ins.attrs["number"]: ins.name for ins in instrs.values() if is_argument(ins)}
    largest: dict[int, str] = {}
    for name, (a, _, n) in place.items():
        if n > place.get(largest.get(a, ""), (0, 0, -1))[2]:
            largest[a] = name
    for a, (size, number) in counted.items():
        if a not in temp_allocations and (free := _uncovered(covered.setdefault(a, []), 0, size)):
            live.append(value_at(f"{params[number]}{{}}" if number in params else largest.get(a, ""), free))
    live.sort(key=lambda v: -v.size_bytes)
    temp_bytes = sum(counted[a][0] for a in temp_allocations)
    return PeakDump(module=module, live=tuple(live), peak_live_bytes=sum(s for _, s in peak),
                    temp_allocation_bytes=temp_bytes)
