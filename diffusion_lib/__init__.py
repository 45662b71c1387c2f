"""diffusion_lib: the small library behind the book's chapters on diffusion models."""

from diffusion_lib.data import CLASS_NAMES, DATA_VARIABLE, DataNotFoundError, data_root, load_images
from diffusion_lib.losses import (
    BoundTerms,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    elbo_bits_per_dim,
    normal_kl,
    prior_bits_per_dim,
    vb_term_bits_per_dim,
)
from diffusion_lib.models import (
    MODELS,
    AttentionUNet,
    DenoisingAutoencoder,
    FCUNet,
    TimeEmbedding,
    build_model,
    count_parameters,
    sinusoidal_embedding,
)
from diffusion_lib.plotting import (
    pixel_histogram,
    plot_loss,
    plot_schedules,
    plot_trajectory,
    show_grid,
    timestep_slider,
)
from diffusion_lib.sampling import (
    Trajectory,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    p_mean_variance,
    predict_noise,
    respace,
)
from diffusion_lib.schedules import SCHEDULES, NoiseSchedule
from diffusion_lib.smoke import smoke_mode

__all__ = [
    "CLASS_NAMES",
    "DATA_VARIABLE",
    "SCHEDULES",
    "BoundTerms",
    "DataNotFoundError",
    "NoiseSchedule",
    "Trajectory",
    "data_root",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "elbo_bits_per_dim",
    "load_images",
    "normal_kl",
    "p_mean_variance",
    "predict_noise",
    "prior_bits_per_dim",
    "respace",
    "smoke_mode",
    "vb_term_bits_per_dim",
    "pixel_histogram",
    "plot_loss",
    "plot_schedules",
    "plot_trajectory",
    "show_grid",
    "timestep_slider",
    "MODELS",
    "AttentionUNet",
    "DenoisingAutoencoder",
    "FCUNet",
    "TimeEmbedding",
    "build_model",
    "count_parameters",
    "sinusoidal_embedding",
]
