"""Calls a LabelFool server's /v2 routes with the official Triton client library
(tritonclient[http]), as a Triton user would, and prints what it saw as one JSON object.
Run by tests/triton_client.rs with the setup's Python: URL MODEL IMAGE SIZE."""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, model, image_path, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = httpclient.InferenceServerClient(url)
seen = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "extensions": client.get_server_metadata()["extensions"],
    "metadata": client.get_model_metadata(model),
    "config": client.get_model_config(model),
}

# An encoded image as BYTES, in binary tensor data (the client's default).
image = np.array([open(image_path, "rb").read()], dtype=np.object_)
inp = httpclient.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(image)
seen["bytes_binary"] = client.infer(model, [inp]).as_numpy("probabilities").tolist()

# A preprocessed FP32 batch, as JSON and as binary data, both ways.
x = np.random.RandomState(0).rand(2, 3, size, size).astype(np.float32)
for binary in (False, True):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    seen[f"fp32_{'binary' if binary else 'json'}"] = client.infer(model, [inp], outputs=[out]).as_numpy("probabilities").tolist()

# No output named: the client asks for every output as binary data.
inp = httpclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
seen["fp32_default_outputs"] = client.infer(model, [inp]).as_numpy("probabilities").tolist()

# Triton's classification extension.
out = httpclient.InferRequestedOutput("probabilities", class_count=3)
top = client.infer(model, [inp], outputs=[out]).as_numpy("probabilities")
seen["classification"] = [[v.decode() if isinstance(v, bytes) else str(v) for v in row] for row in top]

seen["stats"] = client.get_inference_statistics(model)

# Errors: the client must be able to read (and print) them.
errors = {}
for name, call in [
    ("unknown_model", lambda: client.get_model_metadata("no-such-model")),
    ("bad_shape", lambda: client.infer(model, [httpclient.InferInput("input", [1, 3, size + 1, size], "FP32")
                                               .set_data_from_numpy(np.zeros((1, 3, size + 1, size), np.float32))])),
]:
    try:
        call()
        errors[name] = None
    except InferenceServerException as e:
        errors[name] = {"status": e.status(), "message": e.message(), "printed": str(e)}
seen["errors"] = errors
print(json.dumps(seen))
