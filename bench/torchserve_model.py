"""The model class TorchServe's archive carries (bench/torchserve.py): torchvision's ResNet-50
with a 10-class head, the architecture of the prediction benchmark's Lantern model, so the
benchmark's state_dict (the Lantern bundle's weights.pt) loads into it unchanged.

TorchServe instantiates the one nn.Module class defined in this file with no arguments.
"""

from torchvision.models.resnet import Bottleneck, ResNet

NUM_CLASSES = 10  # bench.predict.NUM_CLASSES; this file travels alone inside the archive


class ResNet50(ResNet):
    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=NUM_CLASSES)
