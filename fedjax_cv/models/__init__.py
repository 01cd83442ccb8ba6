"""Flax vision models behind one registry: `get_model(name, num_classes, **kwargs)`."""

from fedjax_cv.models.norm import NORMS, Norm, group_count
from fedjax_cv.models.registry import get_model, model_names, register_model
from fedjax_cv.models.small_cnn import CNNEmnist, CNNHsu, Logistic

register_model("logistic", Logistic)
register_model("cnn_hsu", CNNHsu)
register_model("cnn_emnist", CNNEmnist)

__all__ = [
    "NORMS",
    "Norm",
    "group_count",
    "get_model",
    "model_names",
    "register_model",
    "Logistic",
    "CNNHsu",
    "CNNEmnist",
]
