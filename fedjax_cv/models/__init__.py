"""Flax vision models behind one registry: `get_model(name, num_classes, **kwargs)`."""

from fedjax_cv.models.deeplab import (
    DeepLabV3Plus,
    DeepLabV3PlusMobileNetV2,
    DeepLabV3PlusResNet,
    DeepLabV3PlusResNet50,
    DeepLabV3PlusResNet101,
)
from fedjax_cv.models.efficientnet import EFFICIENTNETS, EfficientNet
from fedjax_cv.models.mobilenet_v2 import MobileNetV2
from fedjax_cv.models.mobilenet_v3 import MobileNetV3, MobileNetV3Large, MobileNetV3Small
from fedjax_cv.models.norm import NORMS, Norm, group_count
from fedjax_cv.models.registry import get_model, model_fields, model_names, register_model
from fedjax_cv.models.report import ModelReport, count_params, model_report
from fedjax_cv.models.resnet import ResNet, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from fedjax_cv.models.small_cnn import CNNEmnist, CNNHsu, Logistic
from fedjax_cv.models.unet import (
    BackboneUNet,
    UNet,
    UNetMobileNetV2,
    UNetResNet,
    UNetResNet50,
    UNetResNet101,
)
from fedjax_cv.models.vit import ViT, ViTB16, ViTL16, ViTS16, ViTTi16, resize_position_embedding
from fedjax_cv.models.yolo import (
    DETECTORS,
    YOLO,
    YOLOv3,
    YOLOv5,
    YOLOv5l,
    YOLOv5m,
    YOLOv5n,
    YOLOv5s,
    YOLOv5x,
    detection_geometry,
)

register_model("logistic", Logistic)
register_model("cnn_hsu", CNNHsu)
register_model("cnn_emnist", CNNEmnist)
register_model("mobilenet_v2", MobileNetV2)
register_model("mobilenet_v3_large", MobileNetV3Large)
register_model("mobilenet_v3_small", MobileNetV3Small)
for _name, _factory in EFFICIENTNETS.items():
    register_model(_name, _factory)
del _name, _factory
register_model("resnet18", ResNet18)
register_model("resnet34", ResNet34)
register_model("resnet50", ResNet50)
register_model("resnet101", ResNet101)
register_model("resnet152", ResNet152)
register_model("vit_ti16", ViTTi16)
register_model("vit_s16", ViTS16)
register_model("vit_b16", ViTB16)
register_model("vit_l16", ViTL16)
register_model("deeplabv3plus_mobilenet_v2", DeepLabV3PlusMobileNetV2)
register_model("deeplabv3plus_resnet50", DeepLabV3PlusResNet50)
register_model("deeplabv3plus_resnet101", DeepLabV3PlusResNet101)
register_model("unet", UNet)
register_model("unet_mobilenet_v2", UNetMobileNetV2)
register_model("unet_resnet50", UNetResNet50)
register_model("unet_resnet101", UNetResNet101)
for _name, _factory in DETECTORS.items():
    register_model(_name, _factory)
del _name, _factory

__all__ = [
    "NORMS",
    "Norm",
    "group_count",
    "get_model",
    "model_fields",
    "model_names",
    "register_model",
    "Logistic",
    "CNNHsu",
    "CNNEmnist",
    "MobileNetV2",
    "MobileNetV3",
    "MobileNetV3Large",
    "MobileNetV3Small",
    "EfficientNet",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ViT",
    "ViTTi16",
    "ViTS16",
    "ViTB16",
    "ViTL16",
    "resize_position_embedding",
    "DeepLabV3Plus",
    "DeepLabV3PlusMobileNetV2",
    "DeepLabV3PlusResNet",
    "DeepLabV3PlusResNet50",
    "DeepLabV3PlusResNet101",
    "UNet",
    "BackboneUNet",
    "UNetMobileNetV2",
    "UNetResNet",
    "UNetResNet50",
    "UNetResNet101",
    "YOLO",
    "YOLOv3",
    "YOLOv5",
    "YOLOv5n",
    "YOLOv5s",
    "YOLOv5m",
    "YOLOv5l",
    "YOLOv5x",
    "detection_geometry",
    "ModelReport",
    "count_params",
    "model_report",
]
