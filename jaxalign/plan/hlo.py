"""What a compiled program costs, read from its optimised HLO: flops and bytes with loops counted,
and the collectives it runs.

    cost = hlo.program_cost(compiled.as_text(), compiled.cost_analysis(), num_devices)
    cost.flops, cost.bytes_accessed          # per device, every loop iteration counted
    cost.collectives                         # [Collective(kind, bytes per device, count)]

XLA's cost analysis (`compiled.cost_analysis()`) counts the body of a `while` loop once: the layer
scan of a 32-layer model and the decode loop of a sampler would count as one layer / one token.
Here every computation's cost is multiplied by how often it runs: the trip count of a loop is read
from its condition (`counter < N` against a constant, the form `lax.scan` / `fori_loop` and XLA's
windowed einsums lower to; for a loop that can stop early, such as a decode loop until EOS, the
bound N: an upper bound). A loop body's own cost comes from XLA's HloCostAnalysis of a module
whose entry is that body (the optimised text re-parsed; analysed with the host CPU client, which
gives the same flops as the TPU's analysis on the whole module).

XLA's "bytes accessed" counts every operand and output of every fusion in full, including operands
the TPU keeps in on-chip memory (layouts with S(1)) and whole stacked [L, ...] buffers of which a
loop iteration reads or writes one layer. `hbm_bytes` is this module's estimate of HBM traffic
instead: per instruction outside fusions, the bytes of its operands and outputs that live in HBM
(memory space 0), a fusion parameter read only through dynamic-slice counted as the slices, an
in-place dynamic-update-slice as its update, async starts once; times how often the computation runs.

Collectives (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, sync or async)
are listed with the bytes each device receives: all-gather S(n-1)/n of its output S, reduce-scatter
S(n-1) of its output, all-reduce 2S(n-1)/n (ring), all-to-all S(n-1)/n, collective-permute S.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
                "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(ENTRY )?%([^\s(]+) \(", re.M)
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective of a program: bytes each device receives in total, and how many run."""

    kind: str
    bytes: float
    count: int


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per-device cost of one execution of a compiled program, loops counted."""

    flops: float
    transcendentals: float
    bytes_accessed: float  # XLA's HloCostAnalysis, loops counted
    hbm_bytes: float  # this module's estimate of HBM traffic (see the module docstring)
    collectives: tuple[Collective, ...]
    loop_trip_counts: tuple[int, ...]  # of every while loop, outermost first

    @property
    def collective_bytes(self) -> float:
        return sum(c.bytes for c in self.collectives)


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (an array or a tuple of arrays), layouts ignored."""
    return sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", shape)))


def hbm_shape_bytes(shape: str) -> float:
    """Bytes of the arrays of an HLO shape string that live in HBM (no memory space S(n), n > 0)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        space = re.search(r"S\((\d+)\)", layout or "")
        if space is None or space.group(1) == "0":
            total += _DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class _Instruction:
    root: bool
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes


def _operands(inst: _Instruction) -> list[str]:
    """The names of an instruction's operands."""
    return re.findall(r"%([^\s,)]+)", inst.rest.split(")")[0])


class _Module:
    """An optimised HLO module's text split into computations and instructions."""

    def __init__(self, text: str):
        starts = [(m.start(), m.group(2), bool(m.group(1))) for m in _COMPUTATION.finditer(text)]
        if not starts:
            raise ValueError("no computation in the HLO text")
        self.preamble = text[: starts[0][0]]
        self.blocks: dict[str, str] = {}
        self.entry = ""
        for index, (start, name, is_entry) in enumerate(starts):
            end = starts[index + 1][0] if index + 1 < len(starts) else len(text)
            self.blocks[name] = text[start:end].rstrip() + "\n"
            if is_entry:
                self.entry = name
        self.instructions = {name: self._parse(block) for name, block in self.blocks.items()}

    @staticmethod
    def _parse(block: str) -> list[_Instruction]:
        out = []
        for line in block.splitlines()[1:]:
            match = _INSTRUCTION.match(line)
            if match:
                root, *rest = match.groups()
                out.append(_Instruction(bool(root), *rest))
        return out

    def called(self, inst: _Instruction) -> list[tuple[str, str]]:
        """(role, computation) pairs an instruction calls: body / condition / calls / ... / branch."""
        pairs = [(role, name) for role, name in _CALLED.findall(inst.rest) if name in self.blocks]
        for group in _BRANCHES.findall(inst.rest):
            pairs += [("branch", name.strip().lstrip("%")) for name in group.split(",") if name.strip()]
        return pairs

    def trip_count(self, computation: str, inst: _Instruction) -> int:
        """Iterations of the while `inst` in `computation`: its condition's `counter < N` against a
        constant, from the counter's start (a constant of the init tuple, else 0) in steps of the
        constant the body adds to it (XLA unrolls windowed-einsum loops: counter += 2)."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.rest)
        if known:
            return int(known.group(1))
        called = dict(self.called(inst))
        condition, body = called.get("condition", ""), called.get("body", "")
        by_name = {i.name: i for i in self.instructions.get(condition, [])}
        best = None
        for i in self.instructions.get(condition, []):
            operands = _operands(i)
            direction = re.search(r"direction=(\w+)", i.rest)
            if i.opcode != "compare" or len(operands) != 2 or direction is None:
                continue
            counter, limit = (by_name.get(name) for name in operands)
            bound = _constant_value(limit) if limit is not None and limit.opcode == "constant" else None
            if bound is None or direction.group(1) not in ("LT", "LE"):
                continue
            count = bound + (1 if direction.group(1) == "LE" else 0)
            index = re.search(r"index=(\d+)", counter.rest) if counter is not None and \
                counter.opcode == "get-tuple-element" else None
            step = 1
            if index is not None:
                count -= self._init_constant(computation, inst, int(index.group(1))) or 0
                step = self._counter_step(body, int(index.group(1)))
            count = -(-count // step)
            best = count if best is None else max(best, count)
        return max(int(best), 1) if best is not None else 1

    def _counter_step(self, body: str, index: int) -> int:
        """The constant the loop body adds to tuple element `index` (1 when not found)."""
        instructions = self.instructions.get(body, [])
        by_name = {i.name: i for i in instructions}
        root = next((i for i in instructions if i.root), None)
        operands = _operands(root) if root is not None and root.opcode == "tuple" else []
        update = by_name.get(operands[index]) if index < len(operands) else None
        if update is None or update.opcode != "add":
            return 1
        for name in _operands(update):
            source = by_name.get(name)
            if source is not None and source.opcode == "constant":
                value = _constant_value(source)
                return value if value and value > 0 else 1
        return 1

    def _init_constant(self, computation: str, inst: _Instruction, index: int) -> int | None:
        """The constant at `index` of the tuple a while starts from, if it is one."""
        by_name = {i.name: i for i in self.instructions[computation]}
        init = _operands(inst)
        tuple_inst = by_name.get(init[0]) if init else None
        if tuple_inst is None or tuple_inst.opcode != "tuple":
            return None
        operands = _operands(tuple_inst)
        source = by_name.get(operands[index]) if index < len(operands) else None
        return _constant_value(source) if source is not None and source.opcode == "constant" else None

    def hbm_traffic(self, name: str) -> float:
        """Estimated HBM bytes one run of computation `name` moves, not counting what it calls."""
        shapes = {i.name: i.shape for i in self.instructions[name]}
        total = 0.0
        for inst in self.instructions[name]:
            if inst.opcode in _NO_TRAFFIC or inst.opcode.endswith("-done"):
                continue
            if inst.opcode.endswith("-start"):  # (operands..., results..., context): each buffer once
                total += hbm_shape_bytes(inst.shape)
                continue
            out = hbm_shape_bytes(inst.shape)
            operands = [hbm_shape_bytes(shapes.get(o, "")) for o in _operands(inst)]
            if inst.opcode == "fusion":
                out = self._fusion_traffic(inst, operands, out)
            elif inst.opcode == "dynamic-slice" and operands:
                operands[0] = out
            elif inst.opcode == "dynamic-update-slice" and len(operands) > 1:
                operands[0], out = 0.0, operands[1]
            total += out + sum(operands)
        return total

    def _fusion_traffic(self, inst: _Instruction, operands: list[float], out: float) -> float:
        """Adjusts a fusion's operand bytes in place (parameters read only through dynamic-slice: the
        slices; the buffer an in-place dynamic-update-slice root writes into: nothing) -> its output bytes."""
        body = self.instructions.get(dict(self.called(inst)).get("calls", ""), [])
        params = {i.name: int(re.match(r"\s*(\d+)\)", i.rest).group(1)) for i in body if i.opcode == "parameter"}
        users: dict[str, list[tuple[_Instruction, int]]] = {}
        for i in body:
            for k, name in enumerate(_operands(i)):
                users.setdefault(name, []).append((i, k))
        for name, index in params.items():
            used = users.get(name, [])
            if index < len(operands) and operands[index] and used and all(
                    u.opcode == "dynamic-slice" and k == 0 for u, k in used):
                operands[index] = sum(shape_bytes(u.shape) for u, _ in used)
        root = next((i for i in body if i.root), None)
        if root is not None and root.opcode == "dynamic-update-slice":
            target, update = (_operands(root) + ["", ""])[:2]
            if target in params and params[target] < len(operands):
                operands[params[target]] = 0.0
            update_inst = next((i for i in body if i.name == update), None)
            return shape_bytes(update_inst.shape) if update_inst is not None else out
        return out

    def with_entry(self, name: str) -> str:
        """The module's text with computation `name` as its entry."""
        parts = ["HloModule sub\n", self.preamble.split("\n", 1)[1] if "\n" in self.preamble else ""]
        for block_name, block in self.blocks.items():
            block = block[len("ENTRY "):] if block.startswith("ENTRY ") else block
            parts.append(("ENTRY " if block_name == name else "") + block + "\n")
        return "".join(parts)


def _constant_value(inst: _Instruction) -> int | None:
    match = re.match(r"\s*(-?\d+)\)", inst.rest)
    return int(match.group(1)) if match else None


def _group_size(inst: _Instruction, num_devices: int) -> int:
    """Devices in one replica group of a collective."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", inst.rest)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", inst.rest)
    if listed:
        return len([x for x in listed.group(1).split(",") if x])
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", inst.rest)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        names = re.findall(r"'([^']+)'", mesh.group(2))
        return math.prod(int(sizes[n]) for n in names if n in sizes) or num_devices
    return num_devices


def _received_bytes(inst: _Instruction, kind: str, num_devices: int) -> float:
    """Bytes one device receives in one run of the collective `inst` (see the module docstring)."""
    shape = inst.shape
    if inst.opcode.endswith("-start") and shape.startswith("("):
        arrays = _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", shape))
        # async starts return (operands..., results..., scratch): take the result half of the arrays
        big = [a for a in arrays if a[0] not in ("u32", "s32") or a[1]]
        half = big[len(big) // 2:] if len(big) > 1 else big
        size = sum(_DTYPE_BYTES.get(d, 0) * math.prod(int(x) for x in dims.split(",") if x) for d, dims in half)
    else:
        size = shape_bytes(shape)
    n = max(_group_size(inst, num_devices), 1)
    if kind == "all-gather" or kind == "all-to-all":
        return size * (n - 1) / n
    if kind == "reduce-scatter":
        return size * (n - 1)
    if kind == "all-reduce":
        return 2 * size * (n - 1) / n
    return size  # collective-permute


def program_cost(hlo_text: str, compiled_cost: dict | None, num_devices: int) -> ProgramCost:
    """The per-device cost of one run of the optimised HLO module `hlo_text` (compiled.as_text()),
    loops counted; compiled_cost: compiled.cost_analysis() (the TPU's analysis of the whole
    module, loops counted once), to which the loop iterations beyond the first are added."""
    module = _Module(hlo_text)
    analyse = functools.cache(lambda name: _analysis(module, name))

    @functools.cache
    def total(name: str) -> tuple[float, float, float]:
        """(flops, transcendentals, bytes) of one run of computation `name`, loops counted."""
        base = analyse(name)
        extra = [0.0, 0.0, 0.0]
        for computation in _reachable_without_loops(module, name):
            for inst in module.instructions[computation]:
                if inst.opcode != "while":
                    continue
                body = dict(module.called(inst)).get("body")
                trips = module.trip_count(computation, inst)
                once, full = analyse(body), total(body)
                for k in range(3):
                    extra[k] += trips * full[k] - once[k]
        return tuple(b + e for b, e in zip(base, extra))

    entry_once = analyse(module.entry)
    entry_full = total(module.entry)
    compiled = compiled_cost or {}
    flops = float(compiled.get("flops", entry_once[0])) + entry_full[0] - entry_once[0]
    trans = float(compiled.get("transcendentals", entry_once[1])) + entry_full[1] - entry_once[1]
    nbytes = float(compiled.get("bytes accessed", entry_once[2])) + entry_full[2] - entry_once[2]

    counts = _multiplicities(module)
    fused = {callee for instructions in module.instructions.values() for inst in instructions
             if inst.opcode not in ("call", "while", "conditional")
             for role, callee in module.called(inst) if role in ("calls", "to_apply")}
    traffic = sum(times * module.hbm_traffic(name) for name, times in counts.items() if name not in fused)
    found: dict[str, list[float]] = {}
    trips = []
    for computation, times in counts.items():
        for inst in module.instructions[computation]:
            if inst.opcode == "while":
                trips.append(module.trip_count(computation, inst))
            kind = inst.opcode[: -len("-start")] if inst.opcode.endswith("-start") else inst.opcode
            if kind in COLLECTIVES:
                entry = found.setdefault(kind, [0.0, 0])
                entry[0] += times * _received_bytes(inst, kind, num_devices)
                entry[1] += times
    collectives = tuple(Collective(kind, value[0], int(value[1])) for kind, value in sorted(found.items()))
    return ProgramCost(flops=flops, transcendentals=trans, bytes_accessed=nbytes, hbm_bytes=traffic,
                       collectives=collectives, loop_trip_counts=tuple(trips))


def _analysis(module: _Module, name: str) -> tuple[float, float, float]:
    """XLA's HloCostAnalysis of computation `name` run once (its loops' bodies counted once)."""
    import jax
    from jax._src.lib import _jax, xla_client

    text = re.sub(r",? stack_frame_id=\d+", "", module.with_entry(name))
    parsed = xla_client.hlo.hlo_module_from_text(text)
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, parsed)
    return (float(cost.get("flops", 0.0)), float(cost.get("transcendentals", 0.0)),
            float(cost.get("bytes accessed", 0.0)))


def _reachable_without_loops(module: _Module, name: str) -> list[str]:
    """`name` and the computations it calls (calls, branches, ...), not entering loop bodies."""
    seen, stack = [], [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.append(current)
        for inst in module.instructions[current]:
            if inst.opcode == "while":
                continue
            stack += [callee for role, callee in module.called(inst) if role in ("calls", "branch",
                                                                                 "true_computation",
                                                                                 "false_computation")]
    return seen


def _multiplicities(module: _Module) -> dict[str, float]:
    """How many times each computation runs per execution of the entry (loop bodies x trip count):
    callers before callees (a computation called from several places adds up its callers' counts)."""
    edges: dict[str, list[tuple[str, float]]] = {}
    for name, instructions in module.instructions.items():
        out = []
        for inst in instructions:
            trips = module.trip_count(name, inst) if inst.opcode == "while" else 1
            out += [(callee, trips if role in ("body", "condition") else 1)
                    for role, callee in module.called(inst) if role != "to_apply"]  # scalar reducers: no cost
        edges[name] = out
    order, seen = [], set()

    def visit(name: str) -> None:  # depth-first post-order; iterative to survive deep nesting
        stack = [(name, iter(edges.get(name, [])))]
        seen.add(name)
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                order.append(current)
                stack.pop()
            elif child[0] not in seen:
                seen.add(child[0])
                stack.append((child[0], iter(edges.get(child[0], []))))

    visit(module.entry)
    counts = dict.fromkeys(order, 0.0)
    counts[module.entry] = 1.0
    for name in reversed(order):  # callers first
        for callee, factor in edges.get(name, []):
            counts[callee] += counts[name] * factor
    return counts
