"""varinf: deep generative models as variational inference.

Every model fits p(x) by making two joints over (x, z) agree: the data side p~(x) q(z|x), a Pyro
guide, and the model side p(z) p(x|z), a Pyro model. See THEORY.md for the maths.
"""

from varinf.adversarial import (
    ADVERSARIAL_LOSSES,
    AdversarialLoss,
    gradient_penalty,
    js_from_logits,
    kl_data_model_from_logits,
    kl_model_data_from_logits,
    wasserstein_from_critic,
)
from varinf.adversarial_modules import (
    AAEModule,
    AdversarialModule,
    ALIModule,
    GANModule,
)
from varinf.callbacks import ImageGrids, ModeCoverage
from varinf.data import (
    MNISTDataModule,
    RingDataModule,
    TensorBatches,
    TensorDataModule,
    load_mnist,
)
from varinf.divergences import (
    cross_entropy,
    entropy,
    js,
    kl,
    kl_normal_normal,
    kl_normal_standard_normal,
    monte_carlo_kl,
    wasserstein_1d,
)
from varinf.errors import ConfigError, DataError, NumericalError
from varinf.evaluation import importance_sampled_nll
from varinf.guides import (
    DeltaEncoderGuide,
    FlowGuide,
    FullCovarianceGaussianGuide,
    GaussianEncoderGuide,
)
from varinf.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
)
from varinf.metrics import ActiveUnits, mode_coverage
from varinf.models import DATA_PLATE, LATENT, OBSERVED, LatentVariableModel
from varinf.modules import GenerativeModule, VAEModule, load_module
from varinf.networks import MLP, ConvDecoder, ConvEncoder, NetworkFactory
from varinf.objectives import ELBOLoss, iwae_bound, log_importance_weights
from varinf.priors import MixtureOfGaussiansPrior, NormalPrior, StandardNormalPrior, VampPrior

__all__ = [
    "ADVERSARIAL_LOSSES",
    "DATA_PLATE",
    "LATENT",
    "MLP",
    "OBSERVED",
    "AAEModule",
    "ALIModule",
    "ActiveUnits",
    "AdversarialLoss",
    "AdversarialModule",
    "BernoulliLikelihood",
    "ConfigError",
    "ContinuousBernoulliLikelihood",
    "ConvDecoder",
    "ConvEncoder",
    "DataError",
    "DeltaEncoderGuide",
    "ELBOLoss",
    "FlowGuide",
    "FullCovarianceGaussianGuide",
    "GANModule",
    "GaussianEncoderGuide",
    "GaussianLikelihood",
    "GenerativeModule",
    "ImageGrids",
    "LatentVariableModel",
    "MNISTDataModule",
    "MixtureOfGaussiansPrior",
    "ModeCoverage",
    "NetworkFactory",
    "NormalPrior",
    "NumericalError",
    "RingDataModule",
    "StandardNormalPrior",
    "TensorBatches",
    "TensorDataModule",
    "VAEModule",
    "VampPrior",
    "cross_entropy",
    "entropy",
    "gradient_penalty",
    "importance_sampled_nll",
    "iwae_bound",
    "js",
    "js_from_logits",
    "kl",
    "kl_data_model_from_logits",
    "kl_model_data_from_logits",
    "kl_normal_normal",
    "kl_normal_standard_normal",
    "load_mnist",
    "load_module",
    "log_importance_weights",
    "mode_coverage",
    "monte_carlo_kl",
    "wasserstein_1d",
    "wasserstein_from_critic",
]
