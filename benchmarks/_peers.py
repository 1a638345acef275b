"""The peers a user would pick instead of ditq: dynamic int8 linears from torch (fbgemm) and onnxruntime.

Each builder is called once with a float layer or model and returns a plain callable that takes the
same float torch input as ditq's op (a linear's ``x``, or a model step's ``x, t, y``) and returns a
float torch tensor; the conversions in and out of the peer's own format are part of the call. The
callable carries what the benchmarks report about it in ``fn.info`` (backend, weight bytes, settings).

* ``fbgemm_linear`` / ``fbgemm_model``: ``torch.ao`` dynamic quantization (qint8 per-channel weights
  for the single layer, per-tensor for ``quantize_dynamic`` of a model, as its default qconfig; uint8
  per-tensor activations quantized by the op at run time, with ``reduce_range``: 7 bits), engine
  fbgemm.
* ``onnxruntime_linear`` / ``onnxruntime_model``: an ONNX graph of the float layer or model,
  quantized by ``onnxruntime.quantization.quantize_dynamic`` (int8 per-channel weights, uint8
  per-tensor activations: DynamicQuantizeLinear + MatMulInteger, which onnxruntime fuses into
  DynamicQuantizeMatMul), run by an ``InferenceSession`` on the CPUExecutionProvider.

A peer that cannot be built here raises :class:`PeerUnavailable` with a one-line reason, which the
benchmarks print as a note instead of the row.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

INSTALL_HINT = "pip install 'ditq[bench]'"
# onnxruntime's graph ops that carry the integer work, and the float GEMMs left beside them
ORT_INT_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLinear")
ORT_FLOAT_GEMMS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")
ORT_OPSET = 17


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; ``str(exc)`` is one line saying why (and what to install)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- torch fbgemm
@contextlib.contextmanager
def _fbgemm_engine():
    """Prepack with the fbgemm engine (the packed weights keep it; the engine is restored after)."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines:
        raise PeerUnavailable(f"torch {torch.__version__} has no fbgemm engine (has {', '.join(engines)})")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():  # torch.ao's quantized modules are deprecated, still the baseline
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = before


def fbgemm_linear(w: torch.Tensor, b: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's dynamic int8 ``Linear`` of the float weight ``w`` (N, K) and bias ``b``: symmetric
    per-channel qint8 weights (max-abs scales), activations quantized by the op itself."""
    n, k = w.shape
    w = w.detach().float().cpu()
    ws = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zeros = torch.zeros(n, dtype=torch.long)
    with _fbgemm_engine():
        lin = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=b is not None, dtype=torch.qint8)
        qw = torch.quantize_per_channel(w, ws, zeros, 0, torch.qint8)
        lin.set_weight_bias(qw, None if b is None else b.detach().float().cpu())

    def fn(x: torch.Tensor) -> torch.Tensor:
        return lin(x)

    fn.info = {
        "backend": "fbgemm (torch.ao dynamic Linear, s8 per-channel weights, u8 7-bit per-tensor acts)",
        "weight_bytes": n * k + 8 * n,  # codes + float scale and int32 zero point per channel
        "per_channel": True,
    }
    return fn


def _timestep_mlp_linears(model: nn.Module) -> list[str]:
    """Names of the linears inside ditq's timestep embedders."""
    from ditq.models.layers import TimestepEmbedder

    return [
        f"{name}.{sub}"
        for name, m in model.named_modules()
        if isinstance(m, TimestepEmbedder)
        for sub, c in m.named_modules()
        if isinstance(c, nn.Linear)
    ]


def fbgemm_model(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``torch.ao.quantization.quantize_dynamic`` of a copy of ``model``: every ``nn.Linear`` becomes
    fbgemm's dynamic int8 linear (its default qconfig: per-tensor qint8 weights)."""
    with _fbgemm_engine():
        float_copy = copy.deepcopy(model).float().cpu().eval()
        # {nn.Linear} with qint8, as ``quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)``, but the
        # timestep embedder's MLP stays float: it reads its first linear's ``weight.dtype``, which
        # torch's dynamic Linear has not (a method there), and it only sees the batch's N rows
        kept = _timestep_mlp_linears(float_copy)
        spec = {nn.Linear: torch.ao.quantization.default_dynamic_qconfig, **dict.fromkeys(kept)}
        q = torch.ao.quantization.quantize_dynamic(float_copy, spec, dtype=torch.qint8)
    dyn = torch.ao.nn.quantized.dynamic.Linear
    layers = [m for m in q.modules() if isinstance(m, dyn)]
    # codes, a float scale and an int32 zero point per channel (or per tensor), the float bias
    wbytes = sum(
        m.weight().numel()
        + 8 * (m.out_features if m.weight().qscheme() == torch.per_channel_affine else 1)
        + 4 * m.out_features
        for m in layers
    )
    seen, rest = set(), 0  # the float parameters and buffers left (embedders, norms, ...)
    for t in [*q.parameters(), *q.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            rest += t.numel() * t.element_size()
    schemes = {str(m.weight().qscheme()).replace("torch.", "") for m in layers}

    def fn(*args, **kwargs) -> torch.Tensor:
        return q(*args, **kwargs)

    fn.info = {
        "backend": f"fbgemm (torch.ao quantize_dynamic, {'/'.join(sorted(schemes))} s8 weights, "
        "u8 7-bit per-tensor acts)",
        "weight_bytes": wbytes + rest,
        "file_bytes": None,
        "kernels": {"fbgemm dynamic int8 Linear": len(layers), "float Linear (timestep MLP)": len(kept)},
        "per_channel": schemes == {"per_channel_affine"},
    }
    fn.module = q
    return fn


# ----------------------------------------------------------------------------- onnxruntime
def _import_ort():
    try:
        import onnx
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # the bench extra is not installed
        missing = getattr(exc, "name", None) or "onnxruntime"
        raise PeerUnavailable(f"{missing.split('.')[0]} not installed: {INSTALL_HINT}") from None
    return onnx, onnxruntime, quantize_dynamic, QuantType


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer warns through the root logger; hold back its warnings meanwhile."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def _quantize(src: str, dst: str, per_channel: bool, large: bool) -> None:
    """quantize_dynamic ``src`` into ``dst``: int8 weights (per channel or per tensor); only MatMuls with
    a constant weight (no attention matmuls, no convolutions, as the other rows)."""
    _, _, quantize_dynamic, QuantType = _import_ort()
    with _quiet_root_logger():  # "Please consider to run pre-processing before quantization"
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            use_external_data_format=large,
            extra_options={"MatMulConstBOnly": True},
        )


def _quantized_session(src: str, tmp: str, threads: int, feeds: dict, large: bool):
    """Quantize ``src`` per channel and open it in a session that runs ``feeds``; where that fails,
    per tensor. Returns (session, quantized path, optimized path, per_channel, why not per channel)."""
    why = None
    for per_channel in (True, False):
        tag = "pc" if per_channel else "pt"
        dst, opt = os.path.join(tmp, f"int8_{tag}.onnx"), os.path.join(tmp, f"opt_{tag}.onnx")
        try:
            _quantize(src, dst, per_channel, large)
            sess = _session(dst, threads, opt)
            sess.run(None, feeds)
            return sess, dst, opt, per_channel, why
        except Exception as exc:  # noqa: BLE001 - per tensor is the fallback; the reason is kept
            why = _one_line(exc)
    raise PeerUnavailable(f"onnxruntime dynamic int8 failed: {why}")


def _session(path: str, threads: int, optimized: str):
    """An InferenceSession on the CPU provider with ``threads`` intra-op threads and one inter-op;
    the optimized graph is written to ``optimized`` (to report the ops it runs)."""
    _, ort, _, _ = _import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # no warning about serializing the optimized graph
    so.optimized_model_filepath = optimized
    # an idle thread pool must not spin into the rows timed next to this one
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _graph_facts(quantized: str, optimized: str, skip: set[str]) -> dict:
    """Weight bytes held by the quantized graph's initializers (less ``skip``) and the op counts of
    the graph onnxruntime runs."""
    onnx, _, _, _ = _import_ort()
    q = onnx.load(quantized, load_external_data=False)
    nbytes = 0
    for init in q.graph.initializer:
        if init.name in skip:
            continue
        n = 1
        for d in init.dims:
            n *= d
        nbytes += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    ops: Counter = Counter()
    with contextlib.suppress(Exception):  # the counts are informative only
        for node in onnx.load(optimized, load_external_data=False).graph.node:
            if node.op_type in ORT_INT_OPS or node.op_type in ORT_FLOAT_GEMMS:
                ops[node.op_type + ("" if node.op_type in ORT_INT_OPS else " (float)")] += 1
    return {"weight_bytes": nbytes, "kernels": dict(ops)}


def _numpy(x: torch.Tensor):
    """The float32 numpy view of ``x`` (no copy when it is a contiguous float32 CPU tensor)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        x = x.to("cpu", torch.float32).contiguous()
    return x.detach().numpy()


def _describe(ort_version: str, kernels: dict, per_channel: bool) -> str:
    ints = ", ".join(k for k in kernels if not k.endswith("(float)")) or "no integer ops"
    return (
        f"onnxruntime {ort_version} CPU ({ints}; s8 {'per-channel' if per_channel else 'per-tensor'} "
        "weights, u8 per-tensor activations)"
    )


def onnxruntime_linear(w: torch.Tensor, b: torch.Tensor | None, threads: int):
    """onnxruntime's dynamic int8 of one linear ``x[M, K] @ W^T + b``: the float graph (MatMul + Add,
    built with ``onnx.helper``) through ``quantize_dynamic``, run with ``threads`` intra-op threads."""
    onnx, ort, _, _ = _import_ort()
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    n, k = w.shape
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["mm" if b is not None else "y"], name="linear")]
    inits = [numpy_helper.from_array(w.detach().float().cpu().t().contiguous().numpy(), "wt")]
    if b is not None:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="bias"))
        inits.append(numpy_helper.from_array(b.detach().float().cpu().numpy(), "b"))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ORT_OPSET)])
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    with tempfile.TemporaryDirectory(prefix="ditq-peer-ort-") as tmp:
        src = os.path.join(tmp, "linear.onnx")
        onnx.save(model, src)
        feeds = {"x": np.zeros((1, k), np.float32)}
        sess, dst, opt, per_channel, why = _quantized_session(src, tmp, threads, feeds, large=False)
        facts = _graph_facts(dst, opt, skip={"b"})

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(["y"], {"x": _numpy(x)})[0])

    fn.info = {
        "backend": _describe(ort.__version__, facts["kernels"], per_channel),
        "weight_bytes": facts["weight_bytes"],  # codes + scale + zero point per channel (bias not counted)
        "per_channel": per_channel,
        "per_channel_error": why,  # why per-channel weights did not run, where they did not
        "kernels": facts["kernels"],
        "threads": threads,
    }
    fn.session = sess
    return fn


def onnxruntime_model(model: nn.Module, example_inputs: tuple, threads: int):
    """onnxruntime's dynamic int8 of a float DiT: ``model(x, t, y)`` exported to ONNX (TorchScript
    exporter, the batch dimension dynamic), quantized by ``quantize_dynamic``, wrapped as a callable
    ``fn(x, t, y)`` like a model step."""
    onnx, ort, _, _ = _import_ort()
    model = copy.deepcopy(model).float().cpu().eval()
    x, t, y = (v.cpu() for v in example_inputs)
    names = ["x", "t", "y"]
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf: 2 GB
    with tempfile.TemporaryDirectory(prefix="ditq-peer-ort-") as tmp:
        src = os.path.join(tmp, "model.onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about shapes read as Python numbers
                torch.onnx.export(
                    model,
                    (x.float(), t, y),
                    src,
                    dynamo=False,  # the TorchScript exporter: no onnxscript needed
                    input_names=names,
                    output_names=["out"],
                    dynamic_axes={v: {0: "batch"} for v in [*names, "out"]},
                    opset_version=ORT_OPSET,
                )
        except Exception as exc:  # noqa: BLE001 - the row is skipped with the reason
            raise PeerUnavailable(
                f"torch.onnx.export of {type(model).__name__} failed: {_one_line(exc)}"
            ) from None
        feeds = {"x": x.float().numpy(), "t": t.numpy(), "y": y.numpy()}
        sess, dst, opt, per_channel, why = _quantized_session(src, tmp, threads, feeds, large)
        # the quantized graph and its external data, if any: what a deployment ships
        base = os.path.basename(dst)
        file_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.startswith(base))
        facts = _graph_facts(dst, opt, skip=set())
    outputs = ["out"]

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feeds = {"x": _numpy(x), "t": t.detach().cpu().numpy(), "y": y.detach().cpu().numpy()}
        return torch.from_numpy(sess.run(outputs, feeds)[0])

    fn.info = {
        "backend": _describe(ort.__version__, facts["kernels"], per_channel),
        "weight_bytes": facts["weight_bytes"],  # every initializer of the quantized graph
        "file_bytes": file_bytes,
        "kernels": facts["kernels"],
        "per_channel": per_channel,
        "per_channel_error": why,  # why per-channel weights did not run, where they did not
        "threads": threads,
    }
    fn.session = sess
    return fn
