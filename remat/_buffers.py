"""What is live at a compiled step's memory peak, read from XLA's dump.

XLA writes its buffer assignment when compiled with ``xla_dump_to=DIR``
(``lowered.compile(compiler_options={"xla_dump_to": DIR})``), next to the
optimized HLO module:

- ``*after_optimizations-live-range.txt``: the schedule's live ranges and,
  under ``Live ranges at N (peak):``, every HLO value live at the peak with its
  size in bytes;
- ``*after_optimizations-buffer-assignment.txt``: each value's shape and
  layout (``S(5)`` in a layout is host memory);
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

_compat.hide_frames(__file__)

__all__ = ["DumpFormatError", "LiveValue", "PeakDump", "read_dump"]

HOST_MEMORY_SPACE = 5
"""XLA's memory space of ``pinned_host`` buffers (``S(5)`` in a layout)."""


class DumpFormatError(Exception):
    """The dump is missing a file or section this reader expects (XLA changed
    its format, or the backend writes none)."""


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
      memory_space: 0 for device memory, 5 for host (``pinned_host``).
      in_temp: the value lies in the step's temporary allocation (XLA's
        ``preallocated-temp``), not in an argument's or output's buffer.
    """

    value: str
    size_bytes: int
    shape: str
    parameter: str
    op_name: str
    source: str
    memory_space: int = 0
    in_temp: bool = False


@dataclasses.dataclass(frozen=True)
class PeakDump:
    """The values live at the peak of one compiled module.

    Attributes:
      module: the HLO module's name, e.g. ``jit_step``.
      live: the values live at the peak, largest first.
      peak_live_bytes: their total size in bytes, as XLA's live-range dump states it.
      temp_allocation_bytes: the size of the temporary allocation (the heap
        the values in it are packed into), bytes.
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
_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)")
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


def _origin(instrs: dict[str, _Instruction], entry: str, roots: dict[str, str],
            callers: dict[str, _Instruction], value: str) -> tuple[_Instruction | None, bool]:
    """The instruction that makes ``value`` (``name{i,j}``), looking through
    tuples, get-tuple-element, loop-carried values (to what the loop body
    writes, or to the loop's input where the body passes the value through),
    bitcasts, and copies or conversions XLA added (no metadata of their own);
    and whether the value is such a copy (a buffer of its own)."""
    m = re.match(r"^(.*?)\{([\d,]*)\}$", value)
    name, index = (m[1], [int(i) for i in m[2].split(",") if i]) if m else (value, [])
    seen: set[tuple[str, tuple[int, ...]]] = set()
    copied = False
    while name in instrs:
        key = (name, tuple(index))
        ins = instrs[name]
        if key in seen:
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
        elif not ins.op_name and "calls" in ins.attrs and ins.attrs["calls"] in roots:
            inner = instrs[roots[ins.attrs["calls"]]]  # a fusion: its root op's metadata
            if inner.op_name:
                return dataclasses.replace(inner, name=ins.name, opcode=ins.opcode), copied
            name, copied = (ins.operands[0], True) if ins.operands else (name, copied)
        elif not ins.op_name and ins.operands and op not in ("parameter", "constant"):
            name, copied = ins.operands[0], True  # e.g. a copy or convert XLA added: what it copies
        elif op == "parameter" and ins.computation != entry and ins.computation in callers:
            caller = callers[ins.computation]
            written = roots.get(ins.computation)
            if caller.opcode == "while" and written and (written, tuple(index)) not in seen:
                # what the body writes, unless it passes the value through unchanged
                passed = _origin_is(instrs, written, index, name)
                name = caller.operands[0] if passed else written
            elif caller.opcode != "while" and "number" in ins.attrs:
                name = caller.operands[int(ins.attrs["number"])]
            else:
                return ins, copied
        else:
            return ins, copied
    return None, copied


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


def _one(directory: Path, suffix: str) -> Path:
    found = sorted(directory.glob(f"*after_optimizations{suffix}"))
    if not found:
        raise DumpFormatError(f"no *after_optimizations{suffix} in {directory}")
    return found[-1]


def read_dump(directory: str | Path) -> PeakDump:
    """The values live at the peak of the module XLA dumped to ``directory``.

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
    temp_allocations: set[int] = set()
    temp_bytes = allocation = 0
    for line in ba_path.read_text().splitlines():
        if m := _ALLOCATION.match(line):
            allocation = int(m[1])
            if "preallocated-temp" in line:
                temp_allocations.add(allocation)
                temp_bytes += int(m[2])
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

    live = []
    covered: dict[int, list[tuple[int, int]]] = {}
    for value, size in sorted(peak, key=lambda p: -p[1]):
        if value in place:  # count only the bytes no larger live value occupies
            a, start, n = place[value]
            size = _uncovered(covered.setdefault(a, []), start, start + n)
            if not size:
                continue
        layout = shapes.get(value, "")
        space = re.search(r"S\((\d+)\)", layout)
        origin, copied = _origin(instrs, entry, roots, callers, value)
        argument = origin is not None and origin.opcode == "parameter" and origin.computation == entry
        param = origin.name if argument and not copied else ""
        live.append(LiveValue(value=value, size_bytes=size, shape=re.sub(r"\{[^}]*\}", "", layout),
                              parameter=param, op_name=origin.op_name if origin else "",
                              source=origin.source if origin else "",
                              memory_space=int(space[1]) if space else 0,
                              in_temp=value in place and place[value][0] in temp_allocations))
    live.sort(key=lambda v: -v.size_bytes)
    return PeakDump(module=module, live=tuple(live), peak_live_bytes=sum(s for _, s in peak),
                    temp_allocation_bytes=temp_bytes)
