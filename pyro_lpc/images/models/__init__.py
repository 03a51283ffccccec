"""Reference decoders, encoders, likelihoods and Pyro model/guide pairs for image data."""
from .conv import SUPPORTED_IMAGE_SIZES, ConvDecoder, ConvEncoder
from .likelihoods import Bernoulli, DiscretizedGaussian, DiscretizedNormal, Gaussian, Likelihood
from .mlp import MLPDecoder, MLPEncoder
from .vae import DeepLatentGaussian, conv_model, mlp_model

__all__ = [
    "Bernoulli",
    "ConvDecoder",
    "ConvEncoder",
    "DeepLatentGaussian",
    "DiscretizedGaussian",
    "DiscretizedNormal",
    "Gaussian",
    "Likelihood",
    "MLPDecoder",
    "MLPEncoder",
    "SUPPORTED_IMAGE_SIZES",
    "conv_model",
    "mlp_model",
]
