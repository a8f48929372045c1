"""Ahead-of-time H100 (sm_90a) builds of Triton kernel launches, with no GPU: record the launches a launcher
makes on meta tensors, specialise each as Triton's JIT would (ints == 1, multiples of 16, aligned pointers),
compile, and read what the card would run: shared memory per program, ptxas's registers and spill bytes, and
the SASS of each loop body (instructions per iteration, tensor-core HMMA / HGMMA (wgmma) among them).

Used by `attention_train.py --sm90` (the trainable kernel's shared-memory check) and `decode_sass.py` (the
decode kernels' instruction budget per key), and by tests/test_kernel_attn_train.py.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile


def record_launches(run, module=None) -> list:
    """The kernel launches `run()` makes through `module`'s kernels (default: `sparse_attn_train`), recorded
    instead of run: [(kernel, args, kwargs)]. Give it meta tensors (nothing is allocated, no device needed)."""
    import triton

    if module is None:
        from dsv4.kernels import sparse_attn_train as module
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.kernel, a, kw))

    real = {n: v for n, v in vars(module).items() if isinstance(v, triton.runtime.JITFunction)}
    try:
        for n, kernel in real.items():
            setattr(module, n, Recorder(kernel))
        run()
    finally:
        for n, kernel in real.items():
            setattr(module, n, kernel)
    return launches


def sm90_source(kernel, args: tuple, kwargs: dict):
    """(ASTSource, options) of one recorded launch, specialised by the JIT's own rule (ints == 1 become
    constants; ints and pointers divisible by 16 carry that hint, which lets loads vectorise and pipeline:
    without the hints the shared memory comes out far smaller than on the GPU)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import native_specialize_impl

    backend = make_backend(GPUTarget("cuda", 90, 32))
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in options}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        spec = ("constexpr", None) if i in kernel.constexprs else \
            native_specialize_impl(backend, bound[name], False, True, True)
        signature[name] = spec[0]
        if spec[0] == "constexpr":
            constexprs[name] = bound[name]
        elif isinstance(spec[1], str):
            attrs[(i,)] = backend.parse_attr(spec[1])
    return ASTSource(kernel, signature, constexprs, attrs), options


def compile_sm90(launches: list, spills: bool = False, sass: bool = False) -> list[dict]:
    """Compile each distinct recorded launch for sm_90a: its shared memory per program and, with `spills`,
    ptxas's registers and spill bytes (a second ptxas pass over the PTX); with `sass`, each loop body's
    instruction count and op histogram (`sass_loops`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    out, seen = [], set()
    for kernel, args, kwargs in launches:
        src, options = sm90_source(kernel, args, kwargs)
        key = (src.hash(), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        consts = {kernel.arg_names[i]: v for (i,), v in src.constants.items()}
        rec = dict(kernel=kernel.__name__, shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                   num_stages=compiled.metadata.num_stages,
                   constexprs={k: v for k, v in consts.items() if k not in ("D", "BLOCK_D")})
        if spills:
            log = _run_tool("ptxas", "-v", "--gpu-name=sm_90a", "{path}", "-o", "/dev/null", text=compiled.asm["ptx"],
                            suffix=".ptx")
            rec["registers"] = int(re.search(r"Used (\d+) registers", log).group(1))
            rec["spill_bytes"] = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        if sass:
            rec["loops"] = sass_loops(_run_tool("nvdisasm", "-c", "{path}", data=compiled.asm["cubin"]))
        out.append(rec)
    return out




def _run_tool(name: str, *args: str, text: str | None = None, data: bytes | None = None, suffix: str = ".cubin") -> str:
    """Run one of Triton's bundled CUDA tools (ptxas, nvdisasm) on `text` / `data` written to a temporary file
    ("{path}" in args); its stdout + stderr."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the bundled build that reads Triton's PTX version (e.g. ptxas-blackwell)
    tool = ptxas if name == "ptxas" else os.path.join(os.path.dirname(ptxas), name)
    with tempfile.NamedTemporaryFile("wb", suffix=suffix) as f:
        f.write(data if data is not None else text.encode())
        f.flush()
        run = subprocess.run([tool, *[a.replace("{path}", f.name) for a in args]], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{name} failed: {run.stderr[-2000:]}")
    return run.stdout + run.stderr


def sass_loops(sass: str, top: int = 12) -> list[dict]:
    """Each loop of a SASS listing (a backward branch to a label): its body's instruction count, MMAs (HMMA,
    and HGMMA: Hopper's warpgroup MMA), and the
    `top` most frequent ops. Static counts: one iteration's instructions per warp, not timings."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        if m := re.match(r"^\.(L_x_\d+):", line.strip()):
            labels[m.group(1)] = len(instrs)
        elif m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            instrs.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)))  # predicate dropped
    loops = []
    for i, ins in enumerate(instrs):
        m = re.search(r"BRA(?:\.\w+)?\s+`\(\.(L_x_\d+)\)", ins)
        if m and labels.get(m.group(1), i + 1) < i:
            ops = collections.Counter(b.split()[0].split(".")[0] for b in instrs[labels[m.group(1)]:i + 1])
            loops.append(dict(instructions=sum(ops.values()), mma=ops["HMMA"] + ops["HGMMA"], ops=dict(ops.most_common(top))))
    return loops
