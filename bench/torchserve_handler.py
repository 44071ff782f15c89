"""TorchServe handler for bench/torchserve.py: TorchServe's own image classifier with
Lantern's preprocessing (resize the shorter side to 224, bilinear; centre-crop 224;
ImageNet mean/std, as lantern.core.preprocess does it for the benchmark's model) and the
upload read from the multipart field "image", as Lantern's /predict takes it.

Runs inside TorchServe's Python worker (it imports `ts`), packaged into the model archive.
"""

import io

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class LanternPreprocessClassifier(ImageClassifier):
    image_processing = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )

    def initialize(self, context):  # type: ignore[no-untyped-def]
        # Intra-op threads per worker (model-config.yaml, handler.threads): with several
        # workers on few cores, torch's default (one per core each) oversubscribes them.
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        super().initialize(context)

    def preprocess(self, data):  # type: ignore[no-untyped-def]
        images = []
        for row in data:
            payload = row.get("image") or row.get("data") or row.get("body")
            image = Image.open(io.BytesIO(payload)).convert("RGB")
            images.append(self.image_processing(image))
        return torch.stack(images).to(self.device)
