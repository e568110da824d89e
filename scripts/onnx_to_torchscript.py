#!/usr/bin/env python3
"""ONNX -> TorchScript for `labelfool model add --onnx` (embedded in the binary, run with the setup's
Python: torch, onnx, onnxruntime, onnx2torch).

Converts with the maintained onnx2torch package, traces the result with torch.jit.trace, and checks
the traced module against onnxruntime on the same inputs. Prints one JSON object on stdout:
    {"ok": true, "max_abs_diff": ..., "inputs": N, "onnx_input": [...], "output_width": K,
     "max_batch_size": null | 1}
or  {"ok": false, "error": "..."}  (exit status 1), and writes nothing when it fails.
"""
import argparse
import json
import os
import sys


def fail(message):
    print(json.dumps({"ok": False, "error": message}))
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx")
    ap.add_argument("output")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--mean", type=float, nargs=3)
    ap.add_argument("--std", type=float, nargs=3)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx2torch import convert

    try:
        model = onnx.load(args.onnx)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a usable ONNX model
        fail(f"{args.onnx} is not a valid ONNX model: {type(e).__name__}: {e}")
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(graph_inputs) != 1:
        fail(f"the ONNX model has {len(graph_inputs)} inputs; LabelFool needs exactly one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (None, 3):
        fail(f"the ONNX input {graph_inputs[0].name} has shape {dims}; LabelFool needs [batch, 3, H, W]")
    if any(d is not None and d != args.size for d in dims[2:]):
        fail(f"wrong input size: the ONNX model takes {dims[2]}x{dims[3]} images, --size says {args.size}")
    if dims[0] not in (None, 1):
        fail(f"the ONNX model takes a fixed batch of {dims[0]}; export it with batch 1 or a dynamic batch axis")

    try:
        net = convert(model).eval()
    except Exception as e:  # noqa: BLE001
        fail(f"onnx2torch cannot convert {args.onnx}: {type(e).__name__}: {e}")
    torch.manual_seed(0)
    # Inputs as the server feeds them: [0,1] RGB, normalised when the model expects it.
    raw = torch.rand(4, 3, args.size, args.size)
    if args.mean and args.std:
        raw = (raw - torch.tensor(args.mean).view(1, 3, 1, 1)) / torch.tensor(args.std).view(1, 3, 1, 1)
    with torch.no_grad():
        try:
            traced = torch.jit.trace(net, raw[:1])
        except Exception as e:  # noqa: BLE001
            fail(f"torch.jit.trace failed on the converted model at {args.size}x{args.size}: {type(e).__name__}: {e}")
        ours = torch.cat([traced(raw[i:i + 1]) for i in range(raw.shape[0])]).numpy()
        # Tracing bakes shapes computed from the batch into many converted graphs (a flatten to
        # [1, C]): when other batch sizes fail or differ, the bundle declares max_batch_size 1.
        try:
            batched = traced(raw).numpy()
            dynamic_batch = batched.shape == ours.shape and float(np.abs(batched - ours).max()) <= args.tolerance
        except Exception:  # noqa: BLE001
            dynamic_batch = False
    session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ref = np.concatenate([session.run(None, {name: raw[i:i + 1].numpy()})[0] for i in range(raw.shape[0])])
    if ref.shape != ours.shape:
        fail(f"onnxruntime gives {list(ref.shape)}, the traced module {list(ours.shape)}")
    diff = float(np.abs(ref - ours).max())
    if not diff <= args.tolerance:
        fail(f"the traced module differs from onnxruntime by {diff:.3g} (max abs logit), past the tolerance {args.tolerance:g}")
    tmp = args.output + ".tmp"
    traced.save(tmp)
    os.replace(tmp, args.output)
    print(json.dumps({"ok": True, "max_abs_diff": diff, "inputs": int(raw.shape[0]), "onnx_input": dims,
                      "output_width": int(ref.shape[1]), "onnx_batch": dims[0],
                      "max_batch_size": None if dynamic_batch else 1}))


if __name__ == "__main__":
    main()
